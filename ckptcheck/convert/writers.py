"""Output formats, each written one chunk at a time from a ``ChunkSource``.

- torch: a zip archive laid out as ``torch.save`` lays it out (records aligned to 64 bytes, data.pkl
  last), so ``torch.load(weights_only=True)`` and ``mmap=True`` read it; streamed, unlike torch.save.
- safetensors: header first (every offset is known from the plan), then the bytes; sharded with a
  ``model.safetensors.index.json`` past a size limit.
- dcp: the real ``torch.distributed.checkpoint.save`` with a planner that splits large tensors into
  row chunks and reads each chunk only when DCP asks for it.
"""

from __future__ import annotations

import functools
import json
import pickle
import struct
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import dtypes
from ..errors import CkptError
from .plan import ConversionPlan, TensorMove
from .stream import ChunkSource, as_bytes

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]  # called with bytes written
ALIGN = 64
HF_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size


def nest(keys_to_values: dict[str, Any], nesting: str | None) -> dict[str, Any]:
    return {nesting: keys_to_values} if nesting else keys_to_values


# --- torch zip -------------------------------------------------------------------------------------

class _Storage:
    def __init__(self, key: str, dtype: str, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as torch.save pickles a tensor: a rebuild call over a persistent storage id."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> Any:
        import torch

        stride = []
        acc = 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        stride = tuple(reversed(stride))
        args = (self.storage, 0, torch.Size(self.shape), stride, False, OrderedDict())
        if self.storage.dtype in _LEGACY_STORAGE:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, (*args, dtypes.to_torch(self.storage.dtype))


_LEGACY_STORAGE = {v: k for k, v in dtypes.STORAGE_CLASS_DTYPE.items() if k != "UntypedStorage"}


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, _Storage):
            legacy = _LEGACY_STORAGE.get(obj.dtype)
            if legacy is not None:
                return ("storage", getattr(torch, legacy), obj.key, "cpu", obj.numel)
            return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.numel * dtypes.itemsize(obj.dtype))
        return None


