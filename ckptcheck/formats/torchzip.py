"""torch.save zip archives (``.pth``/``.pt``/``.bin``): data.pkl through the allowlist, tensors by offset.

Reading the manifest touches the zip's central directory and ``data.pkl`` only.  A tensor is read by
seeking to its storage record inside the (always uncompressed) archive and reading exactly its bytes.
The same class reads a torch.save blob embedded in a larger file (DCP's ``.distcp``) through a window.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import re
from abc import abstractmethod
import struct
import zipfile
import zlib
from typing import TYPE_CHECKING, Any, BinaryIO

from ..dtypes import itemsize
from ..errors import InputError
from ..manifest import Manifest, TensorInfo
from ..files import open_binary
from ..safe_pickle import MAX_PICKLE_BYTES
from .base import Checkpoint, bytes_to_tensor, check_rows, read_exact, row_span, split_sections
from .torch_pickle import StorageRef, TensorRef, load_torch_pickle, opcode_facts, walk, weights_only_facts

if TYPE_CHECKING:
    import torch

MAX_DATA_PKL = MAX_PICKLE_BYTES  # one limit for a pickle read whole, wherever it is (safe_pickle's table)
MAX_RATIO = 200  # a compressed member expanding more than this is treated as a zip bomb
ZIP_MAGIC = b"PK\x03\x04"
CRC_BLOCK = 1 << 20  # a record read in parts is CRC-checked by streaming it in blocks of this size
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra lengths at offset 26
# What torch.load's archive reader accepts (caffe2's inline_container, torch 2.6 to 2.13): format versions,
# byte orders, and the compression methods its zip library decompresses.
TORCH_ZIP_VERSIONS = range(1, 11)
BYTE_ORDERS = {b"little": False, b"big": True}  # compared as exact bytes, as torch does -> big endian
TORCH_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_LEADING_INT = re.compile(r"\s*[+-]?[0-9]{1,20}")  # how the reader parses the version record (stoll)


class Window(io.RawIOBase):
    """A read-only view of bytes [start, start+length) of a file, seekable as if it were the file."""

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n]) or 0
        self._pos += got
        return got


class TorchArchive:
    """The records of one torch.save archive, validated against its central directory."""

    def __init__(self, f: BinaryIO, *, path: str, base: int = 0, length: int | None = None) -> None:
        self.path = path
        self._f = f
        self._base = base
        size = os.fstat(f.fileno()).st_size if length is None else length
        self._size = size
        self._verified: set[str] = set()  # storage records whose CRC-32 has been checked
        stream: BinaryIO = f if length is None else Window(f, base, length)  # type: ignore[assignment]
        try:
            self._zip = zipfile.ZipFile(stream)
            infos = self._zip.infolist()
        except zipfile.BadZipFile as exc:
            raise InputError(path, None, f"not a readable torch zip archive ({exc})") from None
        except (OSError, ValueError, EOFError, struct.error, NotImplementedError, zlib.error) as exc:
            raise InputError(path, None, f"damaged zip archive ({type(exc).__name__}: {exc})") from None
        names: set[str] = set()
        for info in infos:
            _check_member_name(path, info.filename)
            if info.filename in names:  # torch's reader takes the first copy, Python's zipfile the last
                raise InputError(path, info.filename, "the archive holds two records of this name: which one a "
                                 "reader takes differs (torch the first, others the last)")
            names.add(info.filename)
        self.prefix = _record_directory(path, infos)
        self._members = {i.filename: i for i in infos}
        pkl = self._members.get(f"{self.prefix}data.pkl")
        if pkl is None:
            raise InputError(path, None, f"no {self.prefix}data.pkl record (torch reads the records of the first "
                             "member's directory only): torch.load refuses it")
        # torch.save(..., with set_crc32_options(False)) writes CRC 0 for every record, and torch reads it
        self.checksummed = any(i.CRC for i in infos if i.file_size)
        self.facts: dict[str, str] = {"serialization": "torch zip", "torch zip version": self._version()}
        if not self.checksummed:
            self.facts["no checksums"] = "saved without checksums (set_crc32_options(False))"
        byteorder = self._small_member("byteorder")
        if byteorder is not None and byteorder not in BYTE_ORDERS:
            shown = byteorder[:40].decode("ascii", "replace")
            raise InputError(path, f"{self.prefix}byteorder", f"byte order {shown!r} is neither little nor big: "
                             "torch.load refuses it (it compares the exact bytes)")
        self.big_endian = BYTE_ORDERS.get(byteorder or b"little", False)
        if byteorder:
            self.facts["byteorder"] = byteorder.decode()
        alignment = self._small_member(".storage_alignment")
        try:
            int(alignment or b"64")  # how torch.load parses it
        except ValueError:
            raise InputError(path, f"{self.prefix}.storage_alignment", f"storage alignment {alignment[:40]!r} is not "
                             "an integer: torch.load refuses it") from None
        data = self._read_member(pkl, MAX_DATA_PKL, torch_reads=True)
        loaded = load_torch_pickle(data, path=path, member=pkl.filename)
        self.obj, self.storages, self.refused = loaded.obj, loaded.storages, loaded.refused
        self.facts.update({**weights_only_facts(self.refused), **opcode_facts(loaded.opcodes_refused)})
        self._scan_other_pickles(pkl)
        for key, storage in self.storages.items():
            info = self._members.get(f"{self.prefix}data/{key}")
            if info is None:
                raise InputError(path, f"storage {key}", "data.pkl refers to a storage record the archive lacks")
            if info.file_size != storage.nbytes:
                raise InputError(
                    path, f"{self.prefix}data/{key}",
                    f"record holds {info.file_size} bytes, data.pkl declares {storage.nbytes}",
                )
            if info.compress_type != zipfile.ZIP_STORED:
                raise InputError(path, f"{self.prefix}data/{key}", f"storage record is compressed (zip method "
                                 f"{info.compress_type}): ckptcheck reads stored records only, though torch.load "
                                 "reads deflated ones; re-save it with torch.save, which never compresses")
            if info.header_offset + info.file_size > size:  # validated before anything is allocated for it
                raise InputError(path, f"{self.prefix}data/{key}",
                                 f"record of {info.file_size} bytes cannot fit in a {size} byte file")

    def _scan_other_pickles(self, main: zipfile.ZipInfo) -> None:
        """Any other member that is a pickle is scanned, never loaded, for globals outside the allowlist:
        torch reads only data.pkl, but a payload parked beside it is still a hostile file.  Only the
        storages data.pkl refers to are raw tensor bytes; an unreferenced ``data/99`` is scanned too."""
        from ..safe_pickle import looks_like_pickle, scan_globals
        from .torch_pickle import TORCH_ALLOWLIST

        storages = {f"{self.prefix}data/{key}" for key in self.storages}
        for info in self._members.values():
            if info is main or info.filename in storages or info.file_size < 2:
                continue
            head = self._read_member(info, 64, whole=False)
            if looks_like_pickle(head) or info.filename.endswith((".pkl", ".pickle")):
                scan_globals(self._read_member(info, MAX_DATA_PKL), path=self.path, member=info.filename,
                             allowed=TORCH_ALLOWLIST)

    def _version(self) -> str:
        """The archive's format version, which torch's reader requires, parses as a leading integer and
        bounds (``.data/version`` wins over ``version``, as there)."""
        name = next((n for n in (".data/version", "version") if self.prefix + n in self._members), "version")
        raw = self._small_member(name)
        if raw is None:
            raise InputError(self.path, f"{self.prefix}version", "the archive has no version record: torch.load "
                             "refuses it")
        text = raw.decode("ascii", "replace").strip()
        number = _LEADING_INT.match(text)
        if number is None or int(number.group()) not in TORCH_ZIP_VERSIONS:
            raise InputError(self.path, self.prefix + name, f"format version {text[:40]!r} is not one torch reads "
                             f"({TORCH_ZIP_VERSIONS.start} to {TORCH_ZIP_VERSIONS.stop - 1}): torch.load refuses it")
        return text

    def _read_member(self, info: zipfile.ZipInfo, limit: int, whole: bool = True, torch_reads: bool = False) -> bytes:
        """A member's bytes.  ``torch_reads``: torch.load reads this member too, so it must be stored the way
        torch's zip reader can decompress."""
        if torch_reads and info.compress_type not in TORCH_COMPRESSION:
            raise InputError(self.path, info.filename, f"compressed with zip method {info.compress_type}, which "
                             "torch.load cannot read (it reads stored and deflated records)")
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > (1 << 20):
            raise InputError(self.path, info.filename, f"expands {info.file_size // info.compress_size}x: a zip bomb")
        if whole and info.file_size > limit:
            raise InputError(self.path, info.filename, f"{info.file_size} bytes exceeds the {limit} byte limit")
        if not self.checksummed:  # zipfile checks a member's CRC only when its info has one
            info = copy.copy(info)
            del info.CRC
        try:
            with self._zip.open(info) as member:
                data = member.read(limit + 1 if whole else limit)
        except Exception as exc:  # zipfile raises many kinds on hostile members (encrypted, odd methods, CRC)
            raise InputError(self.path, info.filename, f"cannot read record ({type(exc).__name__}: {exc})") from None
        if whole and len(data) > limit:
            raise InputError(self.path, info.filename, f"expands past the {limit} byte limit")
        return data

    def _small_member(self, name: str) -> bytes | None:
        info = self._members.get(self.prefix + name)
        if info is None:
            return None
        return self._read_member(info, 4096, torch_reads=True)

    def _data_offset(self, storage: StorageRef) -> int:
        info = self._members[f"{self.prefix}data/{storage.key}"]
        self._f.seek(self._base + info.header_offset)
        header = self._f.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or not header.startswith(ZIP_MAGIC):
            raise InputError(self.path, info.filename, "local zip header is missing or damaged")
        _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self._size:
            raise InputError(self.path, info.filename, "record runs past the end of the file")
        return self._base + start

    def read(self, key: str, ref: TensorRef, rows: tuple[int, int] | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or only rows ``rows`` of it (a direct byte-range read when it is contiguous)."""
        size = itemsize(ref.dtype)
        base = self._data_offset(ref.storage) + ref.offset * size
        if rows is not None and ref.is_contiguous:
            check_rows(self.path, key, ref.shape, *rows)
            first, count = row_span(ref.shape, *rows)
            buf = read_exact(self._f, base + first * size, count * size, path=self.path, item=key, out=out)
            self._verify(ref.storage, buf if ref.offset + first == 0 and count * size == ref.storage.nbytes else None)
            return bytes_to_tensor(buf, ref.dtype, (rows[1] - rows[0], *ref.shape[1:]), big_endian=self.big_endian)
        buf = read_exact(self._f, base, ref.extent * size, path=self.path, item=key)
        self._verify(ref.storage, buf if ref.offset == 0 and ref.extent * size == ref.storage.nbytes else None)
        stride = None if ref.is_contiguous else ref.stride
        tensor = bytes_to_tensor(buf, ref.dtype, ref.shape, stride, big_endian=self.big_endian)
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def verify(self, ref: TensorRef) -> None:
        """The CRC-32 of ``ref``'s record, streamed without building a tensor; nothing if a read checked it."""
        self._verify(ref.storage, None)

    def _verify(self, storage: StorageRef, whole: torch.Tensor | None) -> None:
        """The record's CRC-32, checked once per archive on every read path (rows and views too, not only
        whole-tensor reads): from ``whole`` when the bytes just read are the whole record, else streamed."""
        if storage.key in self._verified or not self.checksummed:
            return
        info = self._members[f"{self.prefix}data/{storage.key}"]
        crc = zlib.crc32(memoryview(whole.numpy())) if whole is not None else \
            self._stream_crc(self._data_offset(storage), info.file_size, info.filename)
        if crc != info.CRC:
            raise InputError(self.path, info.filename, "bad CRC-32: the record is corrupted")
        self._verified.add(storage.key)

    def _stream_crc(self, start: int, length: int, name: str) -> int:
        crc, block = 0, memoryview(bytearray(min(length, CRC_BLOCK)))
        self._f.seek(start)
        while length:
            got = self._f.readinto(block[:min(length, len(block))])
            if not got:
                raise InputError(self.path, name, f"file ends {length} bytes before the record does")
            crc, length = zlib.crc32(block[:got], crc), length - got
        return crc


def _record_directory(path: str, infos: list[zipfile.ZipInfo]) -> str:
    """The directory torch's reader takes every record from: the first member's, up to its first slash; every
    member must lie in it."""
    first = infos[0].filename if infos else ""
    if "/" not in first:
        raise InputError(path, first[:80] or None, "the archive's first member is not in a directory: torch.load "
                         "refuses it")
    prefix = first[: first.index("/") + 1]
    stray = next((info.filename for info in infos if not info.filename.startswith(prefix)), None)
    if stray is not None:  # torch's reader checks every member's directory when it opens the archive
        raise InputError(path, stray[:80], f"a record outside the archive's directory {prefix}: torch.load refuses it")
    return prefix


def _check_member_name(path: str, name: str) -> None:
    """A member name that climbs out of the archive, is absolute or hides control characters is hostile."""
    from ..errors import UnsafeInputError

    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or any(ord(c) < 32 for c in name) or len(name) > 4096:
        raise UnsafeInputError(path, repr(name[:80]), "zip member name points outside the archive or hides "
                               "control characters", culprit=name[:80])


def single_tensor_ref(archive: TorchArchive, item: str) -> TensorRef:
    """The one tensor a ``torch.save(tensor)`` blob holds (how DCP stores each chunk)."""
    ref = archive.obj
    if not isinstance(ref, TensorRef):
        raise InputError(archive.path, item, f"blob holds a {type(ref).__name__}, not one tensor")
    check_ref(archive.path, item, ref)
    return ref


def check_ref(path: str, key: str, ref: TensorRef) -> None:
    """A tensor's view must lie inside its storage, counted in bytes: a ``_rebuild_tensor_v3`` tensor's
    storage is untyped (its size is in bytes) while offset and strides count the tensor's own elements."""
    if ref.numel and (ref.offset + ref.extent) * itemsize(ref.dtype) > ref.storage.nbytes:
        raise InputError(path, key, f"tensor of shape {list(ref.shape)} at offset {ref.offset} runs past its storage "
                         f"of {ref.storage.nbytes} bytes: torch.load refuses it")


def aliased_dims(ref: TensorRef) -> tuple[int, ...]:
    """The dims along which a view reads stored elements it already read, when it has more elements than the
    storage it spans (the one rule for check and convert): a stride-0 dim, or one whose stride steps inside
    the span of the dims with smaller strides (overlapping strides).  An interleaved view that reads each
    stored element at most once aliases nothing."""
    if ref.numel <= ref.extent:
        return ()
    dims, span = [], 1
    # innermost first (ties: the later dim), each dim checked against the span of those before it
    for s, _, d in sorted((s, -d, d) for d, (n, s) in enumerate(zip(ref.shape, ref.stride, strict=True)) if n > 1):
        if s < span:
            dims.append(d)
        span += (ref.shape[d] - 1) * s
    return tuple(sorted(dims))


def _spelled(p: tuple[str, ...]) -> str:
    """A flattened entry's path as nested keys, so that two spellings of one dotted key can be told apart."""
    return "".join(f"[{k!r}]" for k in p)[:200]


def tensor_entries(obj: Any, *, path: str, member: str,
                   ) -> tuple[list[tuple[tuple[str, ...], TensorInfo | None]], dict[str, TensorRef]]:
    """Flatten an unpickled state dict into (path, TensorInfo) entries, marking aliases (tied weights)."""
    if not isinstance(obj, dict):
        raise InputError(path, member, f"holds a {type(obj).__name__}, not a state dict")
    entries: list[tuple[tuple[str, ...], TensorInfo | None]] = []
    refs: dict[str, TensorRef] = {}
    first_view: dict[tuple[str, int, tuple[int, ...], tuple[int, ...]], str] = {}
    try:
        leaves = list(walk(obj))
    except ValueError as exc:
        raise InputError(path, member, str(exc)) from None
    seen: dict[str, tuple[str, ...]] = {}
    for p, leaf in leaves:
        dotted = ".".join(p)
        other = seen.setdefault(dotted, p)
        if other != p:  # {"a": {"b": t1}, "a.b": t2}: a loader keeps one of them, and which is not said
            raise InputError(path, dotted, f"two entries flatten to this key ({_spelled(other)} and {_spelled(p)}): "
                             "which one a loader takes is ambiguous")
        if isinstance(leaf, TensorRef):
            check_ref(path, dotted, leaf)
            view = (leaf.storage.key, leaf.offset, leaf.shape, leaf.stride)
            alias = first_view.setdefault(view, dotted)
            refs[dotted] = leaf
            entries.append((p, TensorInfo(dotted, leaf.shape, leaf.dtype, None if alias == dotted else alias,
                                          aliased_dims(leaf))))
        else:
            entries.append((p, None))
    return entries, refs


class PickledCheckpoint(Checkpoint):
    """A checkpoint that is one unpickled state dict whose tensors are read by storage offsets: the zip
    format and the legacy one differ only in where a storage's bytes are (``_read``)."""

    path: str
    format_name: str

    def _index(self, obj: Any, member: str, facts: dict[str, str]) -> None:
        entries, refs = tensor_entries(obj, path=self.path, member=member)
        layout = split_sections(entries)
        self._refs = {layout.names[p]: refs[".".join(p)] for p, info in entries if info is not None}
        self._values = {".".join(p): value for p, value in walk(obj) if not isinstance(value, TensorRef)}
        model = {k: _alias_renamed(v, layout.nesting) for k, v in layout.model.items()}
        self.manifest = Manifest(
            path=self.path, format=self.format_name, tensors=model, files=(self.path,), nesting=layout.nesting,
            sections=layout.sections, extra_tensors=layout.extra, extra_entries=layout.others, facts=facts,
            extra_paths=layout.extra_paths,
        )

    @abstractmethod
    def _read(self, key: str, ref: TensorRef, rows: tuple[int, int] | None, out: torch.Tensor | None) -> torch.Tensor:
        """The tensor ``ref`` describes, or rows of it (into ``out`` when given)."""

    def _ref(self, key: str) -> TensorRef:
        ref = self._refs.get(key)
        if ref is None:
            raise InputError(self.path, key, "no such tensor in the checkpoint")
        return ref

    def load(self, key: str) -> torch.Tensor:
        return self._read(key, self._ref(key), None, None)

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows as stored values; a view with more elements than the storage it spans (stride 0, or
        overlapping strides) is refused here, where every streaming reader (convert, diff) would copy one
        stored value per element: a 70 KB file would write gigabytes.  ``load`` still returns the view, for
        the checks that report it."""
        ref = self._ref(key)
        dims = aliased_dims(ref)
        if dims:
            how = "stride 0" if all(ref.stride[d] == 0 for d in dims) else f"overlapping strides {list(ref.stride)}"
            raise InputError(self.path, key, f"repeats its stored values along dims {list(dims)} ({how}): copying "
                             f"it would write {ref.numel} elements from {ref.extent} stored; re-save it from training")
        return self._read(key, ref, (start, stop), out)

    def load_value(self, key: str) -> Any:
        if key not in self._values:
            raise InputError(self.path, key, "no such value in the checkpoint")
        return self._values[key]


class TorchFileCheckpoint(PickledCheckpoint):
    """A single torch.save file: a flat state dict, or one nested as {"model": ..., "optim": ...}."""

    format_name = "torch"

    def __init__(self, path: str | os.PathLike[str], inside: str | os.PathLike[str] | None = None) -> None:
        """``inside``: the checkpoint folder that names this file (a shard), which it must not leave."""
        self.path = str(path)
        self._f = open_binary(self.path, inside)
        try:
            self.archive = TorchArchive(self._f, path=self.path)
            self._index(self.archive.obj, f"{self.archive.prefix}data.pkl", dict(self.archive.facts))
        except BaseException:
            self._f.close()
            raise

    def _read(self, key: str, ref: TensorRef, rows: tuple[int, int] | None, out: torch.Tensor | None) -> torch.Tensor:
        return self.archive.read(key, ref, rows, out)

    def verify(self, key: str) -> None:
        self.archive.verify(self._ref(key))

    def records(self, key: str) -> dict[str, int]:
        storage = self._ref(key).storage
        return {f"{self.path}:{self.archive.prefix}data/{storage.key}": storage.nbytes}

    def close(self) -> None:
        self._f.close()


def _alias_renamed(info: TensorInfo, nesting: str | None) -> TensorInfo:
    """Alias targets were recorded with full paths; inside the model section drop the nesting."""
    if info.alias_of and nesting and info.alias_of.startswith(nesting + "."):
        return dataclasses.replace(info, alias_of=info.alias_of[len(nesting) + 1:])
    return info
