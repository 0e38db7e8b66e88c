"""torch.distributed.checkpoint directories: ``.metadata`` through an allowlist, chunks on demand.

``.metadata`` is a pickle that torch itself opens with ``pickle.load``; here it is unpickled into
stand-in records (never torch's classes) and validated: every chunk inside its tensor, chunks covering
each tensor exactly, storage files inside the folder and long enough for the ranges they are said to hold.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import dtypes
from ..errors import InputError, UnsafeInputError
from ..manifest import Manifest, TensorInfo
from ..safe_pickle import MAX_RANK, Frozen, Function, Sized, is_index, safe_loads
from ..files import open_binary
from .base import Checkpoint, check_rows, split_sections
from .torch_pickle import TORCH_VALUES, TensorRef, _Dtype, weights_only_facts
from .torchzip import ZIP_MAGIC, TorchArchive, single_tensor_ref

if TYPE_CHECKING:
    import torch

METADATA_NAME = ".metadata"
# The reader's bounds: name -> (value, why).
LIMITS: dict[str, tuple[int, str]] = {
    "metadata bytes": (512 << 20, ".metadata is one pickle read whole; a 100,000-tensor run's is tens of MB"),
    "relative path": (4096, "a storage file name is a path inside the folder: Linux's PATH_MAX"),
    "open archives": (64, "parsed chunk blobs kept while a tensor is read in row ranges, so memory does not grow "
                          "with the number of chunks"),
    "open files": (64, "data files kept open: a DCP written by thousands of ranks has more files than a process "
                       "may hold open"),
    "pairwise overlap chunks": (512, "chunks of a layout that is no grid are compared pairwise (quadratic); a "
                                     "tensor with more is refused"),
}
MAX_METADATA = LIMITS["metadata bytes"][0]
MAX_RELATIVE_PATH = LIMITS["relative path"][0]
MAX_OPEN_ARCHIVES = LIMITS["open archives"][0]
MAX_OPEN_FILES = LIMITS["open files"][0]
MAX_CHUNKS_FOR_OVERLAP_CHECK = LIMITS["pairwise overlap chunks"][0]


class _Record(metaclass=Frozen):
    """Stand-in for DCP's dataclasses: accepts NEWOBJ and BUILD, keeps the state as attributes.  The
    classes themselves cannot be changed (``Frozen``): BUILD reaches instances only, fresh per load."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise ValueError(f"{type(self).__name__} state is a {type(state).__name__}")
        self.__dict__.update(state)


class _Metadata(_Record):
    pass


class _TensorStorage(_Record):
    pass


class _BytesStorage(_Record):
    pass


class _Chunk(_Record):
    pass


class _StorageMeta(_Record):
    pass


class _StorageInfo(_Record):
    pass


class _TensorProperties(_Record):
    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:  # torch >= 2.1 packs a tuple
            self.__dict__["dtype"] = state[0]
        else:
            super().__setstate__(state)


