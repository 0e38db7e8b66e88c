"""An allowlisting unpickler: the only way ckptcheck ever reads a pickle.

Every global a pickle names is looked up in an explicit table of stand-ins that ckptcheck wrote itself
(plain records, never the real classes), so nothing from the file is imported or called.  A global outside
the table that is known inert data torch's ``weights_only`` loader refuses (``INERT_DATA``:
``argparse.Namespace``, numpy scalars) becomes a fresh ``Unknown`` record, named in ``refused``, and the
load goes on; any other global stops the load with ``UnsafeInputError``.

Whatever ``find_class`` returns is immutable or fresh per load, so ``BUILD`` cannot change it for the next
file; constructors whose result size the pickle chooses are charged to a budget bounded by its bytes.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import InputError, StandInError, UnsafeInputError

# The limits on one pickle, together.  Sizes come from the file wherever it can say more (``allowance``).
MAX_PICKLE_BYTES = 1 << 30  # a pickle read whole: the file holding it is read into memory (2x its size at most)
PER_BYTE = 2  # objects or elements a pickle may make per byte of it: the memory contract is twice the input
BASELINE = 1 << 16  # what any pickle may make besides: a tiny one still holds a dict of a few tensors
STRING_WEIGHT = 64  # bytes of a string or bytes value that count as one object when expanded
# Memory a pickle's new objects may take per byte of it (each charged about what CPython allocates for it:
# OBJECT_BYTES, plus a string's length): a real torch data.pkl makes about 7 bytes per byte, one byte of
# EMPTY_LIST makes a 56-byte list, and every object costs the checks that walk it as much again.
MADE_PER_BYTE = 16
OBJECT_BYTES = 64
MAX_UNKNOWN_GLOBALS = 256  # distinct refused globals in one pickle; a real checkpoint names a handful
MAX_INDEX = (1 << 63) - 1  # a size, offset or count: what fits torch's int64
MAX_RANK = 64  # dimensions of a tensor a pickle may declare; torch itself allows 64
MAX_INT_BITS = 8192  # Python refuses to print an int of more than 4300 digits (about 14000 bits)
MAX_SCAN_OPCODES = 1 << 22  # opcodes one scan follows (a few seconds); no unloaded checkpoint pickle nears it


def allowance(size: int) -> int:
    """Objects (or elements) a pickle of ``size`` bytes may make, counting shared references each time."""
    return PER_BYTE * size + BASELINE


# The only globals outside a reader's allowlist a pickle may name: classes known to be inert data that
# torch's weights_only loader still refuses, so safe to pass to ``torch.serialization.add_safe_globals``.
# Every other global is unsafe, whatever its name: code that runs hides under any module (``pydoc.pipepager``,
# ``codecs.open``, ``weakref.finalize``), so only a short list of known data is let through.
# ``collections.defaultdict`` calls its factory on a missing key: the factory is a global the pickle names
# too, and so itself must be allowlisted or inert.
INERT_DATA = frozenset({
    ("argparse", "Namespace"), ("numpy", "dtype"), ("numpy", "ndarray"),
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("scalar", "_reconstruct")),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
    *(("datetime", n) for n in ("datetime", "date", "time", "timedelta", "timezone")),
    ("collections", "defaultdict"),
})
# numpy's per-dtype classes (``numpy.dtypes.Float32DType``), under this module and with this suffix.
_INERT_CLASS_FAMILIES = (("numpy.dtypes", "DType"),)


def py3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 spelling of a global, as pickle's own find_class maps it (torch.save writes protocol 2,
    whose pickles say ``__builtin__.bytearray``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def is_inert_data(module: str, name: str) -> bool:
    """Whether the global is a class known to be inert data (``INERT_DATA``); nothing else outside an
    allowlist is ever let through."""
    if not isinstance(module, str) or not isinstance(name, str):
        return False
    module, name = py3_name(module, name)
    return (module, name) in INERT_DATA or any(
        module == m and name.endswith(suffix) and name.isidentifier() and not name.startswith("_")
        for m, suffix in _INERT_CLASS_FAMILIES
    )


class Frozen(type):
    """Metaclass of every class a pickle can reach: ``BUILD``'s setattr cannot change it for later loads."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"attempt to set {name!r} on the class {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise pickle.UnpicklingError(f"attempt to delete {name!r} from the class {cls.__name__}")


