"""What a checkpoint holds, described without reading a byte of tensor data."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .dtypes import itemsize


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One stored tensor: its name as stored (after unwrapping a nesting such as lingua's ``model``)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    # Another key whose bytes this tensor shares (a tied weight saved by torch.save), if any.
    alias_of: str | None = None
    # Dimensions (of size > 1) along which the stored view reads elements it already read (stride 0, or a
    # stride overlapping the smaller ones): set only when it has more elements than the storage it spans.
    aliased_dims: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class Manifest:
    """A checkpoint's tensors and layout facts; readers build it, checks and reports consume it."""

    path: str
    format: str
    tensors: dict[str, TensorInfo]
    files: tuple[str, ...]
    # Section that holds the model tensors (lingua/torchtitan nest them under "model"), or None if flat.
    nesting: str | None = None
    # Other top-level sections (optimizer, scheduler, train state, ...), by name.
    sections: tuple[str, ...] = ()
    # Tensors outside the model section, flattened DCP-style ("optim.state.<fqn>.exp_avg").
    extra_tensors: dict[str, TensorInfo] = field(default_factory=dict)
    # Non-tensor leaves anywhere, flattened the same way (numbers, strings, byte blobs).
    extra_entries: tuple[str, ...] = ()
    # Facts about what wrote the file: serialization version, byte order, DCP metadata version, ...
    facts: dict[str, str] = field(default_factory=dict)
    # Dotted key -> path for every extra tensor and entry (dict keys may themselves contain dots).
    extra_paths: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if t.alias_of is None)

    @property
    def optimizer_section(self) -> str | None:
        for name in OPTIMIZER_SECTIONS:
            if name in self.sections:
                return name
        return None


# Section names that training frameworks use for optimizer state: lingua "optim", torchtitan
# "optimizer", Lightning "optimizer_states", plain scripts "optimizer_state_dict".
OPTIMIZER_SECTIONS = ("optim", "optimizer", "optimizer_states", "optimizer_state_dict", "optim_state")
# Sections that hold the model's own tensors, in order of preference.
MODEL_SECTIONS = ("model", "state_dict", "model_state_dict", "module")


_DIGITS = re.compile(r"([0-9]+)")


def natural_key(key: str) -> tuple[tuple[int, str], ...]:
    """Sort "layers.2" before "layers.10": a run of digits by its length, then its text, without int() (a key
    is input, and int() refuses a run of over 4,300 digits)."""
    return tuple((len(p.lstrip("0")), p.lstrip("0")) if p[0] in "0123456789" else (-1, p)
                 for p in _DIGITS.split(key) if p)
