"""The allowlist for pickles that ``torch.save`` writes, and the records they turn into.

Tensors come out as ``TensorRef``s (storage key, dtype, offset, shape, stride) and storages as
``StorageRef``s: no storage is built and no byte of tensor data is read.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import dtypes
from ..safe_pickle import (BASIC_GLOBALS, MAX_RANK, Function, Record, Sized, TorchRefuses, Unsupported, is_index,
                           safe_loads)


@dataclass(frozen=True, slots=True)
class StorageRef(Record):
    what: ClassVar[str] = "a storage"
    key: str
    dtype: str
    numel: int  # in elements of dtype
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)

    def __reduce__(self) -> Any:
        return StorageRef, (self.key, self.dtype, self.numel, self.location)

    def __setstate__(self, state: Any) -> None:
        """BUILD on a storage: torch's weights_only loader has nothing to set on one either."""
        raise MalformedTensor("BUILD on a storage: torch.load refuses it")


@dataclass(frozen=True, slots=True)
class TensorRef(Record):
    """A tensor as the pickle rebuilds it; only ``_tensor`` makes one, from checked values."""

    what: ClassVar[str] = "a tensor"
    storage: StorageRef
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def extent(self) -> int:
        """Elements of storage the tensor spans from its offset (0 for an empty tensor)."""
        if self.numel == 0:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    def __reduce__(self) -> Any:
        return TensorRef, (self.storage, self.offset, self.shape, self.stride, self.dtype)

    def __setstate__(self, state: Any) -> None:
        """BUILD on a rebuilt tensor: torch's weights_only loader runs ``tensor.set_(*state)``; so do we, on the
        record, through the same checks as a rebuild (pickle's generic BUILD would set the fields unchecked)."""
        new = _set(self, state)
        for name in ("storage", "offset", "shape", "stride"):
            object.__setattr__(self, name, getattr(new, name))


class _Marker(str):
    """A pickled torch global that only names something (a dtype, a storage class, a layout); without a
    ``__dict__``, so that BUILD cannot change the shared instance."""

    __slots__ = ()


class _StorageType(_Marker):
    __slots__ = ()


class _Dtype(_Marker):
    __slots__ = ()


class MalformedTensor(ValueError):
    pass


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_RANK or not all(is_index(v) for v in value):
        raise MalformedTensor(f"{what} is not a tuple of at most {MAX_RANK} non-negative 64-bit integers")
    return value


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise MalformedTensor("tensor without a storage")
    if not is_index(offset):
        raise MalformedTensor("bad storage offset: torch.load refuses it")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):  # torch's set_ takes both
        raise MalformedTensor("size or stride is not a tuple")
    shape, strides = _ints(tuple(size), "size"), _ints(tuple(stride), "stride")
    if len(shape) != len(strides):
        raise MalformedTensor("size and stride differ in length")
    return TensorRef(storage, offset, shape, strides, dtype or storage.dtype)  # bounds: torchzip.check_ref


def _set(ref: TensorRef, state: Any) -> TensorRef:
    """``tensor.set_(*state)`` on a record, for each overload torch has: () empties the tensor, (source) takes
    all of a storage or tensor, (source, offset, size[, stride]) a view of it; anything else torch refuses."""
    if not isinstance(state, (tuple, list)):
        raise MalformedTensor(f"BUILD on a tensor with a {type(state).__name__} state: torch.load refuses it")
    source = state[0] if state else ref.storage
    if isinstance(source, TensorRef) and len(state) == 1:
        state = (source.storage, source.offset, source.shape, source.stride)
    source = source.storage if isinstance(source, TensorRef) else source
    if not isinstance(source, StorageRef) or len(state) not in (0, 1, 3, 4):
        raise MalformedTensor("BUILD on a tensor with a state tensor.set_ does not take: torch.load refuses it")
    if source.dtype != ref.dtype:
        raise MalformedTensor(f"BUILD sets a {ref.dtype} tensor to a {source.dtype} storage: torch.load refuses it")
    if len(state) < 2:
        numel = source.numel if state else 0
        return _tensor(source, 0, (numel,), (1,), ref.dtype)
    size = state[2]
    stride = state[3] if len(state) == 4 else _contiguous(size)
    return _tensor(source, state[1], size, stride, ref.dtype)


