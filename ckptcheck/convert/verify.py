"""Read the output back and compare it, chunk by chunk, with what was derived from the input.

Every chunk written was checksummed (CRC32) as it was made from the input; here the output is read
back through ckptcheck's own readers, independently of the writer that produced it, and each chunk's
CRC32 must match.  Chunks without a recorded checksum are compared bit for bit with the input.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from ..bits import first_difference
from ..errors import CkptError
from ..formats import open_checkpoint
from .plan import ConversionPlan
from .stream import ChunkSource, as_bytes, row_ranges


class VerificationError(CkptError):
    """The output differs from the input it was made from: nothing is committed."""


def verify_output(path: Path, plan: ConversionPlan, source: ChunkSource, *, display: str) -> int:
    """Compare every tensor of the output at ``path``; returns the bytes compared."""
    import torch

    compared = 0
    buffer = torch.empty(0, dtype=torch.uint8)
    with open_checkpoint(path) as out:
        keys = set(out.manifest.tensors)
        expected = {m.dst_key for m in plan.moves if m.alias_of is None or m.dst_key in keys}
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            raise VerificationError(display, None, f"output keys differ from the plan (missing {missing[:3]}, "
                                    f"extra {extra[:3]})")
        extra = out.manifest.extra_tensors
        absent = [m.dst_key for m in plan.state_moves if m.dst_key not in extra]
        if absent:
            raise VerificationError(display, absent[0], f"{len(absent)} training-state tensors are missing from the output")
        for move in (*plan.moves, *plan.state_moves):
            if move.dst_key not in keys and move.dst_key not in extra:
                continue
            info = out.manifest.tensors.get(move.dst_key) or extra[move.dst_key]
            if info.shape != move.shape or info.dtype != move.dst_dtype:
                raise VerificationError(display, move.dst_key, f"written as {info.dtype}{list(info.shape)}, "
                                        f"planned {move.dst_dtype}{list(move.shape)}")
            written = move.alias_of or move.dst_key
            for start, stop in row_ranges(move):
                if buffer.numel() < (stop - start) * move.row_bytes:
                    buffer = torch.empty((stop - start) * move.row_bytes, dtype=torch.uint8)
                got = out.load(move.dst_key) if not move.shape else out.read_rows(move.dst_key, start, stop, buffer)
                crc = source.checksums.get((written, start))
                if crc is not None:
                    same = zlib.crc32(as_bytes(got.contiguous())) == crc
                else:
                    want = source.read(move, start, stop)
                    same = first_difference(got, want.reshape(got.shape)) is None
                if not same:
                    raise VerificationError(display, move.dst_key, f"rows {start}:{stop} differ from the input")
                compared += (stop - start) * move.row_bytes if move.shape else move.nbytes
    return compared
