"""An allowlisting unpickler: the only way ckptcheck ever reads a pickle.

Every global a pickle names is looked up in an explicit table of stand-ins that ckptcheck wrote itself
(plain records, never the real classes), so nothing from the file is imported or called.  The first
global outside the table stops the load with ``UnsafeInputError`` naming it; nothing after it is read.
Opcodes that build objects without a global (``NEWOBJ``, ``BUILD``, ``REDUCE``) can only reach callables
that came out of this table, which is what makes the allowlist sufficient.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping
from typing import Any

from .errors import InputError, UnsafeInputError

# Globals that are known to run code or reach the system; named as such in the report.  Anything else
# outside an allowlist is still refused, just described as "not on the allowlist".
_DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "runpy", "pip", "importlib", "pkgutil", "shutil",
    "socket", "webbrowser", "ctypes", "pty", "code", "codeop", "commands", "marshal", "pickle",
    "_pickle", "dill", "cloudpickle", "asyncio", "multiprocessing", "signal", "tempfile", "requests",
    "urllib", "http", "ftplib", "smtplib", "telnetlib", "platform", "types", "operator", "functools",
)
_DANGEROUS_NAMES = {
    ("builtins", n) for n in (
        "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
        "locals", "vars", "breakpoint", "input", "help", "apply", "execfile", "file", "reload",
    )
} | {("__builtin__", n) for n in ("eval", "exec", "compile", "open", "__import__", "getattr", "apply")} | {
    ("torch", "load"), ("torch.serialization", "load"), ("torch", "_load_global_deps"),
    ("torch.hub", "load"), ("torch.jit", "load"), ("numpy", "load"), ("numpy.lib.npyio", "load"),
}


def is_dangerous(module: str, name: str) -> bool:
    root = module.split(".", 1)[0]
    return root in _DANGEROUS_MODULES or (module, name) in _DANGEROUS_NAMES


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell ``bytes`` as ``_codecs.encode(str, 'latin1')``; allow only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode with unexpected arguments")
    return text.encode(encoding)


class AttrDict(dict):
    """What an OrderedDict unpickles to: a dict that also takes attributes, because a module's
    ``state_dict()`` pickles its ``_metadata`` attribute with it."""


# Containers that any pickle may use; safe because calling them runs no user code.
BASIC_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): AttrDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _codecs_encode,
    ("__builtin__", "set"): set,
}

MAX_PICKLE_BYTES = 1 << 30


class _Unpickler(pickle.Unpickler):
    def __init__(
        self,
        stream: Any,
        *,
        path: str,
        member: str,
        allowed: Mapping[tuple[str, str], Any],
        persistent_load: Callable[[Any], Any] | None,
    ) -> None:
        super().__init__(stream)
        self._path, self._member, self._allowed = path, member, allowed
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise _refusal(module, name, self._path, self._member, "refused to load") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id in a pickle that allows none")
        return self._persistent(pid)


def safe_loads(
    data: bytes,
    *,
    path: str,
    member: str,
    allowed: Mapping[tuple[str, str], Any],
    persistent_load: Callable[[Any], Any] | None = None,
    require_single: bool = True,
) -> Any:
    """Unpickle ``data`` through ``allowed`` only.  Errors come back as one-line ``CkptError``s.

    ``require_single`` refuses bytes after the STOP opcode: a second pickle appended to a benign one is
    how payloads hide from scanners that stop at the first.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise InputError(path, member, f"pickle of {len(data)} bytes exceeds the {MAX_PICKLE_BYTES} byte limit")
    stream = io.BytesIO(data)
    obj = _load(_Unpickler(stream, path=path, member=member, allowed=allowed, persistent_load=persistent_load),
                path, member)
    if require_single and stream.tell() != len(data):
        rest = data[stream.tell():]
        if rest.strip(b"\x00"):
            _scan_trailing(rest, path=path, member=member, allowed=allowed,
                           how="in a pickle appended after the first, found without loading it")
            raise InputError(path, member, f"{len(rest)} unexpected bytes after the end of the pickle")
    return obj


