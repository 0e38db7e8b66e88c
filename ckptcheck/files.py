"""Opening an input file: the one place every reader goes through."""

from __future__ import annotations

import io
import os
import stat
from typing import Any, BinaryIO

from .errors import InputError

# What a path that is no regular file is, for the one-line refusal (reading a FIFO or a device blocks
# forever or never ends).
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


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


def open_binary(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file.  O_NONBLOCK makes opening a FIFO
    with no writer return at once instead of waiting for one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(path, None, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise InputError(path, None, f"is {kind}, not a regular file: refused (reading it could block forever)")
        os.set_blocking(fd, True)
        return _InputFile(fd, path)
    except BaseException:
        os.close(fd)
        raise
