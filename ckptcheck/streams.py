"""Output streams that cannot change a verdict: the exit status is the answer a CI gate reads, so a reader
that goes away (``ckptcheck check BAD | true``, ``| head``) or a stream closed at start (``>&-``) must not
turn a failing check into success or an internal error.

Every character written is one the stream can encode and a terminal shows rather than acts on
(``errors.printable``): names in the output come from the input, which may hold lone surrogates or ANSI escapes.

Once a stream's reader is gone its file descriptor is pointed at ``os.devnull`` (what the Python docs
recommend for SIGPIPE), and the command runs on to its own exit status with its output discarded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from .errors import printable


class _Guarded:
    """A text stream that discards output once its reader has gone, instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(printable(text, lines=True))
        except (BrokenPipeError, ConnectionResetError):
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ConnectionResetError):
            self._discard()

    def _discard(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        try:  # what was buffered for the reader goes to devnull now
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _open_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextmanager
def guarded_streams() -> Iterator[None]:
    """Within: stdout and stderr are safe to write whatever their readers do; both are flushed on the way
    out, while a reader that left can still be handled (not at interpreter exit)."""
    plain = []
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if not _open_fd(fd):
            # Closed at start: hold the descriptor with devnull, so that no file ckptcheck opens (a
            # checkpoint, a converter's output) becomes "stdout" for a child process that inherits it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        plain.append(getattr(sys, name) or open(fd, "w", closefd=False))
    sys.stdout, sys.stderr = (_Guarded(stream) for stream in plain)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = plain