class _MetadataIndex(_Record):
    def __hash__(self) -> int:
        return hash(_index_key(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _MetadataIndex) and _index_key(self) == _index_key(other)


def _index_key(index: _MetadataIndex) -> tuple[Any, ...]:
    """What a MetadataIndex is looked up by: (fqn, offsets).  A malformed one (offsets a string, a list of
    lists) is a key of its own, equal to no other, so unpickling goes on and ``read_metadata`` names it."""
    key = (index.__dict__.get("fqn"), index.__dict__.get("offset"))
    try:
        key = (key[0], _as_tuple(key[1]))
        hash(key)
    except (ValueError, TypeError):
        return ("malformed", id(index))
    return key


def _as_tuple(value: Any) -> tuple[int, ...] | None:
    """Offsets or sizes as a tuple (a torch.Size unpickles to one); anything but a sequence is malformed."""
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    raise ValueError(f"offsets or sizes are a {type(value).__name__}, not a sequence")


def _path(sep: str) -> Sized:
    """A pathlib path as a string.  Only strings are joined (a ``str()`` of anything else costs what the
    pickle chooses), and the join is charged to the load's budget: one long string named many times
    joins to far more than the pickle holds."""
    def join(*parts: Any) -> str:
        if not all(isinstance(p, str) for p in parts):
            raise ValueError("a path part is not a string")
        return sep.join(parts)

    return Sized(join, lambda *parts: sum(len(p) for p in parts if isinstance(p, str)))


def _allowlist() -> dict[tuple[str, str], Any]:
    md = "torch.distributed.checkpoint.metadata"
    table = dict(TORCH_VALUES)
    table.update({
        (md, "Metadata"): _Metadata,
        (md, "TensorStorageMetadata"): _TensorStorage,
        (md, "BytesStorageMetadata"): _BytesStorage,
        (md, "ChunkStorageMetadata"): _Chunk,
        (md, "TensorProperties"): _TensorProperties,
        (md, "StorageMeta"): _StorageMeta,
        (md, "MetadataIndex"): _MetadataIndex,
        (md, "_MEM_FORMAT_ENCODING"): _MEM_FORMAT,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
        # torch < 2.2 pickled TensorProperties from the sharded-tensor module.
        ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"): _TensorProperties,
        ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"): _MEM_FORMAT,
        ("pathlib", "PosixPath"): _path("/"),
        ("pathlib", "PurePosixPath"): _path("/"),
        ("pathlib", "WindowsPath"): _path("\\"),
        ("pathlib", "PureWindowsPath"): _path("\\"),
    })
    return table


def _mem_format(value: Any) -> int:
    if not is_index(value) or value > 16:
        raise ValueError("unknown memory format encoding")
    return value


_MEM_FORMAT = Function(_mem_format)


DCP_ALLOWLIST = _allowlist()


@dataclass(frozen=True, slots=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative to the checkpoint folder
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class Item:
    fqn: str
    path: tuple[str, ...]
    info: TensorInfo | None  # None for a bytes item
    chunks: tuple[Chunk, ...]


def read_metadata(folder: Path) -> tuple[dict[str, Item], dict[str, str]]:
    """Parse and validate ``.metadata``; returns items by fqn and facts about the checkpoint."""
    meta_path = folder / METADATA_NAME
    with open_binary(meta_path, folder) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_METADATA:
            raise InputError(meta_path, None, f"{size} bytes exceeds the {MAX_METADATA} byte limit")
        data = f.read()
    if not data:
        raise InputError(meta_path, None, "file is empty")
    where = str(meta_path)
    meta = safe_loads(data, path=where, member="pickle", allowed=DCP_ALLOWLIST)
    if not isinstance(meta, _Metadata):
        raise InputError(where, None, f"holds a {type(meta).__name__}, not DCP Metadata")
    sdm = meta.__dict__.get("state_dict_metadata")
    storage = meta.__dict__.get("storage_data") or {}
    planner = meta.__dict__.get("planner_data") or {}
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise InputError(where, None, "Metadata lacks state_dict_metadata or storage_data")
    if not isinstance(planner, dict):
        raise InputError(where, "planner_data", f"is a {type(planner).__name__}, not a dict of key paths")
    by_index: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for index, info in storage.items():
        if not isinstance(index, _MetadataIndex) or not isinstance(info, _StorageInfo) \
                or not isinstance(index.__dict__.get("fqn"), str):
            raise InputError(where, "storage_data", "entries are not MetadataIndex -> _StorageInfo")
        fqn, offset = _index_key(index)
        if fqn == "malformed" or not (offset is None or all(is_index(o) for o in offset)):
            shown = type(index.__dict__.get("offset")).__name__
            raise InputError(where, f"storage_data[{index.__dict__['fqn'][:200]}]",
                             f"MetadataIndex offset (a {shown}) is not a tuple of non-negative 64-bit integers")
        by_index[(fqn, offset)] = info
    file_sizes: dict[str, int] = {}
    items: dict[str, Item] = {}
    for fqn, entry in sdm.items():
        if not isinstance(fqn, str):
            raise InputError(where, repr(fqn), "state_dict_metadata key is not a string")
        path = _planner_path(where, fqn, planner.get(fqn))
        if isinstance(entry, _BytesStorage):
            info = by_index.get((fqn, None))
            if info is None:
                raise InputError(where, fqn, "bytes entry has no storage entry (storage_data) saying where it is")
            items[fqn] = Item(fqn, path, None, (_chunk(folder, where, fqn, (), (), info, file_sizes),))
        elif isinstance(entry, _TensorStorage):
            items[fqn] = _tensor_item(folder, where, fqn, path, entry, by_index, file_sizes)
        else:
            raise InputError(where, fqn, f"unknown storage metadata type {type(entry).__name__}")
    _check_distinct(where, items)
    version = _version(where, meta.__dict__.get("version"))
    # Before torch 2.4 DCP kept lists (param_groups) whole and recorded no version (pytorch #133923).
    whole_lists = any(it.info is None and it.path[-1] in ("param_groups",) for it in items.values())
    layout = "before torch 2.4 (no metadata version" + (", lists kept whole)" if whole_lists else ")") \
        if version is None else f"torch 2.4+ (metadata version {version})"
    facts = {"dcp metadata version": str(version or "none"), "dcp layout": layout,
             "dcp storage files": str(len(file_sizes))}
    return dict(sorted(items.items())), facts


def _check_distinct(where: str, items: dict[str, Item]) -> None:
    """Each key has its own place in the state dict and its own bytes in the storage files: DCP's writer
    never shares either, and torch would silently load one entry's data (or value) as another's."""
    paths: dict[tuple[str, ...], str] = {}
    for item in items.values():
        other = paths.setdefault(item.path, item.fqn)
        if other != item.fqn:
            raise InputError(where, item.fqn, f"planner_data gives it the path of {other}")
    spans = sorted((c.file, c.start, c.length, item.fqn) for item in items.values() for c in item.chunks if c.length)
    for (file, start, length, fqn), (file2, start2, _, fqn2) in zip(spans, spans[1:]):
        if file == file2 and start + length > start2:
            raise InputError(where, fqn2, f"its storage bytes {start2}.. in {file} overlap those of {fqn}")


def _version(where: str, version: Any) -> str | None:
    """DCP's metadata version: absent (before torch 2.4) or dotted numbers such as "1.0.0"."""
    if version is None:
        return None
    if not isinstance(version, str) or not re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}", version):
        shown = repr(version)[:40] if isinstance(version, str) else f"a {type(version).__name__}"
        raise InputError(where, "version", f"metadata version {shown} is not a dotted version number such as 1.0.0")
    return version


def _planner_path(where: str, fqn: str, path: Any) -> tuple[str, ...]:
    """The key's path in the saved state dict (``planner_data``, written by flatten_state_dict): names and
    list indices.  Absent, it is guessed from the dotted key; present, it must be such a path."""
    if path is None:
        return _guess_path(fqn)
    if not isinstance(path, (tuple, list)) or not path or not all(isinstance(p, str) or is_index(p) for p in path):
        shown = f"a {type(path).__name__}" + (" of that shape" if isinstance(path, (tuple, list)) else "")
        raise InputError(where, fqn, f"planner_data path is {shown}, not a sequence of names and indices")
    return tuple(str(p) for p in path)


def _guess_path(fqn: str) -> tuple[str, ...]:
    """A flattened key's path when the checkpoint records none (saved without flatten_state_dict):
    a model section's first component, an optimizer's (section, "state", parameter, field)."""
    from ..manifest import MODEL_SECTIONS, OPTIMIZER_SECTIONS

    head, _, rest = fqn.partition(".")
    if head in MODEL_SECTIONS and rest:
        return head, rest
    if head in OPTIMIZER_SECTIONS and rest.startswith("state.") and rest.count(".") >= 2:
        param, _, field = rest[len("state."):].rpartition(".")
        return head, "state", param, field
    if head in OPTIMIZER_SECTIONS and rest:
        return (head, *rest.split("."))
    return (fqn,)


def _tensor_item(folder: Path, where: str, fqn: str, path: tuple[str, ...], entry: _TensorStorage,
                 by_index: dict[Any, Any], file_sizes: dict[str, int]) -> Item:
    props = entry.__dict__.get("properties")
    dtype = props.__dict__.get("dtype") if isinstance(props, _TensorProperties) else None
    if not isinstance(dtype, _Dtype):
        raise InputError(where, fqn, "tensor without a known dtype")
    size = entry.__dict__.get("size")
    if not isinstance(size, tuple) or len(size) > MAX_RANK or not all(is_index(s) for s in size):
        raise InputError(where, fqn, "tensor size is not a tuple of non-negative 64-bit integers")
    listed = entry.__dict__.get("chunks")
    if not isinstance(listed, (list, tuple)):
        raise InputError(where, fqn, f"chunks is a {type(listed).__name__}, not a list of ChunkStorageMetadata")
    chunks: list[Chunk] = []
    for i, raw in enumerate(listed):
        if not isinstance(raw, _Chunk):
            raise InputError(where, fqn, f"chunk {i} is not a ChunkStorageMetadata")
        try:
            offsets, sizes = _as_tuple(raw.__dict__.get("offsets")), _as_tuple(raw.__dict__.get("sizes"))
        except ValueError as exc:
            raise InputError(where, fqn, f"chunk {i}: {exc}") from None
        if offsets is None or sizes is None or len(offsets) != len(size) or len(sizes) != len(size):
            raise InputError(where, fqn, f"chunk {i} has offsets/sizes of the wrong rank")
        if not all(is_index(v) for v in (*offsets, *sizes)):
            raise InputError(where, fqn, f"chunk {i} has offsets/sizes that are not non-negative 64-bit integers")
        if any(o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)):
            raise InputError(where, fqn, f"chunk {i} at {list(offsets)} of size {list(sizes)} lies outside {list(size)}")
        info = by_index.get((fqn, offsets))
        if info is None:
            raise InputError(where, fqn, f"chunk {i} at {list(offsets)} has no storage entry")
        chunk = _chunk(folder, where, fqn, offsets, sizes, info, file_sizes)
        need = math.prod(sizes) * dtypes.itemsize(str(dtype))
        if chunk.length < need:  # checked before anything is allocated for the tensor
            raise InputError(where, fqn, f"chunk {i} is stored in {chunk.length} bytes but needs {need}")
        chunks.append(chunk)
    _check_coverage(where, fqn, size, chunks)
    return Item(fqn, path, TensorInfo(fqn, size, str(dtype)), tuple(chunks))


