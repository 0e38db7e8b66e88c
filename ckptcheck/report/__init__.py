"""Renderers: result records in, text out.  Nothing here reads a checkpoint."""