class TorchZipWriter:
    def __init__(self, path: Path, nesting: str | None = None, archive_name: str | None = None) -> None:
        self.path = path
        self.nesting = nesting
        # torch names the archive's folder after the file (consolidated.pth -> consolidated/)
        self.prefix = ((archive_name or path.name).split(".")[0] or "archive") + "/"

    def write(self, plan: ConversionPlan, source: ChunkSource, progress: Progress) -> None:
        stubs: dict[str, _Tensor] = {}
        with open(self.path, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for i, move in enumerate(plan.written):
                numel = move.nbytes // dtypes.itemsize(move.dst_dtype)
                stubs[move.dst_key] = _Tensor(_Storage(str(i), move.dst_dtype, numel), move.shape)
                info = self._aligned_info(zf, f"{self.prefix}data/{i}", move.nbytes)
                with zf.open(info, "w", force_zip64=move.nbytes > zipfile.ZIP64_LIMIT // 2) as out:
                    for _, chunk in source.chunks(move):
                        out.write(as_bytes(chunk))
                        progress(chunk.numel() * chunk.element_size())
            for move in plan.moves:
                if move.alias_of is not None:
                    stubs[move.dst_key] = stubs[move.alias_of]
            ordered = {m.dst_key: stubs[m.dst_key] for m in plan.moves}
            tree = nest(ordered, self.nesting)
            tree.update(_replace_leaves(plan.state or {}, lambda m: stubs[m.dst_key]))
            buf = _pickle_bytes(tree)
            records = [("data.pkl", buf), (".format_version", b"1"), (".storage_alignment", b"64"),
                       ("byteorder", b"little"), ("version", b"3\n"),
                       (".data/serialization_id", str(uuid.uuid4().int)[:20].encode())]
            for name, data in records:
                info = self._aligned_info(zf, self.prefix + name, len(data))
                with zf.open(info, "w") as out:
                    out.write(data)

    @staticmethod
    def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
        """A ZipInfo whose data will start on a 64-byte boundary, padded the way torch pads ("FB" extra)."""
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        zip64 = size > zipfile.ZIP64_LIMIT // 2
        start = zf.start_dir + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)  # type: ignore[union-attr]
        pad = (-start) % ALIGN
        info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        return info


def _replace_leaves(obj: Any, make: Callable[[TensorMove], Any]) -> Any:
    """The state tree with each TensorMove leaf replaced by ``make(move)``."""
    if isinstance(obj, TensorMove):
        return make(obj)
    if isinstance(obj, dict):
        return {k: _replace_leaves(v, make) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_leaves(v, make) for v in obj]
    return obj


def _pickle_bytes(obj: Any) -> bytes:
    import io

    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


# --- safetensors -----------------------------------------------------------------------------------

def safetensors_header(moves: list[TensorMove], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for m in moves:
        header[m.dst_key] = {"dtype": dtypes.TO_SAFETENSORS[m.dst_dtype], "shape": list(m.shape),
                             "data_offsets": [offset, offset + m.nbytes]}
        offset += m.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # the reference pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """One file, or shards of at most ``max_shard_bytes`` with a Hugging Face index."""

    def __init__(self, path: Path, *, sharded_in: Path | None = None, max_shard_bytes: int | None = None) -> None:
        self.path = path
        self.folder = sharded_in
        self.max_shard_bytes = max_shard_bytes or HF_SHARD_BYTES

    def write(self, plan: ConversionPlan, source: ChunkSource, progress: Progress) -> None:
        moves = list(plan.written)
        for m in moves:
            if m.dst_dtype not in dtypes.TO_SAFETENSORS:
                from ..errors import InputError

                raise InputError(None, m.src_key, f"safetensors has no {m.dst_dtype} dtype")
        if self.folder is None:
            self._write_file(self.path, moves, source, progress)
            return
        shards: list[list[TensorMove]] = [[]]
        size = 0
        for m in moves:
            if shards[-1] and size + m.nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(m)
            size += m.nbytes
        if len(shards) == 1:
            self._write_file(self.folder / "model.safetensors", moves, source, progress)
            return
        weight_map = {}
        for i, part in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            self._write_file(self.folder / name, part, source, progress)
            weight_map.update({m.dst_key: name for m in part})
        index = {"metadata": {"total_size": sum(m.nbytes for m in moves)}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    @staticmethod
    def _write_file(path: Path, moves: list[TensorMove], source: ChunkSource, progress: Progress) -> None:
        with open(path, "wb") as f:
            f.write(safetensors_header(moves, {"format": "pt"}))
            for m in moves:
                for _, chunk in source.chunks(m):
                    f.write(as_bytes(chunk))
                    progress(chunk.numel() * chunk.element_size())


# --- DCP -------------------------------------------------------------------------------------------

class DcpWriter:
    """``torch.distributed.checkpoint.save`` in one process, pulling one row chunk at a time.

    DCP's FileSystemWriter keeps every tensor of a ``.distcp`` file referenced until the file is
    closed, so one file per rank would hold the whole checkpoint in memory.  The writer below groups
    the chunks into files of at most ``FILE_BYTES`` each (``__0_<g>_0.distcp``): memory stays near one
    group, and the checkpoint is an ordinary DCP checkpoint that dcp.load reads.
    """

    def __init__(self, folder: Path, nesting: str | None = "model", chunk_bytes: int | None = None) -> None:
        self.folder = folder
        self.nesting = nesting
        self.chunk_bytes = chunk_bytes

    def write(self, plan: ConversionPlan, source: ChunkSource, progress: Progress) -> None:
        import warnings

        import torch
        import torch.distributed.checkpoint as dcp

        def meta_of(m: TensorMove) -> torch.Tensor:
            return torch.empty(m.shape, dtype=dtypes.to_torch(m.dst_dtype), device="meta")

        prefix = f"{self.nesting}." if self.nesting else ""
        model_moves = [m for m in plan.moves if m.alias_of is None]
        # DCP flattens the state dict to dotted keys; state moves' dst_key already is theirs.
        moves = {prefix + m.dst_key: m for m in model_moves} | {m.dst_key: m for m in plan.state_moves}
        state = nest({m.dst_key: meta_of(m) for m in model_moves}, self.nesting)
        state.update(_replace_leaves(plan.state or {}, meta_of))
        # DCP copies any tensor whose storage is larger than itself: give each chunk a buffer of its size.
        source.buffers = "exact"
        planner = _ChunkedPlanner(moves, source, progress, self.chunk_bytes)
        writer = _grouping_writer_class()(str(self.folder), FILE_BYTES)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            try:
                dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
            except dcp.api.CheckpointException as exc:
                # DCP wraps what the chunk source raised (a refused cast, an unreadable input): re-raise that
                raise next((e for e, _ in exc.failures.values() if isinstance(e, (CkptError, OSError))), exc) from None


FILE_BYTES = 256 << 20


@functools.cache
def _grouping_writer_class() -> type:
    import dataclasses

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.futures import Future

    class GroupingFileSystemWriter(FileSystemWriter):
        """Writes the plan's items as a sequence of bounded files, each through the stock writer."""

        def __init__(self, path: str, file_bytes: int) -> None:
            # One thread and no copy-ahead: chunks are produced and written strictly one at a time.
            # No fsync per file: the staging commit fsyncs every file once, after the last write, which
            # lets the kernel flush in the background meanwhile.
            super().__init__(path, single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0,
                             sync_files=False)
            self._file_bytes = file_bytes

        def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
            groups: list[list] = [[]]
            size = 0
            for item in plan.items:
                n = _item_bytes(item)
                if groups[-1] and size + n > self._file_bytes:
                    groups.append([])
                    size = 0
                groups[-1].append(item)
                size += n
            results = []
            prefix = plan.storage_data.prefix
            for g, items in enumerate(groups):
                sub = dataclasses.replace(plan, items=items,
                                          storage_data=dataclasses.replace(plan.storage_data, prefix=f"{prefix}{g}_"))
                results += super().write_data(sub, planner).wait()
            future: Future = Future()
            future.set_result(results)
            return future

    return GroupingFileSystemWriter


def _item_bytes(item: Any) -> int:
    data = item.tensor_data
    if data is None:
        return 0
    n = dtypes.itemsize(dtypes.from_torch(data.properties.dtype))
    for d in data.chunk.sizes:
        n *= d
    return n


@functools.cache
def _chunked_planner_class() -> type:
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from .stream import row_ranges

    class ChunkedPlanner(DefaultSavePlanner):
        def __init__(self, moves: dict[str, TensorMove], source: ChunkSource, progress: Progress,
                     chunk_bytes: int | None) -> None:
            super().__init__()
            self._moves, self._source, self._progress = moves, source, progress
            self._chunk_bytes = chunk_bytes

        def create_local_plan(self) -> SavePlan:
            items = []
            for fqn, obj in self.state_dict.items():  # flattened by set_up_planner
                if fqn not in self._moves:  # a plain value (param group fields): DCP pickles it
                    items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
            for fqn, move in self._moves.items():
                props = TensorProperties(dtype=dtypes.to_torch(move.dst_dtype))
                for start, stop in row_ranges(move, self._chunk_bytes):
                    offsets = (start, *([0] * (len(move.shape) - 1))) if move.shape else ()
                    sizes = (stop - start, *move.shape[1:]) if move.shape else ()
                    items.append(WriteItem(
                        index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                            properties=props, size=torch.Size(move.shape))))
            self.plan = SavePlan(items, planner_data=self.mappings)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            move = self._moves[write_item.index.fqn]
            chunk = write_item.tensor_data.chunk  # type: ignore[union-attr]
            start = chunk.offsets[0] if move.shape else 0
            stop = start + chunk.sizes[0] if move.shape else 1
            tensor = self._source.read(move, start, stop)
            self._progress(tensor.numel() * tensor.element_size())
            return tensor

    return ChunkedPlanner


def _ChunkedPlanner(*args: Any) -> Any:  # noqa: N802 - a class built on first use (imports torch.distributed)
    return _chunked_planner_class()(*args)