class Function:
    """A table's callable as a pickle sees it: no attributes to set, no state to BUILD into."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"attempt to set {name!r} on an allowlisted global")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on an allowlisted global")


@dataclass(frozen=True, slots=True)
class Sized:
    """A constructor whose result's size the pickle chooses (``bytearray(3 << 30)``): ``cost`` says how
    many elements a call allocates, from its arguments and without allocating, charged to the load's budget."""

    build: Callable[..., Any]
    cost: Callable[..., int]


@dataclass(frozen=True, slots=True)
class TorchRefuses:
    """A global ckptcheck reads but torch's weights_only loader refuses (``builtins.frozenset``,
    ``torch.float``): the load goes on with ``entry`` and the global is named in ``refused``, so the verdict
    is torch's."""

    entry: Any


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A global torch's weights_only loader reads but ckptcheck does not (a quantized tensor, an exotic
    dtype): naming it stops the load as bad input, not as an attack."""

    what: str


class _Budget:
    """Elements a load may allocate through ``Sized`` constructors: proportional to the pickle's bytes."""

    def __init__(self, size: int) -> None:
        self.left = allowance(size)

    def charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:  # an int of more than 4300 digits cannot even be printed
            asked = str(n) if n.bit_length() <= 64 else f"a {n.bit_length()}-bit number of"
            raise InputError(None, None, f"a constructor in the pickle asks for {asked} elements, more than "
                             "its bytes can hold")

    def bind(self, sized: Sized) -> Function:
        def call(*args: Any) -> Any:
            self.charge(sized.cost(*args))
            return sized.build(*args)

        return Function(call)


def _length(value: Any = (), *_rest: Any) -> int:
    """Elements ``bytearray``/``set``/``tuple`` would make of ``value``: an int is a size, else its length."""
    if isinstance(value, int) and not isinstance(value, bool):
        return max(value, 0)
    return len(value)  # TypeError for anything unsized: a malformed pickle


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell ``bytes`` as ``_codecs.encode(str, 'latin1')``; allow only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode with unexpected arguments")
    return text.encode(encoding)


class AttrDict(dict, metaclass=Frozen):
    """What an OrderedDict unpickles to: a dict that also takes attributes, because a module's
    ``state_dict()`` pickles its ``_metadata`` attribute with it."""


class Record:
    """Base of the records a reader makes of what a pickle names (a tensor, a storage): never the object, so
    never written out as a value."""

    __slots__ = ()
    what: ClassVar[str] = "a record"


class Unknown(metaclass=Frozen):
    """A known inert data global outside the allowlist, kept unexecuted: calling, NEWOBJ, BUILD and item
    opcodes only record their arguments.  ``find_class`` makes one subclass per global per load."""

    __slots__ = ("args", "state", "contents")
    global_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Unknown:
        obj = object.__new__(cls)
        for slot, value in (("args", (*args, *kwargs.items())), ("state", None), ("contents", [])):
            object.__setattr__(obj, slot, value)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"attempt to set {name!r} on a stand-in for {self.global_name}")

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.contents.append((key, value))

    def append(self, value: Any) -> None:
        self.contents.append(value)

    def extend(self, values: Any) -> None:
        self.contents.extend(values)

    add = append

    def __repr__(self) -> str:
        return f"<{self.global_name}, kept unexecuted>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        """A stand-in is not the object: writing it out would put a ckptcheck class in the output."""
        refuse_stand_ins(self, path=None, item=None)


# Containers that any pickle may use; safe because calling them runs no user code.
BASIC_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): AttrDict,
    ("builtins", "set"): Sized(set, _length),
    ("builtins", "frozenset"): TorchRefuses(Sized(frozenset, _length)),
    ("builtins", "complex"): Function(complex),
    ("builtins", "slice"): TorchRefuses(Function(slice)),
    ("builtins", "bytearray"): Sized(bytearray, _length),
    ("_codecs", "encode"): Sized(_codecs_encode, _length),
}



def is_index(value: Any) -> bool:
    """A size, offset or count a pickle may declare: a non-negative int that fits in 64 bits (a larger one
    would cost time in arithmetic and fail to print)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INDEX


class _Unpickler(pickle.Unpickler):
    def __init__(
        self,
        stream: Any,
        *,
        path: str,
        member: str,
        allowed: Mapping[tuple[str, str], Any],
        persistent_load: Callable[[Any], Any] | None,
        size: int,
        refused: set[str] | None,
    ) -> None:
        super().__init__(stream)
        self._path, self._member, self._allowed = path, member, allowed
        self._persistent = persistent_load
        self._budget = _Budget(size)
        self.size = size
        self._refused = refused
        self._unknown: dict[str, type[Unknown]] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            entry = self._allowed[py3_name(module, name)]
        except (KeyError, TypeError):
            return self._not_allowed(module, name)
        if isinstance(entry, TorchRefuses):
            if self._refused is not None:
                self._refused.add(".".join(py3_name(module, name)))
            entry = entry.entry
        if isinstance(entry, Unsupported):
            raise InputError(self._path, self._member, f"pickle global {module}.{name}: ckptcheck does not read "
                             f"{entry.what}")
        return self._budget.bind(entry) if isinstance(entry, Sized) else entry

    def _not_allowed(self, module: str, name: str) -> type[Unknown]:
        if self._refused is None or not is_inert_data(module, name):
            raise _refusal(module, name, self._path, self._member, "refused to load")
        culprit = f"{module}.{name}"
        if culprit not in self._unknown:
            if len(self._unknown) >= MAX_UNKNOWN_GLOBALS:  # each costs a class: bound them, not the file
                raise InputError(self._path, self._member, f"names more than {MAX_UNKNOWN_GLOBALS} globals "
                                 "outside the allowlist")
            self._unknown[culprit] = Frozen(name, (Unknown,), {"__slots__": (), "global_name": culprit})
        self._refused.add(culprit)
        return self._unknown[culprit]

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
    refused: set[str] | None = None,
    opcodes: set[str] | None = None,
) -> Any:
    """Unpickle ``data`` through ``allowed`` only.  Errors come back as one-line ``CkptError``s.

    With ``refused`` (a set to fill), a global in ``INERT_DATA`` but not allowed becomes an ``Unknown``
    record and its name is added; without it, such a global is refused as unsafe like any other.
    ``require_single`` refuses bytes after the STOP opcode: a second pickle appended to a benign one is
    how payloads hide from scanners that stop at the first.  ``opcodes``: a set to fill with the names of
    the opcodes the pickle uses.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise InputError(path, member, f"pickle of {len(data)} bytes exceeds the {MAX_PICKLE_BYTES} byte limit")
    _check_expansion(io.BytesIO(data), len(data), path=path, member=member, opcodes=opcodes)
    stream = io.BytesIO(data)
    obj = _load(_Unpickler(stream, path=path, member=member, allowed=allowed, persistent_load=persistent_load,
                           size=len(data), refused=refused), path, member)
    if require_single and stream.tell() != len(data):
        rest = data[stream.tell():]
        if rest.strip(b"\x00"):
            try:
                _scan_all(rest, path=path, member=member, allowed=allowed,
                          how="in a pickle appended after the first, found without loading it")
            except _Unprovable:
                pass
            raise InputError(path, member, f"{len(rest)} unexpected bytes after the end of the pickle")
    return obj


def safe_load_stream(
    f: Any,
    *,
    path: str,
    member: str,
    allowed: Mapping[tuple[str, str], Any],
    size: int,
    persistent_load: Callable[[Any], Any] | None = None,
    refused: set[str] | None = None,
    opcodes: set[str] | None = None,
) -> Any:
    """Unpickle one pickle from an open binary file, leaving it positioned right after it (the legacy
    torch format stacks several pickles and then raw storage bytes in one file).  ``size``: the bytes
    left in the file, which bound what the pickle may allocate."""
    start = f.tell()
    _check_expansion(f, size, path=path, member=member, opcodes=opcodes)
    f.seek(start)
    return _load(_Unpickler(f, path=path, member=member, allowed=allowed, persistent_load=persistent_load,
                            size=size, refused=refused), path, member)


def _load(unpickler: _Unpickler, path: str, member: str) -> Any:
    """Run the unpickler; whatever a malformed pickle raises becomes one ``InputError`` line."""
    try:
        obj = unpickler.load()
        _check_ints(obj)
        _check_expanded_size(obj, unpickler.size)
        return obj
    except UnsafeInputError:
        raise
    except InputError as exc:
        raise InputError(exc.path or path, exc.item or member, exc.cause) from None
    except RecursionError:
        raise InputError(path, member, "pickle nests too deeply") from None
    except MemoryError:
        raise InputError(path, member, "pickle asks for more memory than it can hold") from None
    except Exception as exc:  # malformed pickles raise anything from UnpicklingError to IndexError
        raise InputError(path, member, f"malformed pickle ({type(exc).__name__}: {_short(exc)})") from None




def _check_ints(obj: Any) -> None:
    """Refuse an int no checkpoint holds anywhere in the object: printing it in a report would fail, and
    arithmetic on it costs time quadratic in its size."""
    for o in _parts(obj):
        if isinstance(o, int) and o.bit_length() > MAX_INT_BITS:
            raise InputError(None, None, f"the pickle holds an integer of {o.bit_length()} bits")


def _check_expanded_size(obj: Any, size: int) -> None:
    """Refuse a pickle whose shared references expand to far more than its bytes: each reference costs the
    pickle a byte or more, so a checkpoint's object tree, with every shared object counted at every place it
    is reached, is about its size.  Forty nested ``{"a": d, "b": d}`` take 2 KB and expand to 2**40 paths,
    which any walk, ``str()`` or report of the object would follow.  Strings weigh by their length."""
    limit = allowance(size)
    expanded: dict[int, int] = {}
    todo: list[tuple[Any, bool]] = [(obj, False)]
    open_: set[int] = set()
    while todo:
        o, done = todo.pop()
        key = id(o)
        if done:
            open_.discard(key)
            expanded[key] = 1 + sum(expanded[id(c)] for c in _children(o))
            if expanded[key] > limit:
                raise InputError(None, None, f"shared references in the pickle expand to more than {limit} "
                                 "objects, far more than its bytes hold")
            continue
        if key in expanded:
            continue
        if key in open_:
            raise InputError(None, None, "a container in the pickle contains itself")
        if isinstance(o, (str, bytes, bytearray)):
            expanded[key] = 1 + len(o) // STRING_WEIGHT
            continue
        open_.add(key)
        todo.append((o, True))
        todo += ((c, False) for c in _children(o))


# Opcodes that add to the object below them on the stack rather than make a new one.
_MUTATORS = frozenset(("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"))
# Opcodes whose value makes no new object, or none the pickle can multiply: singletons, cached small ints, and
# globals (the class or function itself); the mutators grow an existing object by a pointer per item.
_CACHED = _MUTATORS | {"BININT1", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE", "GLOBAL", "STACK_GLOBAL"}


def _check_expansion(stream: Any, size: int, *, path: str, member: str, opcodes: set[str] | None = None) -> None:
    """``_check_expanded_size`` before loading, on the opcodes alone: loading itself hashes dict keys and set
    elements, and a tuple's hash walks every path through it (sixty nested ``(t, t)`` never finish).  Each
    stack value is a cell holding its expanded size; the memo and DUP share cells, so a reference counts
    the whole object again.  ``size``: the pickle's bytes, or those left in the file it is read from.
    ``opcodes``: filled with the names of the opcodes followed."""
    limit = allowance(size)
    made, made_limit = 0, MADE_PER_BYTE * size + OBJECT_BYTES * BASELINE
    values: list[list[int]] = []
    marks: list[int] = []
    memo: dict[int, list[int]] = {}
    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if opcodes is not None:
                opcodes.add(name)
            if name == "MARK":
                marks.append(len(values))
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = values[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET", "DUP"):
                values.append(values[-1] if name == "DUP" else memo[int(arg)])
            elif name == "POP" and len(values) == (marks[-1] if marks else 0):
                marks.pop()  # POP with nothing above a MARK pops the mark, as the unpickler does
            else:
                before = op.stack_before
                popped: list[list[int]] = []
                if pickletools.markobject in before:
                    start = marks.pop()
                    popped, values[start:] = values[start:], []
                    before = before[:before.index(pickletools.markobject)]
                for _ in before:
                    popped.append(values.pop())
                if name == "STOP":
                    return
                own = len(arg) // STRING_WEIGHT if isinstance(arg, (str, bytes)) else 0
                if name not in _CACHED:
                    made += OBJECT_BYTES + (len(arg) if isinstance(arg, (str, bytes)) else 0)
                    if made > made_limit:
                        raise InputError(path, member, f"the pickle makes objects of more than {made_limit} bytes "
                                         f"from {size} bytes, far more than a checkpoint makes: refused before "
                                         "loading it")
                if name in _MUTATORS:
                    cell = popped.pop()  # the object below the items
                    cell[0] += sum(c[0] for c in popped)
                    values.append(cell)
                else:
                    values += ([1 + own + sum(c[0] for c in popped)] for _ in op.stack_after)
            if values and values[-1][0] > limit:
                raise InputError(path, member, f"shared references in the pickle expand to more than {limit} "
                                 "objects, far more than its bytes hold")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
        # Never fall through to the unpickler: what follows was never checked.  Where pickletools refuses an
        # argument the C unpickler may parse it (``I0x10``: int(s, 0)) and run on: code is not ruled out.
        if isinstance(exc, ValueError) and not any(m in str(exc) for m in _BOTH_REFUSE):
            raise UnsafeInputError(path, member, f"pickle cannot be proven free of code (its opcodes cannot be "
                                   f"followed: {_short(exc)}); found without loading it",
                                   "unparseable pickle") from None
        raise InputError(path, member, f"malformed pickle: its opcodes cannot be followed ({_short(exc)})") from None


# pickletools errors the real unpickler meets at the same byte too: the data ends, or the opcode is unknown.
_BOTH_REFUSE = ("not enough data", "remain", "exhausted", "no newline", "unknown", "byte count", "quote")


def _children(o: Any) -> tuple[Any, ...]:
    """The objects a container, stand-in or record holds (what ``_parts`` follows)."""
    if isinstance(o, (int, str, bytes, bytearray, float, complex, type)):
        return ()
    if isinstance(o, dict):
        kids: tuple[Any, ...] = (*o.keys(), *o.values())
    elif isinstance(o, (list, tuple, set, frozenset)):
        kids = tuple(o)
    elif isinstance(o, slice):
        kids = (o.start, o.stop, o.step)
    elif isinstance(o, Unknown):
        kids = (o.args, o.state, o.contents)
    else:
        kids = ()
    attrs = getattr(o, "__dict__", None)
    return (*kids, attrs) if isinstance(attrs, dict) else kids


def refuse_stand_ins(obj: Any, *, path: str | None, item: str | None) -> None:
    """Before writing values read from a checkpoint: an ``Unknown`` stand-in is not the object it names."""
    for o in _parts(obj):
        if isinstance(o, Unknown):
            raise StandInError(path, item, o.global_name)
        if isinstance(o, Record):
            raise StandInError(path, item, f"{o.what} inside a value", remedy="re-save the checkpoint with it "
                               "as an entry of its own")


def _parts(obj: Any) -> Iterator[Any]:
    """Every object reachable from ``obj`` through containers, stand-ins and records, each once."""
    seen: set[int] = set()
    todo = [obj]
    while todo:
        o = todo.pop()
        yield o
        if isinstance(o, (int, str, bytes, bytearray, float, complex, type)) or id(o) in seen:
            continue
        seen.add(id(o))
        todo += _children(o)


class _Unprovable(Exception):
    """The opcodes cannot be followed far enough to name every global the pickle would import."""


class _Malformed(_Unprovable):
    """The real unpickler fails at the same opcode (the data ends, an unknown opcode, a stack underflow, a
    memo miss): every global before it was checked, and nothing after it ever runs."""


def scan_globals(data: bytes, *, path: str, member: str, allowed: Mapping[tuple[str, str], Any],
                 malformed_is_harmless: bool = False) -> None:
    """Follow a pickle's opcodes on a simulated stack (nothing is built or imported) and refuse any global
    outside ``allowed`` and ``INERT_DATA``, in every pickle the bytes hold.  A pickle whose globals cannot
    be named (malformed opcodes, a STACK_GLOBAL on values that are not known strings) cannot be proven free
    of code: unsafe.
    ``malformed_is_harmless``: ``data`` is all the unpickler would read, so bytes it fails on at once are
    merely not a pickle (a text file whose first letter is an opcode), not unsafe."""
    how = "found without loading it"
    try:
        _scan_all(data, path=path, member=member, allowed=allowed, how=how)
    except _Unprovable as exc:
        if malformed_is_harmless and isinstance(exc, _Malformed):
            return
        raise UnsafeInputError(path, member, f"pickle cannot be proven free of code ({exc}); {how}",
                               "unparseable pickle") from None


def looks_like_pickle(head: bytes) -> bool:
    """Whether a file's first bytes are pickle opcodes, of any protocol (torch.load unpickles a file that
    is not a zip archive): they parse, up to a STOP or the end of ``head``."""
    if not head or head[:1] not in _FIRST_OPCODES:
        return False
    if head[:2] in _PROTO_HEADS:  # what torch.save and pickle.dumps write first: a pickle, whatever follows
        return True
    try:
        for op, _arg, _pos in pickletools.genops(io.BytesIO(head)):
            if op.name == "STOP":
                return True
    except ValueError as exc:
        return any(cut in str(exc) for cut in ("remain", "exhausted", "newline"))  # cut off by the head's end
    return True


# What pickle.dumps writes first, by protocol: PROTO (2+), or a protocol 0/1 value or container opcode.
_FIRST_OPCODES = frozenset(bytes([c]) for c in b"\x80(}])cNIJKLMFGSTUVX\x88\x89")
_PROTO_HEADS = frozenset(bytes([0x80, n]) for n in range(2, pickle.HIGHEST_PROTOCOL + 1))


def torch_would_unpickle(head: bytes) -> bool:
    """Whether torch.load would run the unpickler on a file that starts with ``head`` and is no zip
    archive: it unpickles whatever is not one, and the unpickler gets past the first opcode when that
    opcode needs nothing on the stack or in the memo.  No further parsing: ``pickletools`` and the real
    unpickler read some arguments differently (``I0x10``), so only the first byte is trusted."""
    return head[:1] in _START_OPCODES


# Opcodes that need nothing below them (the memo ones need a value or an entry; NEXT_BUFFER a buffer).
_START_OPCODES = frozenset(
    op.code.encode("latin-1") for op in pickletools.opcodes
    if not op.stack_before and op.name not in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET",
                                               "NEXT_BUFFER")
)


def _scan_all(data: bytes, *, path: str, member: str, allowed: Mapping[tuple[str, str], Any], how: str) -> None:
    stream = io.BytesIO(data)
    end = len(data.rstrip(b"\x00"))  # zero padding after the last pickle is not another one
    budget = [MAX_SCAN_OPCODES]
    while stream.tell() < end:
        _scan_one(stream, path=path, member=member, allowed=allowed, how=how, budget=budget)


_VALUE = object()  # anything but a string the scan needs to know
_STRING_OPS = frozenset(("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"))


class _Stack:
    """The unpickler's stack as the scan sees it: values, and MARK positions kept apart (as the C
    unpickler keeps them), so that every opcode costs time proportional to what it pops."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.marks: list[int] = []

    def push(self, *values: Any) -> None:
        self.values += values

    def pop(self) -> Any:
        if len(self.values) <= (self.marks[-1] if self.marks else 0):
            raise _Malformed("stack underflow")
        return self.values.pop()

    def top(self) -> Any:
        value = self.pop()
        self.values.append(value)
        return value

    def pop_mark(self) -> None:
        if not self.marks:
            raise _Malformed("no MARK to pop to")
        del self.values[self.marks.pop():]

    def apply(self, op: pickletools.OpcodeInfo) -> None:
        """An opcode's generic stack effect, from pickletools' own description of it."""
        before = op.stack_before
        if pickletools.markobject in before:
            self.pop_mark()
            before = before[:before.index(pickletools.markobject)]
        for _ in before:
            self.pop()
        self.push(*(_VALUE for _ in op.stack_after))


