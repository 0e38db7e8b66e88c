"""Migrations between checkpoint generations, Lightning-style: ordered, small, named functions.

Each migration says whether it applies to a checkpoint (from its manifest alone) and what the
conversion must do to apply it; ``ckptcheck repair`` and ``convert`` apply them, in this order, as part
of the one streaming, verified conversion.  Adding one is adding a function to ``MIGRATIONS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .manifest import Manifest
from .naming import map_keys


@dataclass(frozen=True)
class Migration:
    name: str
    title: str
    applies: Callable[[Manifest], bool]
    # output formats that complete it (None: any)
    to: tuple[str, ...] | None = None


def _legacy_serialization(m: Manifest) -> bool:
    return m.format == "torch-legacy"


def _dcp_before_2_4(m: Manifest) -> bool:
    return m.format == "dcp" and m.facts.get("dcp layout", "").startswith("before torch 2.4")


def _titan_0_5_names(m: Manifest) -> bool:
    return map_keys(m.tensors).scheme.name == "titan"


MIGRATIONS: tuple[Migration, ...] = (
    Migration("legacy_torch_to_zip", "rewrite the legacy pickle stream as a torch.save zip archive "
              "(memory-mappable, readable lazily)", _legacy_serialization, ("torch", "safetensors", "dcp", "hf")),
    Migration("dcp_pre_2_4_to_flattened", "rewrite a DCP checkpoint from before torch 2.4 in the current layout "
              "(containers flattened, metadata versioned: pytorch #133923)", _dcp_before_2_4, ("dcp",)),
    Migration("titan_0_5_names", "rename torchtitan 0.5+ keys (attention.qkv_linear.*, lm_head) to the "
              "config's naming", _titan_0_5_names),
)


def applicable(manifest: Manifest) -> list[Migration]:
    return [m for m in MIGRATIONS if m.applies(manifest)]
