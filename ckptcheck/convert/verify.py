"""Read the output back and compare it, chunk by chunk and bit for bit, with what the plan says it holds."""

from __future__ import annotations

from pathlib import Path

from ..errors import CkptError
from ..formats import open_checkpoint
from .plan import ConversionPlan
from .stream import ChunkSource, row_ranges


class VerificationError(CkptError):
    """The output differs from the input it was made from: nothing is committed."""


def verify_output(path: Path, plan: ConversionPlan, source: ChunkSource, *, display: str) -> int:
    """Compare every tensor of the output at ``path``; returns the bytes compared."""
    import torch

    compared = 0
    with open_checkpoint(path) as out:
        keys = set(out.manifest.tensors)
        expected = {m.dst_key for m in plan.moves if m.alias_of is None or m.dst_key in keys}
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            raise VerificationError(display, None, f"output keys differ from the plan (missing {missing[:3]}, "
                                    f"extra {extra[:3]})")
        for move in plan.moves:
            if move.dst_key not in keys:
                continue
            info = out.manifest.tensors[move.dst_key]
            if info.shape != move.shape or info.dtype != move.dst_dtype:
                raise VerificationError(display, move.dst_key, f"written as {info.dtype}{list(info.shape)}, "
                                        f"planned {move.dst_dtype}{list(move.shape)}")
            for start, stop in row_ranges(move):
                want = source.read(move, start, stop)
                got = out.load(move.dst_key) if not move.shape else out.read_rows(move.dst_key, start, stop)
                if not torch.equal(_bits(got), _bits(want)):
                    raise VerificationError(display, move.dst_key, f"rows {start}:{stop} differ from the input")
                compared += want.numel() * want.element_size()
    return compared


def _bits(t):  # compare bit patterns: NaN == NaN, -0.0 != 0.0
    import torch

    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat
