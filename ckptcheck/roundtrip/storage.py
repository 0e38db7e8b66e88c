"""What the round trip's ranks read a DCP folder through: never torch's own unpickling.

torch's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with ``pickle.load`` and
``DefaultLoadPlanner.load_bytes`` unpickles every bytes entry with ``torch.load(weights_only=False)``:
either runs whatever a hostile checkpoint names.  Here ``.metadata`` is the allowlisted read of
``ckptcheck.formats.dcp`` (its validated items, turned into torch's own ``Metadata``), and each bytes
entry is unpickled through the torch allowlist, as is each tensor chunk's record (by ckptcheck's archive
reader, where torch would call ``torch.load(weights_only=True)``).  The objects checked are the objects
loaded, so nothing is unpickled twice and nothing can be swapped in between.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from .. import dtypes
from ..errors import InputError
from ..files import open_binary
from ..formats.base import read_exact
from ..formats.dcp import Chunk, Item, read_chunk, read_metadata
from ..formats.torch_pickle import TensorRef, _Dtype
from ..safe_pickle import AttrDict
from ..formats.torchzip import ZIP_MAGIC, TorchArchive


def torch_metadata(items: dict[str, Item], version: str | None) -> Metadata:
    """torch's ``Metadata`` for items that ``formats.dcp.read_metadata`` has already validated."""
    state: dict[str, Any] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for fqn, item in items.items():
        if item.info is None:
            state[fqn] = BytesStorageMetadata()
        else:
            chunks = [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in item.chunks]
            state[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtypes.to_torch(item.info.dtype)),
                                               torch.Size(item.info.shape), chunks)
        for chunk in item.chunks:
            storage[_index(item, chunk)] = _StorageInfo(chunk.file, chunk.start, chunk.length)
    planner = {fqn: item.path for fqn, item in items.items()}
    return Metadata(state, planner_data=planner, storage_data=storage, storage_meta=StorageMeta(), version=version)


def open_dcp(folder: str | Path) -> tuple[dict[str, Item], SafeFileSystemReader]:
    """Read ``.metadata`` once, through the allowlist: its items, and the reader that loads them."""
    items, facts = read_metadata(Path(folder))
    version = facts["dcp metadata version"]
    return items, SafeFileSystemReader(folder, items, None if version == "none" else version)


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` that unpickles nothing with torch: its metadata is the allowlisted read,
    and its chunks are read by ckptcheck's archive reader at the places that read validated.

    ``read_metadata`` takes no ``rank`` keyword on purpose: torch then never falls back to a rank-local
    ``__<rank>.metadata`` that ckptcheck has not read.
    """

    def __init__(self, path: str | Path, items: dict[str, Item], version: str | None) -> None:
        super().__init__(path)
        self._metadata = torch_metadata(items, version)
        self._chunks = {_index(item, chunk): (item, chunk) for item in items.values() for chunk in item.chunks}

    def read_metadata(self, *args: Any) -> Metadata:  # type: ignore[override]
        self._metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """torch's ``read_data`` without ``torch.load``: each chunk is opened as a torch.save blob by
        ckptcheck's archive reader, at the place and with the shape and dtype the metadata gave."""
        by_file: dict[str, list[ReadItem]] = {}
        for req in plan.items:
            by_file.setdefault(self._chunks[req.storage_index][1].file, []).append(req)
        for rel, reqs in by_file.items():
            where = Path(self.path) / rel
            with open_binary(where, self.path) as f:
                for req in reqs:
                    item, chunk = self._chunks[req.storage_index]
                    if req.type == LoadItemType.BYTE_IO:
                        data = read_exact(f, chunk.start, chunk.length, path=str(where), item=item.fqn)
                        planner.load_bytes(req, io.BytesIO(data.numpy().tobytes()))
                        continue
                    tensor = narrow_tensor_by_index(read_chunk(f, where, item, chunk), req.storage_offsets,
                                                    req.lengths)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise InputError(where, item.fqn, f"chunk rows {list(tensor.size())} do not fit the "
                                         f"{list(target.size())} the model expects")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done


def _index(item: Item, chunk: Chunk) -> MetadataIndex:
    return MetadataIndex(item.fqn) if item.info is None else MetadataIndex(item.fqn, chunk.offsets)


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose bytes entries go through the torch allowlist, not ``torch.load``."""

    def __init__(self, where: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = str(where)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = load_bytes_entry(value.getvalue(), where=f"{self.where}@{fqn}", item=fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load_bytes_entry(data: bytes, *, where: str, item: str) -> Any:
    """A DCP bytes entry (a ``torch.save`` blob) unpickled through the allowlist, its tensors read."""
    if not data.startswith(ZIP_MAGIC):
        raise InputError(where, item, "bytes entry is not a torch.save blob")
    archive = TorchArchive(io.BytesIO(data), path=where, base=0, length=len(data))  # type: ignore[arg-type]
    return _materialize(archive, archive.obj, item)


def _materialize(archive: TorchArchive, obj: Any, item: str) -> Any:
    """The unpickled records as the values torch would have built: tensors for tensor records, torch
    dtypes for dtype markers; containers keep their type."""
    if isinstance(obj, TensorRef):
        return archive.read(item, obj)
    if isinstance(obj, _Dtype):
        return dtypes.to_torch(str(obj))
    if isinstance(obj, dict):
        values = ((k, _materialize(archive, v, item)) for k, v in obj.items())
        return OrderedDict(values) if isinstance(obj, AttrDict) else dict(values)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(archive, v, item) for v in obj)
    return obj