def _contiguous(size: Any) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``size`` (what set_ uses when given none)."""
    if not isinstance(size, (tuple, list)) or not all(is_index(n) for n in size):
        raise MalformedTensor("size is not a tuple of non-negative integers")
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _grad_state(ref: TensorRef, requires_grad: Any, metadata: Any = None) -> TensorRef:
    """What torch checks when it sets a rebuilt tensor's autograd flag and metadata: a bool, and True only
    for floating and complex dtypes; metadata, when there is any, a dict."""
    if not isinstance(requires_grad, bool):
        raise MalformedTensor(f"requires_grad is a {type(requires_grad).__name__}, not a bool: torch.load refuses it")
    if requires_grad and ref.dtype not in dtypes.GRADIENT:
        raise MalformedTensor(f"a {ref.dtype} tensor that requires grad: torch.load refuses it (only floating and "
                              "complex tensors can)")
    if metadata and not isinstance(metadata, dict):
        raise MalformedTensor(f"tensor metadata is a {type(metadata).__name__}, not a dict: torch.load refuses it")
    return ref


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _grad_state(_tensor(storage, storage_offset, size, stride, None), requires_grad, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _Dtype):
        raise MalformedTensor("tensor dtype is not a torch dtype")
    return _grad_state(_tensor(storage, storage_offset, size, stride, str(dtype)), requires_grad, metadata)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise MalformedTensor("parameter without tensor data")
    return _grad_state(data, requires_grad)


_REBUILDERS = {
    "_rebuild_tensor_v2": Function(_rebuild_tensor_v2), "_rebuild_tensor_v3": Function(_rebuild_tensor_v3),
    "_rebuild_tensor": Function(_rebuild_tensor), "_rebuild_parameter": Function(_rebuild_parameter),
    "_rebuild_parameter_with_state": Function(_rebuild_parameter),
}


# The allowlisted types torch's ``as_subclass`` takes: only these inherit from torch.Tensor.
_TENSOR_CLASSES = frozenset(("Tensor", "Parameter"))


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch rebuilds with ``func``, turns the result into ``new_type`` (``as_subclass``: a Tensor class
    only) and sets ``state`` as attributes (``torch._utils._set_obj_state``)."""
    if func not in _REBUILDERS.values() or not isinstance(args, tuple):
        raise MalformedTensor("tensor subclass rebuilt by an unexpected function")
    if not (type(new_type) is _Marker and new_type in _TENSOR_CLASSES):
        raise MalformedTensor("tensor rebuilt as a type that is not a tensor class: torch.load refuses it")
    parts = state if isinstance(state, tuple) else (state, None)
    if len(parts) != 2 or any(part and not isinstance(part, dict) for part in parts):
        raise MalformedTensor(f"tensor state is a {type(state).__name__}, not attributes: torch.load refuses it")
    for name in (k for part in parts if part for k in part):
        if not isinstance(name, str):
            raise MalformedTensor(f"tensor attribute named by a {type(name).__name__}: torch.load refuses it")
        if name.startswith("_") or name in _TENSOR_FIELDS:
            raise MalformedTensor(f"tensor attribute {name[:40]!r} would change the tensor torch loads: ckptcheck "
                                  "does not read it")
    return func(*args)  # other attributes (``param.note = ...``) are not the tensor's values


# Tensor attributes setattr changes the tensor itself through (its data, autograd state, views of it).
_TENSOR_FIELDS = frozenset(("data", "grad", "requires_grad", "names", "shape", "dtype", "device", "layout",
                            "real", "imag", "T", "mT", "H", "mH", "is_leaf", "grad_fn", "retains_grad"))


def _size(*args: Any) -> tuple[int, ...]:
    return tuple(args[0]) if args else ()


# torch.Size(iterable): as many elements as the iterable has (a bytearray(2**27) would take seconds)
SIZE = Sized(_size, lambda *args: len(args[0]) if args else 0)


# The names torch.serialization._get_layout looks up (str() of each torch.layout; a parity test pins them to
# torch's): kept as data so reading DCP metadata imports no torch.
LAYOUTS = frozenset({"torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc", "torch.sparse_bsr",
                     "torch.sparse_bsc", "torch._mkldnn", "torch.jagged"})


