"""Bitwise comparison helpers: NaN equals NaN and -0.0 differs from 0.0 when bits are compared."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements reinterpreted as same-width integers (flattened)."""
    import torch

    flat = t.reshape(-1)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(flat.element_size())
    return flat.view(width) if width is not None and flat.numel() else flat


def unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    """A flat index as a multi-dimensional one."""
    out = []
    for d in reversed(shape):
        out.append(flat % d if d else 0)
        flat //= d if d else 1
    return list(reversed(out))


def first_difference(a: torch.Tensor, b: torch.Tensor) -> list[int] | None:
    """Index of the first element whose bits differ, or None when the tensors are bitwise equal."""
    import torch

    x, y = bit_view(a), bit_view(b)
    if x.shape != y.shape:
        return [0] * a.dim()
    if torch.equal(x, y):  # no temporary mask in the common case
        return None
    differ = x != y
    if not bool(differ.any()):
        return None
    return unravel(int(differ.nonzero()[0, 0]), tuple(a.shape))
