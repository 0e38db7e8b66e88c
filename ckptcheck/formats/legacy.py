"""The legacy torch serialization (torch < 1.6, or ``_use_new_zipfile_serialization=False``).

One file of stacked pickles: a magic number, a protocol version, system info, the object (with
persistent ids naming storages), the list of storage keys in the order their data follows, then for
each storage an 8-byte element count and its raw bytes.  All pickles go through the same allowlist as
the zip format; storage offsets are computed from the counts, validated against the file's size.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any

from .. import dtypes
from ..errors import InputError
from ..safe_pickle import BASIC_GLOBALS, is_index, safe_load_stream
from ..files import open_binary
from .base import bytes_to_tensor, check_rows, read_exact, row_span
from .torch_pickle import (TORCH_ALLOWLIST, MalformedTensor, StorageRef, StorageTable, TensorRef, opcode_facts,
                           unread_opcodes, weights_only_facts)
from .torchzip import MAX_DATA_PKL, PickledCheckpoint

if TYPE_CHECKING:
    import torch

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001


class _LegacyStorages(StorageTable):
    """Legacy persistent ids carry a sixth field, view metadata, which only torch < 0.4 files use."""

    def __call__(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) != 6:
            raise MalformedTensor("unexpected persistent id")
        if pid[5] is not None:
            raise MalformedTensor("storage views (torch < 0.4 files) are not supported")
        return self.add(pid[:5])


class LegacyTorchCheckpoint(PickledCheckpoint):
    format_name = "torch-legacy"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._f = open_binary(self.path)
        try:
            self._open()
        except BaseException:
            self._f.close()
            raise

    def _open(self) -> None:
        f, where = self._f, self.path
        size = os.fstat(f.fileno()).st_size
        opcodes: set[str] = set()  # torch.load(weights_only=True) reads every pickle of the stream the same way

        def load(member: str, allowed: Any = BASIC_GLOBALS, **kwargs: Any) -> Any:
            # what a pickle may allocate: bounded by the bytes left, and by what a zip's data.pkl may hold
            budget = min(size - f.tell(), MAX_DATA_PKL)
            return safe_load_stream(f, path=where, member=member, allowed=allowed, size=budget, opcodes=opcodes,
                                    **kwargs)

        if load("magic number") != MAGIC:
            raise InputError(where, "magic number", "not a legacy torch file")
        protocol = load("protocol version")
        if protocol != PROTOCOL:
            raise InputError(where, "protocol version", f"{protocol if is_index(protocol) else type(protocol).__name__}, expected {PROTOCOL}")
        info = load("system info")
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise InputError(where, "system info", "big-endian or unreadable system info")
        table, refused = _LegacyStorages(), set[str]()
        obj = load("object", TORCH_ALLOWLIST, persistent_load=table, refused=refused)
        keys = load("storage keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InputError(where, "storage keys", "not a list of keys")
        self._offsets: dict[str, int] = {}
        pos = f.tell()
        for key in keys:
            ref = table.storages.get(key)
            f.seek(pos)
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(where, f"storage {key}", "file ends before the storage's size")
            (numel,) = struct.unpack("<q", raw)
            if ref is None or numel != ref.numel:
                raise InputError(where, f"storage {key}", f"holds {numel} elements, the object declares "
                                 f"{None if ref is None else ref.numel}")
            self._offsets[key] = pos + 8
            pos += 8 + ref.nbytes
            if pos > size:  # validated before anything is allocated for it
                raise InputError(where, f"storage {key}", "runs past the end of the file")
        if set(table.storages) - set(self._offsets):
            raise InputError(where, "storage keys", "the object refers to storages the file does not hold")
        facts = {"serialization": "legacy torch (pre-1.6 pickle stream, not a zip archive)",
                 "legacy protocol": str(protocol), **weights_only_facts(refused),
                 **opcode_facts(unread_opcodes(opcodes))}
        self._index(obj, "object", facts)

    def _read(self, key: str, ref: TensorRef, rows: tuple[int, int] | None, out: torch.Tensor | None) -> torch.Tensor:
        size = dtypes.itemsize(ref.dtype)
        base = self._offsets[ref.storage.key] + ref.offset * size
        if rows is not None and ref.is_contiguous:
            check_rows(self.path, key, ref.shape, *rows)
            first, count = row_span(ref.shape, *rows)
            buf = read_exact(self._f, base + first * size, count * size, path=self.path, item=key, out=out)
            return bytes_to_tensor(buf, ref.dtype, (rows[1] - rows[0], *ref.shape[1:]))
        buf = read_exact(self._f, base, ref.extent * size, path=self.path, item=key)
        tensor = bytes_to_tensor(buf, ref.dtype, ref.shape, None if ref.is_contiguous else ref.stride)
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def close(self) -> None:
        self._f.close()
