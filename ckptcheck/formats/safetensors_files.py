"""safetensors files (a shard of a sharded checkpoint is one of these, see ``sharded``).

The header is parsed and validated here rather than by the safetensors library so that metadata needs
no torch, every rule the reference enforces is checked up front, and each violation names its file
and key (duplicate keys included, which JSON parsers accept silently).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from ..bounded_json import loads
from ..dtypes import SAFETENSORS_DTYPE, itemsize
from ..errors import InputError
from ..manifest import Manifest, TensorInfo, natural_key
from ..files import open_binary
from .base import Checkpoint, bytes_to_tensor, check_rows, read_exact, row_span

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100_000_000  # the reference implementation's limit
MAX_INT64 = 2**63 - 1  # torch's sizes and strides
SHOW_CHARS = 60  # of a header value quoted in a message


@dataclass(frozen=True, slots=True)
class Entry:
    info: TensorInfo
    start: int  # absolute offset in the file
    nbytes: int


class SafetensorsFile:
    """One safetensors file's validated header; ``inside``: the checkpoint folder that names it (a shard)."""

    def __init__(self, path: str, inside: str | os.PathLike[str] | None = None) -> None:
        self.path = path
        with open_binary(path, inside) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(path, "header", f"file of {size} bytes is too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER:
                raise InputError(path, "header", f"declares a {n} byte header, over the {MAX_HEADER} byte limit")
            if 8 + n > size:
                raise InputError(path, "header", f"declares a {n} byte header but the file has {size - 8} bytes after it")
            raw = f.read(n)
        header = loads(raw, path, "header")
        if not isinstance(header, dict):
            raise InputError(path, "header", "is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and (
            not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
        ):
            raise InputError(path, "__metadata__", "must map strings to strings")
        self.metadata: dict[str, str] = meta or {}
        data_start = 8 + n
        data_len = size - data_start
        entries: list[Entry] = []
        for key in list(header):  # each parsed value freed once its entry is built: a header may hold 100,000
            entries.append(_entry(path, key, header.pop(key), data_start, data_len))
        del header
        ordered = sorted(entries, key=lambda e: (e.start, e.start + e.nbytes))
        cursor = data_start
        for e in ordered:
            if e.start != cursor:
                what = "overlaps the previous tensor" if e.start < cursor else f"leaves a gap of {e.start - cursor} bytes"
                raise InputError(path, e.info.key, f"data_offsets {what}")
            cursor = e.start + e.nbytes
        if cursor != size:
            raise InputError(
                path, "data", f"tensors end at byte {cursor - data_start} of {data_len}: "
                + ("trailing bytes after the last tensor" if cursor < size else "file is truncated"),
            )
        self.entries = {e.info.key: e for e in sorted(entries, key=lambda e: natural_key(e.info.key))}


def _entry(path: str, key: str, value: Any, data_start: int, data_len: int) -> Entry:
    """One header entry, every field checked for type and bound (the data it declares must fit the
    ``data_len`` bytes after the header) before any size is computed from it."""
    if not isinstance(value, dict):
        raise InputError(path, key, "header entry is not an object")
    name = value.get("dtype")
    dtype = SAFETENSORS_DTYPE.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise InputError(path, key, f"unknown dtype {_show(name)}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or not _fits_int64(shape):
        raise InputError(path, key, f"shape {_show(shape)} is not a list of non-negative integers whose product "
                                    "fits torch's int64 sizes")
    offsets = value.get("data_offsets")
    if (
        not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise InputError(path, key, f"data_offsets {_show(offsets)} are not [begin, end] with "
                                    f"0 <= begin <= end <= {data_len}, the bytes after the header")
    numel = _numel_up_to(shape, data_len)
    nbytes = None if numel is None else numel * itemsize(dtype)
    if nbytes != offsets[1] - offsets[0]:
        needs = "more bytes than the file holds" if nbytes is None else f"{nbytes}"
        raise InputError(
            path, key, f"spans {offsets[1] - offsets[0]} bytes but shape {_show(shape)} of {dtype} needs {needs}",
        )
    return Entry(TensorInfo(key, tuple(shape), dtype), data_start + offsets[0], nbytes)


def _numel_up_to(shape: list[int], limit: int) -> int | None:
    """The element count of ``shape``, or None once it passes ``limit`` (never a product of huge numbers)."""
    if 0 in shape:
        return 0
    numel = 1
    for d in shape:
        numel *= d
        if numel > limit:
            return None
    return numel


def _fits_int64(shape: list[int]) -> bool:
    """Whether torch accepts ``shape``: every dimension an int64, and the element count, multiplied left to
    right, never past 2**64 on the way nor past 2**63 at the end (torch's own numel check, which refuses
    [2**62, 4, 0] although it has no elements)."""
    product = 1
    for d in shape:
        product *= d
        if d > MAX_INT64 or product >= 2**64:
            return False
    return product <= MAX_INT64


def _show(value: Any) -> str:
    """A header value for a message, cut short: the header is input and may hold anything."""
    text = repr(value)
    return text if len(text) <= SHOW_CHARS else f"{text[:SHOW_CHARS]}..."


class SafetensorsCheckpoint(Checkpoint):
    format_name = "safetensors"

    def __init__(self, path: str | os.PathLike[str], inside: str | os.PathLike[str] | None = None) -> None:
        self.path = str(path)
        self._inside = inside
        self.file = SafetensorsFile(self.path, inside)
        self._handle: BinaryIO | None = None
        tensors = {k: e.info for k, e in self.file.entries.items()}
        facts = {f"safetensors metadata {k}": v for k, v in sorted(self.file.metadata.items())[:20]}
        self.manifest = Manifest(path=self.path, format=self.format_name, tensors=tensors, files=(self.path,), facts=facts)

    def load(self, key: str) -> torch.Tensor:
        entry = self._entry(key)
        return self._read(entry, 0, entry.nbytes, entry.info.shape)

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = self._entry(key)
        check_rows(self.path, key, entry.info.shape, start, stop)
        first, count = row_span(entry.info.shape, start, stop)
        size = itemsize(entry.info.dtype)
        return self._read(entry, first * size, count * size, (stop - start, *entry.info.shape[1:]), out)

    def _entry(self, key: str) -> Entry:
        entry = self.file.entries.get(key)
        if entry is None:
            raise InputError(self.path, key, "no such tensor in the checkpoint")
        return entry

    def _read(self, entry: Entry, offset: int, nbytes: int, shape: tuple[int, ...],
              out: torch.Tensor | None = None) -> torch.Tensor:
        if self._handle is None:
            self._handle = open_binary(self.path, self._inside)
        buf = read_exact(self._handle, entry.start + offset, nbytes, path=self.path, item=entry.info.key, out=out)
        return bytes_to_tensor(buf, entry.info.dtype, shape)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
