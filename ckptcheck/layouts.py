"""Tensor layouts that differ between schemes although the shapes agree: the rotary q/k row order.

Meta, lingua and torchtitan rotate interleaved pairs of each head's rows; Hugging Face rotates the two
halves.  Moving wq (n = n_heads) or wk (n = n_kv_heads) between them permutes rows within each head.
Getting this wrong leaves every shape right and every logit wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .naming import role_of

if TYPE_CHECKING:
    import torch

# The q/k tensors whose rows follow the rotary layout: the projections and their biases.
ROTARY_ROLES = {
    "layers.{i}.attention.wq.weight": "n_heads", "layers.{i}.attention.wk.weight": "n_kv_heads",
    "layers.{i}.attention.wq.bias": "n_heads", "layers.{i}.attention.wk.bias": "n_kv_heads",
}


def interleaved_to_half(w: torch.Tensor, n: int) -> torch.Tensor:
    """Meta layout -> Hugging Face layout for a [n * head_dim, cols] projection or its [n * head_dim] bias."""
    rows, cols = _check(w, n)
    return w.reshape(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n: int) -> torch.Tensor:
    """Hugging Face layout -> Meta layout; the inverse of ``interleaved_to_half``."""
    rows, cols = _check(w, n)
    return w.reshape(n, 2, rows // n // 2, cols).transpose(1, 2).reshape(w.shape)


def _check(w: torch.Tensor, n: int) -> tuple[int, int]:
    if w.dim() not in (1, 2) or n <= 0 or w.shape[0] % (2 * n):
        raise ValueError(f"cannot permute a {list(w.shape)} projection over {n} heads: rows must split into "
                         "heads of even size")
    return w.shape[0], (w.shape[1] if w.dim() == 2 else 1)


def change_rotary(canonical_key: str, w: torch.Tensor, src: str, dst: str, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Re-lay one tensor from rotary layout ``src`` to ``dst`` ("interleaved" or "half") if it is wq/wk."""
    heads = ROTARY_ROLES.get(role_of(canonical_key))
    if heads is None or src == dst:
        return w
    n = n_heads if heads == "n_heads" else n_kv_heads
    if (src, dst) == ("interleaved", "half"):
        return interleaved_to_half(w, n)
    if (src, dst) == ("half", "interleaved"):
        return half_to_interleaved(w, n)
    raise ValueError(f"unknown rotary layouts {src!r} -> {dst!r}")