def _get_layout(*args: Any) -> str:
    """torch.serialization._get_layout(name): one string naming a torch layout ("torch.strided"), as torch's
    own lookup takes it; anything else makes torch.load raise, so it is refused here too."""
    if len(args) != 1 or not isinstance(args[0], str) or args[0] not in LAYOUTS:
        raise MalformedTensor(f"torch.serialization._get_layout{tuple(args)!r:.60} names no torch layout: "
                              "torch.load refuses it")
    return args[0].removeprefix("torch.")


def _torch_values() -> dict[tuple[str, str], Any]:
    """Globals both torch.save pickles and DCP's ``.metadata`` name: containers, dtypes, sizes, layouts."""
    table: dict[tuple[str, str], Any] = dict(BASIC_GLOBALS)
    for name in dtypes.ITEMSIZE:
        table[("torch", name)] = _Dtype(name)
    for alias in ("float", "double", "half", "long", "int", "short", "cfloat", "cdouble"):  # torch names dtypes
        table[("torch", alias)] = TorchRefuses(_Dtype(dtypes.torch_global_dtype(alias) or alias))  # canonically
    table.update({
        ("torch", "Size"): SIZE,
        ("torch.serialization", "_get_layout"): Function(_get_layout),
        ("torch", "strided"): TorchRefuses(_Marker("strided")),
        ("torch", "contiguous_format"): TorchRefuses(_Marker("contiguous_format")),
    })
    return table


TORCH_VALUES = _torch_values()


