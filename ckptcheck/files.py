"""Opening an input file: the one place every reader goes through."""

from __future__ import annotations

import io
import os
import stat
from typing import Any, BinaryIO

from .errors import InputError, UnsafeInputError

# Hugging Face hub caches keep a checkpoint's files as symlinks <cache>/<repo>/snapshots/<rev>/x -> ../../blobs/<hash>:
# the folders that name such a repo, whose blobs folder a snapshot's files may point into.
HUB_REPO_PREFIXES = ("models--",)

# What a path that is no regular file is, and why reading it is refused, for the one-line refusal.
_FOREVER = " (reading it could block forever)"
_KINDS = ((stat.S_ISFIFO, "a FIFO", _FOREVER), (stat.S_ISCHR, "a character device", _FOREVER),
          (stat.S_ISBLK, "a block device", _FOREVER), (stat.S_ISSOCK, "a socket", _FOREVER),
          (stat.S_ISDIR, "a folder", ""))


class _InputFile(io.BufferedReader):
    """A buffered input file whose read and seek errors (EIO from /proc/self/mem, a failing disk) are the
    one-line ``InputError`` naming it, on every path that reads input, not a traceback."""

    def __init__(self, fd: int, path: str | os.PathLike[str]) -> None:
        super().__init__(io.FileIO(fd, "rb", closefd=True))
        self._path = path

    def _guard(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except OSError as exc:
            raise InputError(self._path, None, f"cannot be read ({exc.strerror or exc})") from None

    def read(self, size: int | None = -1) -> bytes:
        return self._guard(super().read, size)

    def read1(self, size: int = -1) -> bytes:
        return self._guard(super().read1, size)

    def readinto(self, b: Any) -> int:
        return self._guard(super().readinto, b)

    def readinto1(self, b: Any) -> int:
        return self._guard(super().readinto1, b)

    def readline(self, size: int | None = -1) -> bytes:
        return self._guard(super().readline, size)

    def peek(self, size: int = 0) -> bytes:
        return self._guard(super().peek, size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard(super().seek, offset, whence)


def check_inside(path: str | os.PathLike[str], inside: str | os.PathLike[str]) -> None:
    """Refuse ``path`` (a file a checkpoint folder names) as unsafe when, symlinks followed, it lies outside
    the folder ``inside``: a shard linked to /dev/zero or to a file elsewhere is not the checkpoint's.  A hub
    cache snapshot's links into its own repo's blobs folder are the one way out that is allowed."""
    real = os.path.realpath(path)
    root = os.path.realpath(inside)
    if _within(real, root) or any(_within(real, blobs) for blobs in _hub_blobs(root)):
        return
    raise UnsafeInputError(path, None, f"leads to {real}, outside the checkpoint folder {root}: refused",
                           culprit=real)


def _within(real: str, root: str) -> bool:
    return os.path.commonpath((real, root)) == root


def _hub_blobs(root: str) -> list[str]:
    """The blobs folder of the hub cache repo whose snapshot holds ``root`` (none outside a hub cache)."""
    parts = root.split(os.sep)
    return [os.sep.join([*parts[:i + 1], "blobs"]) for i in range(1, len(parts) - 2)
            if parts[i].startswith(HUB_REPO_PREFIXES) and parts[i + 1] == "snapshots"]


def open_binary(path: str | os.PathLike[str], inside: str | os.PathLike[str] | None = None) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file, and (given ``inside``, the
    checkpoint folder that names it) unless it lies in that folder (``check_inside``).  O_NONBLOCK makes
    opening a FIFO with no writer return at once instead of waiting for one."""
    if "\0" in os.fspath(path):  # a name from the input (an index, DCP metadata): the OS takes none
        raise InputError(repr(os.fspath(path)), None, "a file name with a NUL byte: refused")
    if inside is not None:
        check_inside(path, inside)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(path, None, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind, why = next(((name, why) for test, name, why in _KINDS if test(mode)), ("something else", ""))
            raise InputError(path, None, f"is {kind}, not a regular file: refused{why}")
        os.set_blocking(fd, True)
        return _InputFile(fd, path)
    except BaseException:
        os.close(fd)
        raise