def _scan_one(stream: io.BytesIO, *, path: str, member: str, allowed: Mapping[tuple[str, str], Any],
              how: str, budget: list[int]) -> None:
    """One pickle, STOP included, on a simulated stack: strings are kept, everything else is ``_VALUE``.
    ``budget``: opcodes left to follow, shared by the pickles of one scan."""
    stack = _Stack()
    memo: dict[int, Any] = {}
    try:
        for op, arg, pos in pickletools.genops(stream):
            budget[0] -= 1
            if budget[0] < 0:
                raise _Unprovable(f"more than {MAX_SCAN_OPCODES} opcodes to follow")
            name = op.name
            if name in _STRING_OPS:
                stack.push(str(arg))
            elif name == "MARK":
                stack.marks.append(len(stack.values))
            elif name == "POP_MARK":
                stack.pop_mark()
            elif name == "POP":  # a value, or the mark itself when nothing is above it
                if len(stack.values) > (stack.marks[-1] if stack.marks else 0):
                    stack.pop()
                else:
                    stack.pop_mark()
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                _check_global(module, attr, path=path, member=member, allowed=allowed, how=how)
                stack.apply(op)
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                if not isinstance(module, str) or not isinstance(attr, str):
                    raise _Unprovable(f"STACK_GLOBAL at byte {pos} on values that are not known strings")
                _check_global(module, attr, path=path, member=member, allowed=allowed, how=how)
                stack.push(_VALUE)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack.top()
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise _Malformed(f"memo {arg} read before it is written, at byte {pos}")
                stack.push(memo[int(arg)])
            elif name == "DUP":
                stack.push(stack.top())
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise _Unprovable(f"extension code {arg} names a global only the loading process knows")
            elif name == "STOP":
                stack.pop()
                return
            else:
                stack.apply(op)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:  # genops on malformed bytes
        both = isinstance(exc, ValueError) and any(m in str(exc) for m in _BOTH_REFUSE)
        raise (_Malformed if both else _Unprovable)(_short(exc)) from None
    raise _Unprovable("no STOP opcode")


def _check_global(module: str, name: str, *, path: str, member: str, allowed: Mapping[tuple[str, str], Any],
                  how: str) -> None:
    if py3_name(module, name) not in allowed and not is_inert_data(module, name):
        raise _refusal(module, name, path, member, how)


def _refusal(module: str, name: str, path: str, member: str, how: str) -> UnsafeInputError:
    culprit = f"{module}.{name}"
    return UnsafeInputError(path, member, f"pickle global {culprit} (outside the allowlist and not known inert "
                            f"data: importing and calling it can execute code); {how}", culprit)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."

