"""ckptcheck: prove a checkpoint is the one a training run expects, before the run starts.

The package is an engine (readers -> spec -> checks -> reports) with two thin doors: a pytest plugin
and the ``ckptcheck`` command line.  Importing the package imports no torch; only the steps that touch
tensor data do.
"""

__version__ = "0.1.0"