# dcp.save(storage_writer=FileSystemWriter(..., serialization_format=SerializationFormat.SAFETENSORS)) writes
# each storage file as one safetensors file, every chunk at offset 0 of its data; FileSystemReader reads none.
SAFETENSORS_FORM = ("a safetensors file (dcp.save with SerializationFormat.SAFETENSORS): torch's FileSystemReader, "
                    "which dcp.load uses by default, torch.load()s every chunk and cannot read it")


def _chunk(folder: Path, where: str, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
           info: _StorageInfo, file_sizes: dict[str, int]) -> Chunk:
    rel = info.__dict__.get("relative_path")
    start, length = info.__dict__.get("offset"), info.__dict__.get("length")
    if not isinstance(rel, str) or not rel:
        raise InputError(where, fqn, "storage entry without a file name")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise UnsafeInputError(where, fqn, f"storage path {rel[:200]!r} points outside the checkpoint folder",
                               culprit=rel[:200])
    if len(rel) > MAX_RELATIVE_PATH or any(ord(c) < 32 for c in rel) or rel.endswith("/") or \
            any(p in ("", ".") for p in rel.split("/")):
        raise InputError(where, fqn, f"storage path {rel[:200]!r} is not a file name inside the folder "
                         "(control characters, empty or '.' parts, or too long)")
    if not all(is_index(v) for v in (start, length)):
        raise InputError(where, fqn, "storage offset/length are not non-negative integers")
    transforms = info.__dict__.get("transform_descriptors")
    if transforms:
        shown = repr(transforms)[:80] if isinstance(transforms, (str, list, tuple)) else f"a {type(transforms).__name__}"
        raise InputError(where, fqn, f"storage transforms {shown} are not supported")
    if rel not in file_sizes:
        try:
            if not (folder / rel).exists():
                raise InputError(folder / rel, None, f"storage file for {fqn} is missing")
            with open_binary(folder / rel, folder) as f:  # regular files inside the folder only (no FIFO, device, link out)
                file_sizes[rel] = os.fstat(f.fileno()).st_size
                head = f.read(9)
        except OSError as exc:  # a name too long for the file system, a folder on the path that is a file...
            raise InputError(where, fqn, f"storage file {rel[:80]!r} cannot be opened ({exc.strerror or exc})") from None
        if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < file_sizes[rel]:
            raise InputError(folder / rel, None, SAFETENSORS_FORM)
    if start + length > file_sizes[rel]:
        raise InputError(
            folder / rel, fqn, f"bytes {start}..{start + length} lie past the end of the {file_sizes[rel]} byte file",
        )
    return Chunk(offsets, sizes, rel, start, length)


