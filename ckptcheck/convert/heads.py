"""Permuting q/k rows between rotary layouts needs the head split, which shapes never fix.

The weights show n_heads × head_dim, not the split: a config with twice the heads of half the size
fits the same shapes, and a permutation with the wrong head size scrambles every query and key.  So a
conversion that permutes goes ahead only when the split is witnessed (a rotary buffer, a per-head
norm, a config saved with the checkpoint: ``corroborate``; the config used, when it is the one saved in the
checkpoint's own folder, as save_pretrained and lingua save it; the config ckptcheck wrote beside weights it
permuted, which undoes that permutation exactly) or the user confirms it (``--head-dim``).
"""

from __future__ import annotations

from pathlib import Path

from ..configs import ModelConfig
from ..errors import InputError
from ..manifest import Manifest


def confirm_head_split(manifest: Manifest, cfg: ModelConfig, src: Path, head_dim: int | None) -> str:
    """The source of the head split a permutation will use; InputError when nothing confirms it."""
    from ..corroborate import head_dim_witnesses, saved_with, written_with_split
    from ..infer import infer_dims
    from ..naming import map_keys

    if head_dim is not None and head_dim != cfg.head_dim:
        raise InputError(src, "--head-dim", f"{head_dim} is not the config's head_dim {cfg.head_dim} "
                         f"({cfg.source}): fix the config or the flag")
    mapping = map_keys(manifest.tensors)
    inferred = infer_dims({c: manifest.tensors[s] for s, c in mapping.canonical.items()})
    witnesses = head_dim_witnesses(manifest.tensors, inferred, src, cfg)
    wrong = [w for w in witnesses if w.head_dim != cfg.head_dim]
    if wrong:
        raise InputError(src, None, f"{wrong[0].source} shows head_dim {wrong[0].head_dim}, but the config "
                         f"({cfg.source}) gives {cfg.head_dim}: q/k rows would be permuted with the wrong head size")
    if witnesses:
        return " and ".join(w.source for w in witnesses)
    if saved_with(src, cfg):
        return f"the config saved with the checkpoint ({cfg.source})"
    written = written_with_split(src, cfg)
    if written is not None:
        return f"the split ckptcheck converted these weights with ({written})"
    if head_dim is not None:
        return "--head-dim"
    raise InputError(src, None, f"permuting q/k rows assumes the config's split (n_heads {cfg.n_heads}, n_kv_heads "
                     f"{cfg.n_kv_heads}, head_dim {cfg.head_dim}), which nothing in or beside the checkpoint "
                     f"confirms; pass --head-dim {cfg.head_dim} if that is the training run's head size")
