"""Opening an input file: the one place every reader goes through."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from .errors import InputError

# What a path that is no regular file is, for the one-line refusal (reading a FIFO or a device blocks
# forever or never ends).
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


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
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
