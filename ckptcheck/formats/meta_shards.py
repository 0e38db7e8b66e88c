"""Meta's model-parallel releases: ``consolidated.00.pth`` ... ``consolidated.NN.pth`` in one folder.

Each file holds a slice of every split tensor.  Meta splits wq/wk/wv/w1/w3/output on dim 0 (column
parallel), wo/w2 on dim 1 (row parallel), replicates the norms, and splits tok_embeddings on dim 1
(Llama 1/2) or dim 0 (Llama 3).  The manifest shows the merged tensors; ``load`` concatenates slices.

A replicated tensor is read from shard 0 only once every shard's copy is bit-identical to it: Meta's
code loads each rank its own copy, so copies that differ are not one tensor, and reading it as one
(a conversion, a diff) is refused, naming the key and the shards, rather than keeping one silently.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import itemsize
from ..errors import InputError
from ..manifest import Manifest, TensorInfo
from ..naming import map_keys, role_of
from .base import Checkpoint, check_rows, merged_facts, row_chunks
from .torchzip import TorchFileCheckpoint

if TYPE_CHECKING:
    import torch

# Bytes compared per step when checking a replicated tensor's copies: bounds memory, not the tensor.
COMPARE_BYTES = 1 << 26
MAX_DIM = (1 << 63) - 1  # torch's int64 sizes
# A shard's name; \d (any Unicode decimal digit) so that a name int() would misread is found and refused.
SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
_SPLIT_DIM = {
    "layers.{i}.attention.wq.weight": 0, "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0, "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w3.weight": 0, "output.weight": 0,
    "layers.{i}.attention.wo.weight": 1, "layers.{i}.feed_forward.w2.weight": 1,
}


def split_dim(canonical_key: str | None, shape: tuple[int, ...], model_dim: int | None, shards: int) -> int | None:
    """The dimension Meta splits this tensor on across ``shards`` files, or None if replicated.

    ``shape`` is the full tensor's shape when writing and a shard's shape when reading: either way
    only tok_embeddings needs it, to tell a dim-1 split (Llama 1/2) from a dim-0 split (Llama 3).
    """
    if shards == 1 or canonical_key is None:
        return None
    role = role_of(canonical_key)
    if role == "tok_embeddings.weight" and len(shape) == 2:
        return 1 if model_dim is not None and shape[1] != model_dim else 0
    dim = _SPLIT_DIM.get(role)
    return dim if dim is not None and dim < len(shape) else None


def shard_files(folder: Path) -> list[Path]:
    """The shard files in the order Meta's loader takes them, ``sorted(Path(dir).glob("*.pth"))[rank]`` with
    the count asserted equal to the world size, or [] when the folder holds no shard.  Each rank's file must
    be numbered its rank: a name sorting elsewhere ("002" before "01"), numbered in other digits ("١", which
    int() reads as 1) or another *.pth beside the shards would make Meta's loader load a different file, or
    fail, so it is refused by name rather than read in an order Meta's loader does not."""
    files = sorted(folder.glob("*.pth"))
    if not any(SHARD_RE.match(p.name) for p in files):
        return []
    for rank, p in enumerate(files):
        if not (m := SHARD_RE.match(p.name)):
            raise InputError(p, None, "a *.pth file beside model-parallel shards: Meta's loader takes "
                                      "sorted(glob('*.pth'))[rank], so it would load it as a shard")
        if not m.group(1).isascii():
            raise InputError(p, None, "numbered in digits other than ASCII 0-9: not a model-parallel shard name")
        if int(m.group(1)) != rank:
            raise InputError(p, None, f"numbered {int(m.group(1))}, but Meta's loader (sorted(glob('*.pth'))[rank]) "
                                      f"loads it as rank {rank}: the shard names are not in Meta's order")
    return files


class MetaShardsCheckpoint(Checkpoint):
    format_name = "meta-shards"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = str(folder)
        files = shard_files(self.folder)
        self._shards: list[TorchFileCheckpoint] = []
        try:
            for p in files:
                self._shards.append(TorchFileCheckpoint(p, self.folder))
            tensors, self._dims, facts = self._merge()
            self._copies: dict[str, tuple[str, ...]] = {}
            self._duplicates: dict[str, tuple[str, ...]] = {}
        except BaseException:
            self.close()
            raise
        self.manifest = Manifest(
            path=self.path, format=self.format_name, tensors=tensors, files=tuple(str(p) for p in files), facts=facts,
        )

    def _merge(self) -> tuple[dict[str, TensorInfo], dict[str, int | None], dict[str, str]]:
        first = self._shards[0].manifest
        for shard in self._shards[1:]:
            if set(shard.manifest.tensors) != set(first.tensors):
                diff = sorted(set(shard.manifest.tensors) ^ set(first.tensors))
                raise InputError(shard.path, diff[0], "key set differs from consolidated.00.pth")
        mapping = map_keys(first.tensors)
        norm = first.tensors.get(mapping.stored_for("norm.weight") or "norm.weight")
        dim = norm.shape[0] if norm is not None and len(norm.shape) == 1 else None
        facts = {"model-parallel shards": str(len(self._shards)), **merged_facts(s.manifest for s in self._shards)}
        tensors: dict[str, TensorInfo] = {}
        dims: dict[str, int | None] = {}
        n = len(self._shards)
        for key, info in first.tensors.items():
            canonical = mapping.canonical.get(key)
            split = split_dim(canonical, info.shape, dim, n)
            if canonical == "tok_embeddings.weight" and split is not None:
                facts["tok_embeddings split"] = "dim 1 (Llama 1/2)" if split == 1 else "dim 0 (Llama 3)"
            pieces = [s.manifest.tensors[key] for s in self._shards]
            for p in pieces:
                if p.dtype != info.dtype:
                    raise InputError(self.path, key, f"dtype differs between shards ({info.dtype} vs {p.dtype})")
            if split is None:
                if any(p.shape != info.shape for p in pieces):
                    raise InputError(self.path, key, "replicated tensor has different shapes in different shards")
                shape = info.shape
            else:
                others = [tuple(d for j, d in enumerate(p.shape) if j != split) for p in pieces]
                if len(set(others)) != 1:
                    raise InputError(self.path, key, f"shards disagree outside the split dimension {split}")
                shape = tuple(sum(p.shape[split] for p in pieces) if j == split else d for j, d in enumerate(info.shape))
                if shape[split] > MAX_DIM:
                    raise InputError(self.path, key, f"its slices add up to {shape[split]} along the split dimension "
                                                     f"{split}: more than a tensor dimension holds (2**63 - 1)")
            tensors[key] = TensorInfo(key, shape, info.dtype)
            dims[key] = split
        return tensors, dims, facts

    def _split(self, key: str) -> int | None:
        if key not in self._dims:
            raise InputError(self.path, key, "no such tensor in the checkpoint")
        return self._dims[key]

    def replicated(self) -> list[str]:
        """Keys every shard holds a whole copy of (none when there is one shard: nothing to compare)."""
        return [k for k, d in self._dims.items() if d is None] if len(self._shards) > 1 else []

    def split(self) -> list[str]:
        """Keys each shard holds its own slice of (none when there is one shard)."""
        return [k for k, d in self._dims.items() if d is not None] if len(self._shards) > 1 else []

    def duplicated_slices(self, key: str) -> tuple[str, ...]:
        """The shard files whose slice of split ``key`` is bit-identical to an earlier shard's: a shard copied
        under another's name, every rank then loading rank 0's weights.  () for a replicated tensor, and for
        constant slices (a copy cannot be told from a constant tensor)."""
        if self._split(key) is None:
            return ()
        if key not in self._duplicates:
            seen: set[bytes] = set()
            dup = []
            for shard in self._shards:
                digest = self._digest(shard, key)
                if digest is not None and digest in seen:
                    dup.append(Path(shard.path).name)
                elif digest is not None:
                    seen.add(digest)
            self._duplicates[key] = tuple(dup)
        return self._duplicates[key]

    def _digest(self, shard: TorchFileCheckpoint, key: str) -> bytes | None:
        """A hash of ``shard``'s slice of ``key``, read in bounded row ranges; None if every element is the same."""
        import torch

        info = shard.manifest.tensors[key]
        size = itemsize(info.dtype)
        hasher = hashlib.blake2b(digest_size=16)
        first: torch.Tensor | None = None
        constant = True
        for lo, hi in row_chunks(info.shape[0], info.nbytes, COMPARE_BYTES):
            rows = shard.read_rows(key, lo, hi).contiguous()
            elements = rows.reshape(-1).view(torch.uint8).view(-1, size)
            if not len(elements):
                continue
            hasher.update(elements.numpy())
            first = elements[0] if first is None else first
            constant = constant and bool((elements == first).all())
        return None if constant else hasher.digest()

    def differing_copies(self, key: str) -> tuple[str, ...]:
        """The shard files whose copy of replicated ``key`` is not bit-identical to consolidated.00.pth's
        (compared in bounded row ranges); () for a split tensor, or when every copy is the same."""
        if self._split(key) is not None:
            return ()
        if key not in self._copies:
            self._copies[key] = tuple(Path(s.path).name for s in self._shards[1:] if not self._same_copy(s, key))
        return self._copies[key]

    def _same_copy(self, shard: TorchFileCheckpoint, key: str) -> bool:
        from ..bits import first_difference

        first = self._shards[0]
        info = first.manifest.tensors[key]
        if not info.shape:
            return first_difference(first.load(key), shard.load(key)) is None
        return all(first_difference(first.read_rows(key, lo, hi), shard.read_rows(key, lo, hi)) is None
                   for lo, hi in row_chunks(info.shape[0], info.nbytes, COMPARE_BYTES))

    def verify(self, key: str) -> None:
        """Every shard's slice or copy of ``key``."""
        for shard in self._shards:
            shard.verify(key)

    def records(self, key: str) -> dict[str, int]:
        return {name: n for shard in self._shards for name, n in shard.records(key).items()}

    def _replicated(self, key: str) -> TorchFileCheckpoint:
        """Shard 0, whose copy of ``key`` stands for all only when they are all the same."""
        differ = self.differing_copies(key)
        if differ:
            raise InputError(self.path, key, f"the copies of this replicated tensor differ between shards "
                             f"({', '.join(differ)} vs consolidated.00.pth): Meta's code loads each rank its own "
                             "copy, and merging them into one tensor would keep one silently")
        return self._shards[0]

    def load(self, key: str) -> torch.Tensor:
        import torch

        split = self._split(key)
        if split is None:
            return self._replicated(key).load(key)
        return torch.cat([s.load(key) for s in self._shards], dim=split)

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of the merged tensor: from the shards that hold them (dim-0 splits), or the same rows
        of every shard side by side (dim-1 splits)."""
        import torch

        split = self._split(key)
        check_rows(self.path, key, self.manifest.tensors[key].shape, start, stop)
        if split is None:
            return self._replicated(key).read_rows(key, start, stop, out)
        if split == 1:
            return torch.cat([s.read_rows(key, start, stop) for s in self._shards], dim=1)
        pieces, offset = [], 0
        for shard in self._shards:
            rows = shard.manifest.tensors[key].shape[0]
            lo, hi = max(start, offset), min(stop, offset + rows)
            if lo < hi:
                pieces.append(shard.read_rows(key, lo - offset, hi - offset))
            offset += rows
        if not pieces:  # an empty row range
            return self._shards[0].read_rows(key, 0, 0)
        return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]

    def close(self) -> None:
        for s in self._shards:
            s.close()