def _check_coverage(where: str, fqn: str, size: tuple[int, ...], chunks: list[Chunk]) -> None:
    """The chunks cover the tensor exactly: as many elements as it has, and no two overlapping (then no
    gap is left either).  Row blocks (DCP's usual) and grids (row blocks split again by tensor parallelism)
    are checked in n log n; any other layout pairwise, up to MAX_CHUNKS_FOR_OVERLAP_CHECK chunks."""
    total = math.prod(size)
    covered = sum(math.prod(c.sizes) for c in chunks)
    if covered != total or (total and not chunks):
        raise InputError(where, fqn, f"chunks cover {covered} of {total} elements")
    filled = [c for c in chunks if math.prod(c.sizes)]
    if not filled or not size:
        return
    if _grid_overlap(where, fqn, size, filled):
        return
    if len(filled) > MAX_CHUNKS_FOR_OVERLAP_CHECK:
        raise InputError(where, fqn, f"{len(filled)} chunks that do not form a grid: more than the "
                         f"{MAX_CHUNKS_FOR_OVERLAP_CHECK} whose overlaps can be checked pairwise")
    for i, a in enumerate(filled):
        for b in filled[i + 1:]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)):
                raise _overlap(where, fqn, a, b)


def _grid_overlap(where: str, fqn: str, size: tuple[int, ...], chunks: list[Chunk]) -> bool:
    """True when every chunk is one cell of the grid that the chunks' own boundaries draw, no cell twice
    (raised as an overlap); False when some chunk spans several cells (not a grid)."""
    bounds = [{b: i for i, b in enumerate(sorted({c.offsets[d] for c in chunks} | {c.offsets[d] + c.sizes[d] for c in chunks}))}
              for d in range(len(size))]
    cells: dict[tuple[int, ...], Chunk] = {}
    for c in chunks:
        cell = tuple(bounds[d][o] for d, o in enumerate(c.offsets))
        if any(bounds[d][o + n] != cell[d] + 1 for d, (o, n) in enumerate(zip(c.offsets, c.sizes, strict=True))):
            return False
        other = cells.setdefault(cell, c)
        if other is not c:
            raise _overlap(where, fqn, other, c)
    return True


