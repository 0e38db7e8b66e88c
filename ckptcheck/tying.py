"""Is a stored copy redundant?  A separate ``output.weight`` beside a tied embedding may be dropped only
when it holds exactly the embedding's values; anything else would lose trained values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bits import first_difference
from .formats.base import row_chunks

if TYPE_CHECKING:
    import torch

    from .formats import Checkpoint

CHUNK_BYTES = 64 << 20  # compared a chunk of rows at a time: memory stays near two chunks


def redundant_copy(ckpt: Checkpoint, copy: str, primary: str) -> bool:
    """Whether dropping ``copy`` loses nothing: same shape and, element by element, exactly ``primary``'s
    values (bit for bit, NaN payloads and the sign of zero included).  A copy in another dtype counts only
    when every value of it is exactly representable in ``primary``'s dtype (casting there and back gives
    the same bits) and the cast equals ``primary`` bit for bit: an fp32 copy of a bf16 embedding, say."""
    x, y = ckpt.manifest.tensors[copy], ckpt.manifest.tensors[primary]
    if x.shape != y.shape:
        return False
    if x.alias_of == primary or y.alias_of == copy:
        return True
    if not x.shape:
        return _same(ckpt.load(copy), ckpt.load(primary))
    for start, stop in row_chunks(x.shape[0], max(x.nbytes, y.nbytes), CHUNK_BYTES):
        if not _same(ckpt.read_rows(copy, start, stop), ckpt.read_rows(primary, start, stop)):
            return False
    return True


def _same(copy: torch.Tensor, primary: torch.Tensor) -> bool:
    if copy.dtype == primary.dtype:
        return first_difference(copy, primary) is None
    cast = copy.to(primary.dtype)
    return first_difference(cast.to(copy.dtype), copy) is None and first_difference(cast, primary) is None
