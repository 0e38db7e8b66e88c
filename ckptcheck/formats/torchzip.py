"""torch.save zip archives (``.pth``/``.pt``/``.bin``): data.pkl through the allowlist, tensors by offset.

Reading the manifest touches the zip's central directory and ``data.pkl`` only.  A tensor is read by
seeking to its storage record inside the (always uncompressed) archive and reading exactly its bytes.
The same class reads a torch.save blob embedded in a larger file (DCP's ``.distcp``) through a window.
"""

from __future__ import annotations

import io
import os
from abc import abstractmethod
import struct
import zipfile
import zlib
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import InputError
from ..manifest import Manifest, TensorInfo
from ..files import open_binary
from .base import Checkpoint, bytes_to_tensor, check_rows, read_exact, row_span, split_sections
from .torch_pickle import StorageRef, TensorRef, load_torch_pickle, walk, weights_only_facts

if TYPE_CHECKING:
    import torch

MAX_DATA_PKL = 64 << 20  # data.pkl of a 70B checkpoint with optimizer state is a few MB
MAX_RATIO = 200  # a compressed member expanding more than this is treated as a zip bomb
PICKLE_HEADS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra lengths at offset 26


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
        stream: BinaryIO = f if length is None else Window(f, base, length)  # type: ignore[assignment]
        try:
            self._zip = zipfile.ZipFile(stream)
            infos = self._zip.infolist()
        except zipfile.BadZipFile as exc:
            raise InputError(path, None, f"not a readable torch zip archive ({exc})") from None
        except (OSError, ValueError, EOFError, struct.error, NotImplementedError, zlib.error) as exc:
            raise InputError(path, None, f"damaged zip archive ({type(exc).__name__}: {exc})") from None
        for info in infos:
            _check_member_name(path, info.filename)
        pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            found = "no" if not pickles else f"{len(pickles)}"
            raise InputError(path, None, f"{found} data.pkl records; a torch.save archive has exactly one")
        pkl = pickles[0]
        self.prefix = pkl.filename[: -len("data.pkl")]
        self._members = {i.filename: i for i in infos}
        self.facts: dict[str, str] = {"serialization": "torch zip"}
        version = self._small_member("version")
        if version is not None:
            self.facts["torch zip version"] = version
        byteorder = self._small_member("byteorder")
        self.big_endian = byteorder == "big"
        if byteorder:
            self.facts["byteorder"] = byteorder
        data = self._read_member(pkl, MAX_DATA_PKL)
        loaded = load_torch_pickle(data, path=path, member=pkl.filename)
        self.obj, self.storages, self.refused = loaded.obj, loaded.storages, loaded.refused
        self.facts.update(weights_only_facts(self.refused))
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
                raise InputError(path, f"{self.prefix}data/{key}", "storage record is compressed; torch never does that")
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
            if head[:2] in PICKLE_HEADS or looks_like_pickle(head) or info.filename.endswith((".pkl", ".pickle")):
                scan_globals(self._read_member(info, MAX_DATA_PKL), path=self.path, member=info.filename,
                             allowed=TORCH_ALLOWLIST)

    def _read_member(self, info: zipfile.ZipInfo, limit: int, whole: bool = True) -> bytes:
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > (1 << 20):
            raise InputError(self.path, info.filename, f"expands {info.file_size // info.compress_size}x: a zip bomb")
        if whole and info.file_size > limit:
            raise InputError(self.path, info.filename, f"{info.file_size} bytes exceeds the {limit} byte limit")
        try:
            with self._zip.open(info) as member:
                data = member.read(limit + 1 if whole else limit)
        except Exception as exc:  # zipfile raises many kinds on hostile members (encrypted, odd methods, CRC)
            raise InputError(self.path, info.filename, f"cannot read record ({type(exc).__name__}: {exc})") from None
        if whole and len(data) > limit:
            raise InputError(self.path, info.filename, f"expands past the {limit} byte limit")
        return data

    def _small_member(self, name: str) -> str | None:
        info = self._members.get(self.prefix + name)
        if info is None:
            return None
        return self._read_member(info, 4096).decode("ascii", "replace").strip()

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
        from ..dtypes import itemsize

        size = itemsize(ref.dtype)
        base = self._data_offset(ref.storage) + ref.offset * size
        if rows is not None and ref.is_contiguous:
            check_rows(self.path, key, ref.shape, *rows)
            first, count = row_span(ref.shape, *rows)
            buf = read_exact(self._f, base + first * size, count * size, path=self.path, item=key, out=out)
            return bytes_to_tensor(buf, ref.dtype, (rows[1] - rows[0], *ref.shape[1:]), big_endian=self.big_endian)
        buf = read_exact(self._f, base, ref.extent * size, path=self.path, item=key)
        if ref.offset == 0 and ref.extent == ref.storage.numel:  # the whole record: check it as torch would
            info = self._members[f"{self.prefix}data/{ref.storage.key}"]
            if zlib.crc32(memoryview(buf.numpy())) != info.CRC:
                raise InputError(self.path, info.filename, "bad CRC-32: the record is corrupted")
        stride = None if ref.is_contiguous else ref.stride
        tensor = bytes_to_tensor(buf, ref.dtype, ref.shape, stride, big_endian=self.big_endian)
        return tensor if rows is None else tensor[rows[0]:rows[1]]


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
    """A tensor's view must lie inside its storage."""
    if ref.offset + ref.extent > ref.storage.numel and ref.numel:
        raise InputError(path, key, f"tensor of shape {list(ref.shape)} at offset {ref.offset} runs past its storage "
                         f"of {ref.storage.numel} elements")


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
    for p, leaf in leaves:
        dotted = ".".join(p)
        if isinstance(leaf, TensorRef):
            check_ref(path, dotted, leaf)
            view = (leaf.storage.key, leaf.offset, leaf.shape, leaf.stride)
            alias = first_view.setdefault(view, dotted)
            refs[dotted] = leaf
            entries.append((p, TensorInfo(dotted, leaf.shape, leaf.dtype, None if alias == dotted else alias)))
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
        return self._read(key, self._ref(key), (start, stop), out)

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

    def close(self) -> None:
        self._f.close()


def _alias_renamed(info: TensorInfo, nesting: str | None) -> TensorInfo:
    """Alias targets were recorded with full paths; inside the model section drop the nesting."""
    if info.alias_of and nesting and info.alias_of.startswith(nesting + "."):
        return TensorInfo(info.key, info.shape, info.dtype, info.alias_of[len(nesting) + 1:])
    return info