def safe_load_stream(
    f: Any,
    *,
    path: str,
    member: str,
    allowed: Mapping[tuple[str, str], Any],
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Unpickle one pickle from an open binary file, leaving it positioned right after it (the legacy
    torch format stacks several pickles and then raw storage bytes in one file)."""
    return _load(_Unpickler(f, path=path, member=member, allowed=allowed, persistent_load=persistent_load),
                 path, member)


def _load(unpickler: _Unpickler, path: str, member: str) -> Any:
    """Run the unpickler; whatever a malformed pickle raises becomes one ``InputError`` line."""
    try:
        return unpickler.load()
    except (UnsafeInputError, InputError):
        raise
    except RecursionError:
        raise InputError(path, member, "pickle nests too deeply") from None
    except MemoryError:
        raise InputError(path, member, "pickle asks for more memory than it can hold") from None
    except Exception as exc:  # malformed pickles raise anything from UnpicklingError to IndexError
        raise InputError(path, member, f"malformed pickle ({type(exc).__name__}: {_short(exc)})") from None


def scan_globals(data: bytes, *, path: str, member: str, allowed: Mapping[tuple[str, str], Any]) -> None:
    """Walk a pickle's opcodes (nothing is executed or built) and refuse any global outside ``allowed``,
    in every pickle the bytes hold, one after another."""
    _scan_trailing(data, path=path, member=member, allowed=allowed, how="found without loading it")


def _scan_trailing(rest: bytes, *, path: str, member: str, allowed: Mapping[tuple[str, str], Any],
                   how: str) -> None:
    """Name the global of a second, appended pickle, if it has one, so it is reported as unsafe."""

    stream = io.BytesIO(rest)
    while stream.tell() < len(rest):
        start = stream.tell()
        _scan_one(stream, path=path, member=member, allowed=allowed, how=how)
        if stream.tell() == start:
            return


def _scan_one(stream: io.BytesIO, *, path: str, member: str, allowed: Mapping[tuple[str, str], Any],
              how: str) -> None:
    import pickletools

    # A symbolic stack of the strings that matter: STACK_GLOBAL takes its module and name from the two
    # most recent ones, which memo tricks (PUT then GET) can bring back from far earlier.
    memo: dict[int, str | None] = {}
    memo_count = 0
    last: list[str] = []
    pushed: str | None = None
    try:
        for op, arg, _pos in pickletools.genops(stream):
            was, pushed = pushed, None
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING",
                           "BINUNICODE8"):
                pushed = str(arg)
                last = (last + [pushed])[-2:]
            elif op.name == "MEMOIZE":
                memo[memo_count] = was
                memo_count += 1
                pushed = was
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = was
                pushed = was
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                pushed = memo.get(int(arg))
                if pushed is not None:
                    last = (last + [pushed])[-2:]
            elif op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                _check_global(module, name, path=path, member=member, allowed=allowed, how=how)
            elif op.name == "STACK_GLOBAL" and len(last) == 2:
                _check_global(last[0], last[1], path=path, member=member, allowed=allowed, how=how)
    except UnsafeInputError:
        raise
    except Exception:
        stream.seek(0, 2)  # unreadable past here: nothing more to scan


def _check_global(module: str, name: str, *, path: str, member: str, allowed: Mapping[tuple[str, str], Any],
                  how: str) -> None:
    if (module, name) not in allowed:
        raise _refusal(module, name, path, member, how)


def _refusal(module: str, name: str, path: str, member: str, how: str) -> UnsafeInputError:
    culprit = f"{module}.{name}"
    why = "known to execute code or reach the system" if is_dangerous(module, name) else "not on the allowlist"
    return UnsafeInputError(path, member, f"pickle global {culprit} ({why}); {how}", culprit)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