def _overlap(where: str, fqn: str, a: Chunk, b: Chunk) -> InputError:
    return InputError(where, fqn, f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap")


class DcpCheckpoint(Checkpoint):
    format_name = "dcp"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = str(folder)
        items, facts = read_metadata(self.folder)
        layout = split_sections((it.path, it.info) for it in items.values())
        self._items = {layout.names[it.path]: it for it in items.values() if it.info is not None}
        self._bytes_items = {".".join(it.path): it for it in items.values() if it.info is None}
        self._handles: OrderedDict[str, BinaryIO] = OrderedDict()
        # The chunk blobs read last, parsed and CRC-checked once while a tensor is read in row ranges; bounded,
        # so memory does not grow with the number of chunks (an evicted blob read again is checked again).
        self._archives: OrderedDict[tuple[str, int], TorchArchive] = OrderedDict()
        # chunks a read has checked (their CRC-32 where they keep one), kept when their archive leaves the LRU
        self._verified: set[tuple[str, int]] = set()
        # Every bytes entry is a pickle that dcp.load would unpickle: read each through the allowlist now,
        # so a payload anywhere in the folder makes the checkpoint unsafe, whichever checks run.
        refused: set[str] = set()
        try:
            for key in self._bytes_items:
                refused.update(self._archive(key).refused)
            for item in self._items.values():
                for chunk in item.chunks:
                    self._check_blob(item.fqn, chunk)
        except BaseException:
            self.close()
            raise
        facts.update(weights_only_facts(refused))
        if self._items:
            facts["checksums"] = "a CRC-32 per chunk (each a torch.save record)"
        files = tuple(sorted({str(self.folder / c.file) for it in items.values() for c in it.chunks}))
        self.manifest = Manifest(
            path=self.path, format=self.format_name, tensors=layout.model,
            files=(str(self.folder / METADATA_NAME), *files), nesting=layout.nesting, sections=layout.sections,
            extra_tensors=layout.extra, extra_entries=layout.others, facts=facts, extra_paths=layout.extra_paths,
        )

    def _handle(self, rel: str) -> BinaryIO:
        """The open data file, from a bounded set: a DCP written by thousands of ranks has thousands of
        files, more than a process may hold open.  Closing one drops the parsed blobs that read it."""
        h = self._handles.get(rel)
        if h is not None:
            self._handles.move_to_end(rel)
            return h
        h = self._handles[rel] = open_binary(self.folder / rel, self.folder)
        while len(self._handles) > MAX_OPEN_FILES:
            old, closing = self._handles.popitem(last=False)
            for place in [p for p in self._archives if p[0] == old]:
                del self._archives[place]
            closing.close()
        return h

    def _check_blob(self, fqn: str, chunk: Chunk) -> None:
        """A tensor chunk is a torch.save blob (which keeps a CRC-32): torch's FileSystemReader torch.load()s
        every one, so dcp.load refuses a chunk of raw bytes, and so does this reader."""
        f = self._handle(chunk.file)
        f.seek(chunk.start)
        if f.read(4) != ZIP_MAGIC:
            raise InputError(self.folder / chunk.file, fqn, f"chunk at {list(chunk.offsets)} (byte {chunk.start}) is "
                             "not a torch.save blob: torch's FileSystemReader torch.load()s every tensor chunk")

    def load_value(self, key: str) -> Any:
        """A bytes entry: DCP stores each as a torch.save blob, read here through the allowlist.  A one-element
        tensor in it, alone or in a tuple or list (AdamW's documented tensor lr and betas), is read as its
        number, as torch's optimizer uses it."""
        archive = self._archive(key)
        obj = archive.obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(_number_of(archive, key, v) for v in obj)
        return _number_of(archive, key, obj)

    def _archive(self, key: str) -> TorchArchive:
        item = self._bytes_items.get(key)
        if item is None or not item.chunks:
            raise InputError(self.path, key, "no such value in the checkpoint")
        chunk = item.chunks[0]
        f = self._handle(chunk.file)
        f.seek(chunk.start)
        if f.read(4) != ZIP_MAGIC:
            raise InputError(self.folder / chunk.file, key, "bytes entry is not a torch.save blob")
        try:
            return TorchArchive(f, path=f"{self.folder / chunk.file}@{chunk.start}", base=chunk.start,
                                length=chunk.length)
        except InputError as exc:  # name the entry, not only its place in the file
            raise InputError(self.folder / chunk.file, key, f"bytes entry at {chunk.start}: {exc.cause}") from None

    def _item(self, key: str) -> Item:
        item = self._items.get(key)
        if item is None or item.info is None:
            raise InputError(self.path, key, "no such tensor in the checkpoint")
        return item

    def load(self, key: str) -> torch.Tensor:
        item = self._item(key)
        assert item.info is not None
        if not item.info.shape:
            return self._read_chunk(item, item.chunks[0], None)
        return self.read_rows(key, 0, item.info.shape[0])

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of the tensor assembled from the chunks that overlap them, each read only in part."""
        import torch

        item = self._item(key)
        info = item.info
        assert info is not None
        check_rows(self.path, key, info.shape, start, stop)
        shape = (stop - start, *info.shape[1:])
        nbytes = math.prod(shape) * dtypes.itemsize(info.dtype)
        if out is not None and out.numel() >= nbytes and nbytes:
            result = out[:nbytes].view(dtypes.to_torch(info.dtype)).view(shape)
        else:
            result = torch.empty(shape, dtype=dtypes.to_torch(info.dtype))
        flat = result.reshape(-1).view(torch.uint8) if nbytes else None
        row_bytes = nbytes // max(1, stop - start)
        for chunk in item.chunks:
            lo, hi = max(start, chunk.offsets[0]), min(stop, chunk.offsets[0] + chunk.sizes[0])
            if lo >= hi:
                continue
            rows = (lo - chunk.offsets[0], hi - chunk.offsets[0])
            if flat is not None and all(o == 0 for o in chunk.offsets[1:]) and chunk.sizes[1:] == info.shape[1:]:
                # The chunk spans whole rows: read its bytes straight into their place in the result.
                target = flat[(lo - start) * row_bytes:(hi - start) * row_bytes]
                piece = self._read_chunk(item, chunk, rows, target)
                if piece.data_ptr() != target.data_ptr():
                    result[lo - start:hi - start] = piece
                continue
            piece = self._read_chunk(item, chunk, rows)
            region = (slice(lo - start, hi - start), *(
                slice(o, o + n) for o, n in zip(chunk.offsets[1:], chunk.sizes[1:], strict=True)))
            result[region] = piece
        return result

    def verify(self, key: str) -> None:
        """Each chunk not yet read: an empty row range (one element of a 0-d value), which checks the record."""
        item = self._item(key)
        for chunk in item.chunks:
            if (chunk.file, chunk.start) not in self._verified:
                self._read_chunk(item, chunk, (0, 0) if chunk.sizes else None)

    def _read_chunk(self, item: Item, chunk: Chunk, rows: tuple[int, int] | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        piece = read_chunk(self._handle(chunk.file), self.folder / chunk.file, item, chunk, rows, out, self._archives)
        self._verified.add((chunk.file, chunk.start))
        return piece

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        self._archives.clear()


def read_chunk(f: BinaryIO, where: str | os.PathLike[str], item: Item, chunk: Chunk,
               rows: tuple[int, int] | None = None, out: torch.Tensor | None = None,
               archives: OrderedDict[tuple[str, int], TorchArchive] | None = None) -> torch.Tensor:
    """A chunk, or rows of it, from its open data file: a torch.save blob (its record's CRC-32 checked on
    every read, rows too; the reader refused any other chunk when it opened the checkpoint).
    ``archives`` keeps each blob's parsed archive across reads, so its CRC is checked once.  Never
    unpickles with torch; errors name the tensor and the chunk."""
    assert item.info is not None
    where = str(where)
    try:
        return _read_chunk(f, where, item, chunk, rows, out, OrderedDict() if archives is None else archives)
    except InputError as exc:
        raise InputError(where, item.fqn, f"chunk at {list(chunk.offsets)}: {exc.cause}") from None


def _read_chunk(f: BinaryIO, where: str, item: Item, chunk: Chunk, rows: tuple[int, int] | None,
                out: torch.Tensor | None, archives: OrderedDict[tuple[str, int], TorchArchive]) -> torch.Tensor:
    assert item.info is not None
    dtype = item.info.dtype
    place = (chunk.file, chunk.start)
    archive = archives.get(place)
    if archive is None:
        archive = archives[place] = TorchArchive(f, path=f"{where}@{chunk.start}", base=chunk.start,
                                                 length=chunk.length)
        while len(archives) > MAX_OPEN_ARCHIVES:
            archives.popitem(last=False)
    else:
        archives.move_to_end(place)
    ref = single_tensor_ref(archive, item.fqn)
    if ref.shape != chunk.sizes or ref.dtype != dtype:
        raise InputError(where, item.fqn, f"chunk holds {ref.dtype}{list(ref.shape)}, metadata says "
                         f"{dtype}{list(chunk.sizes)}")
    return archive.read(item.fqn, ref, rows, out)


def _number_of(archive: TorchArchive, key: str, value: Any) -> Any:
    if isinstance(value, TensorRef) and value.numel == 1:
        return archive.read(key, value).item()
    return value
