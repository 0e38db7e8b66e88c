"""Chunks of rows, read from the source and made into what the output holds."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import dtypes
from ..bits import bit_view, widened
from ..errors import InputError
from ..formats.base import row_chunks, row_step
from ..layouts import half_to_interleaved, interleaved_to_half
from .plan import TensorMove

if TYPE_CHECKING:
    import torch

    from ..formats import Checkpoint

CHUNK_BYTES = 64 << 20


def row_ranges(move: TensorMove, chunk_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``chunk_bytes`` (default CHUNK_BYTES); whole heads when rows are permuted."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if not move.shape:
        yield 0, 1
        return
    step = row_step(move.rows, move.row_bytes, chunk_bytes)
    if move.permute is not None:
        head_dim = move.permute[1]
        step = max(head_dim, step - step % head_dim)
    for start in range(0, move.rows, step):
        yield start, min(move.rows, start + step)
    if move.rows == 0:
        yield 0, 0


@dataclass
class CastStats:
    """Worst precision lost by a narrowing cast, over every chunk of one tensor.  A value counts as changed
    when its bits do not survive the round trip; a NaN has no absolute error, so a NaN whose payload the
    cast rewrote is counted apart rather than as an error of 0."""

    max_abs: float = 0.0
    changed: int = 0
    count: int = 0
    nan_payloads: int = 0


@dataclass
class ChunkSource:
    """Reads a move's rows from the source and applies its permutation and cast.

    Chunks are read into reused buffers (reused pages cost far less than fresh ones on these machines),
    so a chunk is valid until the next read.  ``buffers="shared"`` reads every chunk into one large
    buffer; ``"exact"`` keeps one buffer per chunk size, so that each chunk owns its whole storage
    (DCP copies any tensor that does not).
    ``checksums`` records a CRC32 of every chunk produced, so the output can be verified against
    what was derived from the input without reading the input a second time.
    """

    checkpoint: Checkpoint
    measure_casts: bool = True
    buffers: str = "shared"
    cast_stats: dict[str, CastStats] = field(default_factory=dict)
    checksums: dict[tuple[str, int], int] = field(default_factory=dict)
    _pool: dict[int, torch.Tensor] = field(default_factory=dict)

    def read(self, move: TensorMove, start: int, stop: int) -> torch.Tensor:
        if move.fill is not None:
            import torch

            shape = (stop - start, *move.shape[1:]) if move.shape else ()
            t = torch.full(shape, move.fill, dtype=dtypes.to_torch(move.dst_dtype))
            self.checksums[(move.dst_key, start)] = zlib.crc32(as_bytes(t))
            return t
        if move.permute is not None:
            # Rows permute within whole heads: read the heads these rows fall in, keep the rows asked for.
            head_dim = move.permute[1]
            lo, hi = start - start % head_dim, min(move.rows, -(-stop // head_dim) * head_dim)
            if (lo, hi) != (start, stop):
                return self.read(move, lo, hi)[start - lo:stop - lo].clone()
        if not move.shape:
            t = self.checkpoint.load(move.src_key)
        else:
            t = self.checkpoint.read_rows(move.src_key, start, stop, self._buffer_for(move, start, stop))
        if move.permute is not None and stop > start:
            heads, head_dim, direction = move.permute
            n = (stop - start) // head_dim
            t = interleaved_to_half(t, n) if direction == "interleaved->half" else half_to_interleaved(t, n)
        if move.dst_dtype != move.src_dtype:
            t = self._cast(move, t)
        t = t.contiguous()
        self.checksums[(move.dst_key, start)] = zlib.crc32(as_bytes(t))
        return t

    def _buffer_for(self, move: TensorMove, start: int, stop: int) -> torch.Tensor:
        import torch

        nbytes = (stop - start) * move.row_bytes // dtypes.itemsize(move.dst_dtype) * dtypes.itemsize(move.src_dtype)
        if self.buffers == "exact":
            if nbytes not in self._pool:
                if len(self._pool) >= 4:  # chunk sizes repeat; keep the few most recent
                    self._pool.pop(next(iter(self._pool)))
                self._pool[nbytes] = torch.empty(nbytes, dtype=torch.uint8)
            return self._pool[nbytes]
        shared = self._pool.get(0)
        if shared is None or shared.numel() < nbytes:
            shared = self._pool[0] = torch.empty(max(nbytes, CHUNK_BYTES), dtype=torch.uint8)
        return shared

    def _cast(self, move: TensorMove, t: torch.Tensor) -> torch.Tensor:
        cast = t.to(dtypes.to_torch(move.dst_dtype))
        if move.src_dtype in dtypes.FLOATING and move.dst_dtype in dtypes.FLOATING:
            refuse_lossy_cast(t, cast, path=self.checkpoint.manifest.path, key=move.src_key)
        if self.measure_casts and dtypes.itemsize(move.dst_dtype) < dtypes.itemsize(move.src_dtype) and t.numel():
            stats = self.cast_stats.setdefault(move.dst_key, CastStats())
            back = cast.to(t.dtype)
            diff = (back.double() - t.double()).abs().nan_to_num(0)
            stats.max_abs = max(stats.max_abs, float(diff.max()))
            differ = bit_view(back) != bit_view(t)
            stats.changed += int(differ.sum())
            stats.nan_payloads += int((differ & t.reshape(-1).isnan()).sum())
            stats.count += t.numel()
        return cast

    def chunks(self, move: TensorMove, chunk_bytes: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        for start, stop in row_ranges(move, chunk_bytes):
            yield start, self.read(move, start, stop)


def refuse_lossy_cast(t: torch.Tensor, cast: torch.Tensor, *, path: str, key: str) -> None:
    """A cast may round; it may not turn a finite value into Inf nor a nonzero one into zero: either
    changes what the model computes (Inf spreads to every activation; a flushed scale silences a row)."""
    import torch

    overflow = torch.isfinite(widened(t)) & ~torch.isfinite(widened(cast))
    flushed = (t != 0) & (cast == 0)
    for bad, what in ((overflow, "overflows to Inf"), (flushed, "is flushed to zero")):
        if bool(bad.any()):
            value = float(t[bad].reshape(-1)[0])
            raise InputError(path, key, f"casting to {dtypes.canonical(str(cast.dtype))} "
                             f"would change its values: {value:.6g} {what} ({int(bad.sum())} values in this "
                             "chunk): keep this tensor's dtype")


def lossy_cast(checkpoint: Checkpoint, keys: list[str], dtype: str) -> str | None:
    """Why casting the floating tensors ``keys`` to ``dtype`` would change values beyond rounding (the
    first overflow or flush found, as one line), or None; streamed a chunk of rows at a time."""
    want = dtypes.to_torch(dtype)
    for key in keys:
        info = checkpoint.manifest.tensors[key]
        if info.dtype not in dtypes.FLOATING or info.dtype == dtype:
            continue
        for start, stop in row_chunks(info.shape[0] if info.shape else 1, info.nbytes, CHUNK_BYTES):
            t = checkpoint.read_rows(key, start, stop) if info.shape else checkpoint.load(key)
            try:
                refuse_lossy_cast(t, t.to(want), path=checkpoint.manifest.path, key=key)
            except InputError as exc:
                return exc.line()
    return None


def as_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, without a copy."""
    import torch

    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
