"""The two ways reading a checkpoint can go wrong, kept apart because they end differently.

``InputError``: the file is unreadable or invalid (exit status 2, one line naming file, item and cause).
``UnsafeInputError``: the file asks to run code or load something outside the allowlist; it is reported
as a check with status ``unsafe`` (exit status 1), never loaded further.
"""

from __future__ import annotations

import re
from pathlib import Path

# Characters a terminal or a log reader would act on instead of showing: C0/C1 controls (a newline splits the
# one-line rule, ESC starts an ANSI sequence), the Unicode line separators, and lone surrogates (which no
# encoder writes).  Names come from the input, so they are shown escaped, never acted on.
_LAID_OUT = "\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
_UNPRINTABLE = {False: re.compile(f"[\t\n{_LAID_OUT}]"), True: re.compile(f"[{_LAID_OUT}]")}


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, lines: bool = False) -> str:
    """``text`` with every character a reader would act on escaped (``\\n``, ``\\x1b``, ``\\ud800``);
    ``lines``: text laid out by ckptcheck itself, whose newlines and tabs are kept."""
    return _UNPRINTABLE[lines].sub(_escape, text)


class CkptError(Exception):
    """Base of every error ckptcheck reports to a user as one line."""

    def __init__(self, path: str | Path | None, item: str | None, cause: str) -> None:
        self.path = str(path) if path is not None else None
        self.item = item
        self.cause = cause
        super().__init__(self.line())

    def line(self) -> str:
        parts = [p for p in (self.path, self.item) if p]
        return printable(": ".join([*parts, self.cause]))

    def __reduce__(self) -> tuple[object, ...]:
        """Picklable as itself: torch.distributed hands a rank's exception to the other ranks pickled,
        and the default (``cls(*args)``) does not fit this constructor."""
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[CkptError], args: tuple[object, ...], state: dict[str, object]) -> CkptError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class InputError(CkptError):
    """Unreadable or invalid input: a checkpoint, a config or a command-line value."""


class StandInError(InputError):
    """A value kept unexecuted (an inert stand-in for a global torch's weights_only loader refuses) was about
    to be written out.  ``remedy`` is the caller's way out, so each command can name its own flag."""

    def __init__(self, path: str | Path | None, item: str | None, global_name: str,
                 remedy: str = "leave it behind (--weights-only) or re-save the checkpoint without it") -> None:
        self.global_name = global_name
        super().__init__(path, item, f"holds {global_name}, kept unexecuted, which cannot be written to the "
                                     f"output: {remedy}")


class UnsafeInputError(CkptError):
    """The input tried to reach code outside the allowlist (a pickle global, a path escaping its folder)."""

    def __init__(self, path: str | Path | None, item: str | None, cause: str, culprit: str) -> None:
        self.culprit = culprit
        super().__init__(path, item, cause)
