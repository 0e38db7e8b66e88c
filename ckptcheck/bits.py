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


def widened(t: torch.Tensor) -> torch.Tensor:
    """A float8 tensor as float32 (exact): torch implements isfinite, isinf and arithmetic for no float8
    dtype; any other tensor as it is."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def stored_elements(t: torch.Tensor) -> torch.Tensor:
    """The elements a view reads, flat, bounded by the storage it views and never by its own numel: a
    stride-0 dimension is read at index 0 only (every index reads the same elements), and a view whose
    strides overlap is replaced by the storage span it covers (each stored element once)."""
    t = _unrepeated(t)
    if _overlaps(t):
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (span,), (1,))
    return t.reshape(-1)


def view_index(t: torch.Tensor, flat: int) -> int | None:
    """The flat index, in ``t`` as the user indexes it, where element ``flat`` of ``stored_elements(t)`` first
    appears (its stride-0 dims at 0); None when overlapping strides made that the storage span's index."""
    if _overlaps(_unrepeated(t)):
        return None
    kept = [d for d, (n, s) in enumerate(zip(t.shape, t.stride(), strict=True)) if not (s == 0 and n > 1)]
    full = [0] * t.dim()
    for d, i in zip(kept, unravel(flat, tuple(t.shape[d] for d in kept)), strict=True):
        full[d] = i
    index = 0
    for n, i in zip(t.shape, full, strict=True):
        index = index * n + i
    return index


def _unrepeated(t: torch.Tensor) -> torch.Tensor:
    """``t`` with each stride-0 dimension read at index 0 only."""
    return t[tuple(0 if s == 0 and n > 1 else slice(None) for n, s in zip(t.shape, t.stride(), strict=True))]


def _overlaps(t: torch.Tensor) -> bool:
    """Whether ``t`` has more elements than the storage span it reads."""
    if t.is_contiguous() or not t.numel():
        return False
    return t.numel() > 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))


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