# What torch's weights_only loader also reads (torch._weights_only_unpickler._get_allowed_globals) and
# ckptcheck does not: stopped as bad input, never refused as unsafe nor reported as refused by torch.
_UNSUPPORTED = {
    **{("torch._utils", f"_rebuild_{kind}"): what for kind, what in (
        ("qtensor", "quantized tensors"), ("sparse_tensor", "sparse tensors"), ("nested_tensor", "nested tensors"),
        ("wrapper_subclass", "tensor subclasses"), ("device_tensor_from_cpu_tensor", "device-specific tensors"),
        ("device_tensor_from_numpy", "device-specific tensors"), ("meta_tensor_no_storage", "meta tensors"))},
    **{("torch", f"{q}Storage"): "quantized storages" for q in ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")},
    **{("torch", d): f"tensors of dtype torch.{d}" for d in (  # torch.save cannot write the sub-byte ints
        "qint32", "qint8", "quint2x4", "quint4x2", "quint8", *(f"int{n}" for n in range(1, 8)),
        *(f"uint{n}" for n in range(1, 8)))},
}
# Quantization schemes: names torch's loader allows as values (only a quantized tensor needs more).
_QSCHEMES = ("per_channel_affine", "per_channel_affine_float_qparams", "per_channel_symmetric", "per_tensor_affine",
             "per_tensor_symmetric")
# torch's legacy tensor type objects (torch.FloatTensor, torch.cuda.sparse.HalfTensor): names, no data.
_TENSOR_TYPES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")


def _device(kind: Any, index: Any = None) -> str:
    """torch.device("cuda", 0) as its type name; a name is required, as torch requires it.  Anything but a
    string would cost a ``str()`` of whatever the pickle hands it (a nested list of 2**40 leaves)."""
    if not isinstance(kind, str) or not (index is None or is_index(index)):
        raise MalformedTensor("torch.device of something other than a device name and index")
    return kind


def _allowlist() -> dict[tuple[str, str], Any]:
    table = dict(TORCH_VALUES)
    table.update({("torch", q): _Marker(q) for q in _QSCHEMES})
    table.update({key: Unsupported(what) for key, what in _UNSUPPORTED.items() if key not in table})
    for module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse"):
        table.update({(module, f"{kind}Tensor"): _Marker(f"{module}.{kind}Tensor") for kind in _TENSOR_TYPES})
    table[("collections", "Counter")] = Sized(collections.Counter, lambda *args: len(args[0]) if args else 0)
    for name, dtype in dtypes.STORAGE_CLASS_DTYPE.items():
        table[("torch", name)] = table[("torch.cuda", name)] = _StorageType(dtype)  # legacy files name cuda ones
    for module in ("torch", "torch.cuda"):  # torch names it torch.storage.UntypedStorage only
        table[(module, "UntypedStorage")] = TorchRefuses(_StorageType("uint8"))
    for module in ("torch.sparse", "torch.cuda.sparse"):  # no sparse bool tensor type exists
        table[(module, "BoolTensor")] = TorchRefuses(_Marker(f"{module}.BoolTensor"))
    table[("torch.storage", "UntypedStorage")] = _StorageType("uint8")
    table[("torch.storage", "TypedStorage")] = _StorageType("uint8")
    table.update({("torch._utils", name): fn for name, fn in _REBUILDERS.items()})
    table.update({
        ("torch._tensor", "_rebuild_from_type_v2"): Function(_rebuild_from_type_v2),
        ("torch.nn.parameter", "Parameter"): _Marker("Parameter"),
        ("torch", "Tensor"): _Marker("Tensor"),
        ("torch", "device"): Function(_device),
    })
    return table


TORCH_ALLOWLIST = _allowlist()


# Storage locations torch.load restores (torch.serialization's package registry, default_restore_location):
# these tags exactly, and a registered backend alone or with a device index; any other tag plain torch.load
# refuses ("cpu:0", "vulkan", "meta:1" too).  A GPU location is read on a CPU-only machine, as
# torch.load(map_location="cpu") does; a map_location would load any tag, but a tag no device has is damage.
_EXACT_LOCATIONS = ("cpu", "meta")
_INDEXED_LOCATIONS = ("cuda", "mps", "xpu", "hpu", "mtia", "privateuseone")
_LOCATION = re.compile(rf"{'|'.join(_EXACT_LOCATIONS)}|(?:{'|'.join(_INDEXED_LOCATIONS)})(?::[0-9]{{1,9}})?")


class StorageTable:
    """persistent_load for torch pickles: one StorageRef per key, dtype and size checked for agreement."""

    def __init__(self) -> None:
        self.storages: dict[str, StorageRef] = {}

    def __call__(self, pid: Any) -> StorageRef:
        return self.add(pid)

    def add(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise MalformedTensor("unexpected persistent id")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise MalformedTensor("storage of an unknown type")
        if isinstance(key, bytes):  # torch.load looks for a record named data/b'0', which no archive holds
            raise MalformedTensor(f"storage key {key[:20]!r} is bytes, not a string: torch.load refuses it")
        key = str(key) if is_index(key) else key  # torch names the record f"data/{key}"
        if not isinstance(key, str) or not key.isdigit() and not key.isidentifier():
            raise MalformedTensor("bad storage key")
        if not is_index(numel):
            raise MalformedTensor("bad storage size")
        location = location.decode("ascii", "replace") if isinstance(location, bytes) else location  # as torch does
        if not isinstance(location, str) or not _LOCATION.fullmatch(location):
            shown = location[:40] if isinstance(location, str) else type(location).__name__
            raise MalformedTensor(f"storage location {shown!r} names no device torch knows: torch.load refuses it")
        ref = StorageRef(key, str(storage_type), numel, location)
        known = self.storages.setdefault(key, ref)
        if known.dtype != ref.dtype or known.numel != ref.numel:
            raise MalformedTensor(f"storage {key} declared twice with different dtype or size")
        return known


# The manifest fact naming the globals torch.load(weights_only=True) refuses, comma-separated.
WEIGHTS_ONLY_REFUSES = "pickle globals weights_only refuses"


def weights_only_facts(names: Iterable[str]) -> dict[str, str]:
    """The manifest fact for these refused globals (none when there are none)."""
    joined = ", ".join(sorted(set(names)))
    return {WEIGHTS_ONLY_REFUSES: joined} if joined else {}


def refused_in(facts: Mapping[str, str]) -> list[str]:
    """The refused globals a manifest's facts name."""
    return [name for name in facts.get(WEIGHTS_ONLY_REFUSES, "").split(", ") if name]


# The opcodes torch's weights_only unpickler implements (torch/_weights_only_unpickler.py, torch 2.6 to
# 2.13): what torch.save's protocol 2 writes.  A pickle using any other (protocol 4's FRAME and
# SHORT_BINUNICODE, protocol 0's text opcodes) is refused by torch.load(weights_only=True) as a whole.
WEIGHTS_ONLY_OPCODES = frozenset((
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET",
    "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP",
))
# The manifest fact naming the opcodes torch.load(weights_only=True) does not read, comma-separated.
WEIGHTS_ONLY_OPCODES_REFUSED = "pickle opcodes weights_only refuses"


def unread_opcodes(names: Iterable[str]) -> tuple[str, ...]:
    """The opcodes among ``names`` torch's weights_only unpickler does not implement."""
    return tuple(sorted(set(names) - WEIGHTS_ONLY_OPCODES))


def opcode_facts(names: Iterable[str]) -> dict[str, str]:
    """The manifest fact for these opcodes (none when there are none)."""
    joined = ", ".join(sorted(set(names)))
    return {WEIGHTS_ONLY_OPCODES_REFUSED: joined} if joined else {}


def opcodes_refused_in(facts: Mapping[str, str]) -> list[str]:
    """The opcodes torch's weights_only unpickler does not read that a manifest's facts name."""
    return [name for name in facts.get(WEIGHTS_ONLY_OPCODES_REFUSED, "").split(", ") if name]


@dataclass(frozen=True)
class TorchPickle:
    """An unpickled torch.save payload: the object, its storages by key, and the globals it names that
    torch's weights_only loader refuses (kept as inert ``Unknown`` records in ``obj``)."""

    obj: Any
    storages: dict[str, StorageRef]
    refused: tuple[str, ...]
    # opcodes the pickle uses that torch's weights_only unpickler does not implement (``unread_opcodes``)
    opcodes_refused: tuple[str, ...] = ()


def load_torch_pickle(data: bytes, *, path: str, member: str) -> TorchPickle:
    """Unpickle a torch.save payload into records, never calling anything the file names."""
    table, refused, opcodes = StorageTable(), set[str](), set[str]()
    obj = safe_loads(data, path=path, member=member, allowed=TORCH_ALLOWLIST, persistent_load=table,
                     refused=refused, opcodes=opcodes)
    return TorchPickle(obj, table.storages, tuple(sorted(refused)), unread_opcodes(opcodes))


def walk(obj: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Flatten nested dicts, and the lists and tuples that hold a dict or a tensor, into (path, leaf) pairs,
    as DCP flattens a state dict (and further: no tensor is left inside a value).  Two keys of one dict that
    are equal once strings (``0`` and ``"0"``) are refused: which one a loader takes is ambiguous."""
    if len(prefix) > MAX_NESTING:
        raise MalformedTensor(f"{'.'.join(prefix)} nests more than {MAX_NESTING} levels deep")
    if isinstance(obj, dict) and obj:
        names: dict[str, Any] = {}
        for k, v in obj.items():
            if isinstance(k, Record):
                raise MalformedTensor(f"{'.'.join(prefix) or 'the state dict'}: {k.what} used as a key names no entry")
            other = names.setdefault(str(k), k)
            if other is not k:
                shown = ".".join((*prefix, str(k)))
                raise MalformedTensor(f"{shown}: two keys flatten to this key ({other!r} and {k!r}): which one "
                                      "a loader takes is ambiguous")
            yield from walk(v, (*prefix, str(k)))
    elif isinstance(obj, (list, tuple)) and _holds_entries(obj, prefix):
        for i, v in enumerate(obj):
            yield from walk(v, (*prefix, str(i)))
    elif isinstance(obj, (set, frozenset)) and any(isinstance(v, Record) for v in obj):
        raise MalformedTensor(f"{'.'.join(prefix)}: a set of tensors has no order to name them by")
    else:
        yield prefix, obj


MAX_NESTING = 64  # levels of containers a state dict may nest; real ones nest a handful


def _holds_entries(obj: list[Any] | tuple[Any, ...], prefix: tuple[str, ...]) -> bool:
    """Whether a list or tuple holds, at any depth through lists and tuples, a dict or a tensor record."""
    todo, seen = [(obj, len(prefix))], set[int]()
    while todo:
        o, depth = todo.pop()
        if depth > MAX_NESTING:
            raise MalformedTensor(f"{'.'.join(prefix)} nests more than {MAX_NESTING} levels deep")
        if id(o) in seen:
            continue
        seen.add(id(o))
        for v in o:
            if isinstance(v, (dict, Record)):
                return True
            if isinstance(v, (list, tuple)):
                todo.append((v, depth + 1))
    return False
