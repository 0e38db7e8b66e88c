"""Format detection: a path in, an opened ``Checkpoint`` out.

Detection looks at names and first bytes only.  Everything that could be a checkpoint but cannot be
read ends as one ``InputError`` line naming the path and what was found instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from ..safe_pickle import torch_would_unpickle
from ..files import check_inside, open_binary
from .base import Checkpoint, reader_errors
from .dcp import METADATA_NAME, DcpCheckpoint
from .legacy import LegacyTorchCheckpoint
from .meta_shards import MetaShardsCheckpoint, shard_files
from .safetensors_files import SafetensorsCheckpoint
from .sharded import ShardedCheckpoint
from .torchzip import ZIP_MAGIC, TorchFileCheckpoint

__all__ = ["Checkpoint", "detect_format", "open_checkpoint"]

ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# The legacy (torch < 1.6) format starts with a pickled magic number.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MAGIC_NAMES = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive", b"BZh": "a bzip2 archive", b"\xfd7zXZ": "an xz archive", b"7z\xbc\xaf": "a 7z archive",
    b"\x7fELF": "an ELF executable", b"GGUF": "a GGUF file (llama.cpp)", b"\x93NUMPY": "a NumPy .npy file",
}


def _sniff(path: Path) -> str:
    """'torch', 'safetensors', 'legacy' or a description of what else the file is."""
    with open_binary(path) as f:
        head = f.read(64)
        size = os.fstat(f.fileno()).st_size
    if not head:
        return "an empty file"
    if head.startswith(ZIP_MAGIC):
        return "torch"
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]:  # pickle_protocol=4 and 5 frame it
        return "legacy"
    # A header that cannot fit the file is a safetensors error, unless torch.load would unpickle the bytes.
    fits = int.from_bytes(head[:8], "little") <= size - 8
    if len(head) >= 9 and head[8:9] == b"{" and (fits or not torch_would_unpickle(head)):
        return "safetensors"
    for magic, name in _MAGIC_NAMES.items():
        if head.startswith(magic):
            if torch_would_unpickle(head):  # "GIF8", "GGUF": torch.load would still unpickle them
                _refuse_unsafe_pickle(path)
            return name
    if torch_would_unpickle(head):  # torch.load unpickles what is not a zip archive (torch._is_zipfile)
        return "a bare pickle (not a torch.save zip archive)"
    return f"unrecognised data (first bytes {head[:8].hex()})"


def detect_format(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """The format name and the path its reader opens (a folder may hold the real file).  Looking at the
    path can fail too (a name too long, a folder that cannot be listed): one line, not a traceback."""
    try:
        return _detect(Path(path))
    except OSError as exc:
        raise InputError(Path(path), None, exc.strerror or str(exc)) from None


def _detect(p: Path) -> tuple[str, Path]:
    if not p.exists():
        raise InputError(p, None, "no such file or folder")
    if p.is_dir():
        return _detect_folder(p)
    if p.name == METADATA_NAME:
        return "dcp", p.parent
    if p.name.endswith(".index.json"):
        return ("hf-bin-sharded" if p.name == BIN_INDEX else "safetensors-sharded"), p
    kind = _sniff(p)
    if kind == "torch":
        return "torch", p
    if kind == "safetensors":
        return "safetensors", p
    if kind == "legacy":
        return "torch-legacy", p
    if kind.startswith("a bare pickle"):
        _refuse_unsafe_pickle(p)
    raise InputError(p, None, f"not a checkpoint: the file is {kind}")


def _refuse_unsafe_pickle(p: Path) -> None:
    """torch.load treats a file that is neither a zip nor a legacy stream as a legacy one and unpickles
    it: scan it (never load it) so that a payload is reported as unsafe, not merely unreadable."""
    from ..safe_pickle import scan_globals
    from .torch_pickle import TORCH_ALLOWLIST
    from .torchzip import MAX_DATA_PKL

    with open_binary(p) as f:
        data = f.read(MAX_DATA_PKL + 1)
    whole = len(data) <= MAX_DATA_PKL  # then where the scan meets bad bytes, so does the unpickler
    scan_globals(data[:MAX_DATA_PKL], path=str(p), member="pickle", allowed=TORCH_ALLOWLIST,
                 malformed_is_harmless=whole)


def _detect_folder(p: Path) -> tuple[str, Path]:
    if (p / METADATA_NAME).exists():  # a FIFO or device too: its reader refuses it by name
        return "dcp", p
    shards = shard_files(p)
    if len(shards) > 1:
        return "meta-shards", p
    if len(shards) == 1:
        return "torch", shards[0]
    for name, fmt in ((ST_INDEX, "safetensors-sharded"), (BIN_INDEX, "hf-bin-sharded")):
        if (p / name).is_file():
            return fmt, p / name
    for name in ("model.safetensors", "consolidated.pth", "pytorch_model.bin"):
        if (p / name).is_file():
            return ("safetensors" if name.endswith(".safetensors") else "torch"), p / name
    singles = sorted(q for q in p.iterdir() if q.suffix in (".safetensors", ".pth", ".pt", ".bin") and q.is_file())
    if len(singles) == 1:
        return detect_format(singles[0])
    listing = ", ".join(sorted(q.name for q in p.iterdir())[:8]) or "nothing"
    raise InputError(p, None, f"no checkpoint found in this folder (it holds {listing})")


# What a file's suffix tells tools that open by name (safetensors, transformers) it holds.
_SUFFIX_SAYS = {".safetensors": "safetensors", ".pth": "torch", ".pt": "torch", ".bin": "torch"}


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint at ``path``, opened by its format's reader; anything a reader raises while opening
    and listing it is one ``InputError`` line (``reader_errors``)."""
    with reader_errors(path, None):
        ckpt = _open(path)
    target = Path(ckpt.manifest.path)
    said = _SUFFIX_SAYS.get(target.suffix) if target.is_file() else None
    if said is not None and said != ckpt.manifest.format.removesuffix("-legacy"):
        ckpt.manifest.facts["misnamed"] = f"named {target.suffix} ({said}) but holds a {ckpt.manifest.format} file"
    return ckpt


def _open(path: str | os.PathLike[str]) -> Checkpoint:
    fmt, target = detect_format(path)
    if target.is_file() and Path(path).is_dir():  # a file found in the folder named: it must not leave it
        check_inside(target, path)
    if fmt == "dcp":
        return DcpCheckpoint(target)
    if fmt == "meta-shards":
        return MetaShardsCheckpoint(target)
    if fmt == "safetensors-sharded":
        return ShardedCheckpoint(target, SafetensorsCheckpoint, fmt)
    if fmt == "hf-bin-sharded":
        return ShardedCheckpoint(target, TorchFileCheckpoint, fmt)
    if fmt == "safetensors":
        return SafetensorsCheckpoint(target)
    if fmt == "torch-legacy":
        return LegacyTorchCheckpoint(target)
    return TorchFileCheckpoint(target)
