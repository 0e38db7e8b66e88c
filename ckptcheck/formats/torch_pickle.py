"""The allowlist for pickles that ``torch.save`` writes, and the records they turn into.

Tensors come out as ``TensorRef``s (storage key, dtype, offset, shape, stride) and storages as
``StorageRef``s: no storage is built and no byte of tensor data is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import dtypes
from ..safe_pickle import BASIC_GLOBALS, safe_loads


@dataclass(frozen=True, slots=True)
class StorageRef:
    key: str
    dtype: str
    numel: int  # in elements of dtype
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@dataclass(frozen=True, slots=True)
class TensorRef:
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


class _Marker(str):
    """A pickled torch global that only names something (a dtype, a storage class, a layout)."""


class _StorageType(_Marker):
    pass


class _Dtype(_Marker):
    pass


class MalformedTensor(ValueError):
    pass


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MalformedTensor(f"{what} is not a tuple of integers")
    if any(v < 0 for v in value):
        raise MalformedTensor(f"{what} has a negative entry")
    return value


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise MalformedTensor("tensor without a storage")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise MalformedTensor("bad storage offset")
    shape, strides = _ints(tuple(size), "size"), _ints(tuple(stride), "stride")
    if len(shape) != len(strides):
        raise MalformedTensor("size and stride differ in length")
    return TensorRef(storage, offset, shape, strides, dtype or storage.dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _Dtype):
        raise MalformedTensor("tensor dtype is not a torch dtype")
    return _tensor(storage, storage_offset, size, stride, str(dtype))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise MalformedTensor("parameter without tensor data")
    return data


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_tensor, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS or not isinstance(args, tuple):
        raise MalformedTensor("tensor subclass rebuilt by an unexpected function")
    return func(*args)


def _size(*args: Any) -> tuple[int, ...]:
    return tuple(args[0]) if args else ()


def _named(marker: str):
    def build(*_args: Any) -> str:
        return marker

    return build


def _allowlist() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = dict(BASIC_GLOBALS)
    for name, dtype in dtypes.STORAGE_CLASS_DTYPE.items():
        table[("torch", name)] = _StorageType(dtype)
    table[("torch.storage", "UntypedStorage")] = _StorageType("uint8")
    table[("torch.storage", "TypedStorage")] = _StorageType("uint8")
    for name in dtypes.ITEMSIZE:
        table[("torch", name)] = _Dtype(name)
    for alias in ("float", "double", "half", "long", "int", "short", "cfloat", "cdouble"):
        table[("torch", alias)] = _Dtype(dtypes.torch_global_dtype(alias) or alias)
    table.update({
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.nn.parameter", "Parameter"): _Marker("Parameter"),
        ("torch", "Tensor"): _Marker("Tensor"),
        ("torch", "Size"): _size,
        ("torch", "device"): lambda *a: str(a[0]) if a else "cpu",
        ("torch.serialization", "_get_layout"): _named("strided"),
        ("torch", "strided"): _Marker("strided"),
        ("torch", "contiguous_format"): _Marker("contiguous_format"),
    })
    return table


TORCH_ALLOWLIST = _allowlist()


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
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(key, str) or not key.isdigit() and not key.isidentifier():
            raise MalformedTensor("bad storage key")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise MalformedTensor("bad storage size")
        ref = StorageRef(key, str(storage_type), numel, str(location))
        known = self.storages.setdefault(key, ref)
        if known.dtype != ref.dtype or known.numel != ref.numel:
            raise MalformedTensor(f"storage {key} declared twice with different dtype or size")
        return known


def load_torch_pickle(data: bytes, *, path: str, member: str) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle a torch.save payload into records; returns the object and its storages by key."""
    table = StorageTable()
    obj = safe_loads(data, path=path, member=member, allowed=TORCH_ALLOWLIST, persistent_load=table)
    return obj, table.storages


def walk(obj: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Flatten nested dicts and lists into (path, leaf) pairs, as DCP flattens a state dict."""
    if len(prefix) > 64:
        raise MalformedTensor(f"{'.'.join(prefix)} nests more than 64 levels deep")
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from walk(v, (*prefix, str(k)))
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, TensorRef)) for v in obj):
        for i, v in enumerate(obj):
            yield from walk(v, (*prefix, str(i)))
    else:
        yield prefix, obj
