"""Checkpoints split over files by an index (``*.index.json`` with a ``weight_map``), as Hugging Face
writes them for safetensors and for ``pytorch_model.bin`` alike."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..configs import read_json
from ..errors import InputError, UnsafeInputError
from ..manifest import Manifest, natural_key
from .base import Checkpoint, merged_facts

if TYPE_CHECKING:
    import torch


class ShardedCheckpoint(Checkpoint):
    def __init__(self, index_path: str | os.PathLike[str], open_shard: Callable[[str, Path], Checkpoint],
                 format_name: str) -> None:
        """``open_shard(path, inside)``: a shard's reader, refusing a file that leaves the folder ``inside``."""
        index = Path(index_path)
        self.path = str(index)
        data = read_json(index, "index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(index, "weight_map", "missing or empty")
        self._shards: dict[str, Checkpoint] = {}
        self._owner: dict[str, Checkpoint] = {}
        try:
            for key, name in sorted(weight_map.items()):
                if not isinstance(name, str) or not name:
                    raise InputError(index, f"weight_map[{key}]", "is not a file name")
                shard = shard_path(index, key, name)
                if shard not in self._shards:
                    if not os.path.lexists(shard):
                        raise InputError(index, f"weight_map[{key}]", f"names {name!r}, which does not exist")
                    self._shards[shard] = open_shard(shard, index.parent)
                if key not in self._shards[shard].manifest.tensors:
                    raise InputError(shard, key, f"listed in {index.name} but absent from this shard")
                self._owner[key] = self._shards[shard]
            self._adopt_unlisted(index)
        except BaseException:
            self.close()
            raise
        facts = {"shards": str(len(self._shards))}
        meta = data.get("metadata")
        if isinstance(meta, dict) and type(meta.get("total_size")) is int:  # anything else is not quoted
            facts["index total_size"] = str(meta["total_size"])
        facts.update(merged_facts(s.manifest for s in self._shards.values()))
        tensors = {k: self._owner[k].manifest.tensors[k] for k in sorted(self._owner, key=natural_key)}
        self.manifest = Manifest(
            path=self.path, format=format_name, tensors=tensors, files=(self.path, *self._shards), facts=facts,
        )

    def _adopt_unlisted(self, index: Path) -> None:
        """Loaders that read every shard whole (transformers' from_pretrained) load what a shard holds, not what
        the index lists: a tensor the index leaves out is part of the checkpoint, and one the index maps to
        another shard is two copies of which the loader keeps whichever it reads last."""
        for path, shard in self._shards.items():
            for key in shard.manifest.tensors:
                owner = self._owner.setdefault(key, shard)
                if owner is not shard:
                    other = next(p for p, s in self._shards.items() if s is owner)
                    raise InputError(path, key, f"also held by {Path(other).name}, where {index.name} maps it: "
                                                "loaders that read every shard whole keep whichever copy they "
                                                "read last")

    def _shard(self, key: str) -> Checkpoint:
        shard = self._owner.get(key)
        if shard is None:
            raise InputError(self.path, key, "no such tensor in the checkpoint")
        return shard

    def load(self, key: str) -> torch.Tensor:
        return self._shard(key).load(key)

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._shard(key).read_rows(key, start, stop, out)

    def verify(self, key: str) -> None:
        self._shard(key).verify(key)

    def records(self, key: str) -> dict[str, int]:
        return self._shard(key).records(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def shard_path(index: Path, key: str, name: str) -> str:
    """A weight_map file name, refused if it points outside the index's folder.

    The test is lexical, not resolved: Hugging Face caches keep shards as symlinks into a blobs folder.
    """
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or "\\" in name:
        raise UnsafeInputError(
            index, f"weight_map[{key}]", f"names {name!r}, a path outside the checkpoint folder", culprit=name,
        )
    return str(index.parent / candidate)
