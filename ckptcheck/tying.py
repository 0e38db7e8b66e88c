"""Is a stored copy redundant?  A separate ``output.weight`` beside a tied embedding may be dropped only
when it holds the embedding's values bit for bit; anything else would lose trained values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bits import first_difference

if TYPE_CHECKING:
    from .formats import Checkpoint

CHUNK_BYTES = 64 << 20  # compared a chunk of rows at a time: memory stays near two chunks


def bit_identical(ckpt: Checkpoint, a: str, b: str) -> bool:
    """Whether stored tensors ``a`` and ``b`` have the same dtype, shape and bits (streamed)."""
    x, y = ckpt.manifest.tensors[a], ckpt.manifest.tensors[b]
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.alias_of == b or y.alias_of == a:
        return True
    if not x.shape:
        return first_difference(ckpt.load(a), ckpt.load(b)) is None
    rows = x.shape[0]
    step = max(1, CHUNK_BYTES // max(1, x.nbytes // max(1, rows)))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if first_difference(ckpt.read_rows(a, start, stop), ckpt.read_rows(b, start, stop)) is not None:
            return False
    return True
