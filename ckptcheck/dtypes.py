"""Dtype names and sizes without importing torch.

Every layer of ckptcheck names dtypes by torch's own spelling without the ``torch.`` prefix
(``bfloat16``, ``float32``), so metadata work never needs torch; ``to_torch`` is the one bridge.
"""

from __future__ import annotations

from typing import Any

from .errors import InputError

ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "complex128": 16, "complex64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1,
    # read where torch reads them (the packed ones in ``NO_ARITHMETIC``)
    "complex32": 4, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "bits16": 2, "bits8": 1, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}

# What torch lets require grad (``is_floating_point`` or ``is_complex``).
GRADIENT = frozenset(n for n in ITEMSIZE if n.startswith(("float", "bfloat", "complex")))
# Dtypes torch stores and loads but computes nothing on (no ``copy_``, no comparison): read, never cast nor
# scanned for values.
NO_ARITHMETIC = frozenset(("float4_e2m1fn_x2", "bits16", "bits8", "bits1x8", "bits2x4", "bits4x2"))
# Floating dtypes whose values ckptcheck reads, compares and casts.
FLOATING = GRADIENT - NO_ARITHMETIC

# torch attribute names that are aliases of the canonical ones (torch.float is float32, ...).
_TORCH_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
    "short": "int16", "cfloat": "complex64", "cdouble": "complex128",
}

# Legacy typed-storage classes that torch.save still pickles for the classic dtypes.
STORAGE_CLASS_DTYPE: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "UntypedStorage": "uint8",
}

SAFETENSORS_DTYPE: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "C64": "complex64",  # safetensors has no complex128 (its reader refuses "C128")
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPE.items()}

# What a user may type for --dtype / --ckpt-dtype, and what configs write.
_USER_ALIASES = {
    "bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
    "fp64": "float64", "f64": "float64", "fp8": "float8_e4m3fn", "float": "float32", "half": "float16",
    "double": "float64",
}

USER_CHOICES = ("bf16", "fp16", "fp32", "fp64", "bfloat16", "float16", "float32", "float64")


def canonical(name: str) -> str:
    """Canonical dtype name for any spelling ckptcheck accepts; raises InputError otherwise."""
    key = name.strip().lower().removeprefix("torch.")
    key = _USER_ALIASES.get(key, _TORCH_ALIASES.get(key, key))
    if key not in ITEMSIZE:
        raise InputError(None, "dtype", f"unknown dtype {name!r}; use one of {', '.join(USER_CHOICES)}")
    return key


def torch_global_dtype(attr: str) -> str | None:
    """The canonical name for a pickled global ``torch.<attr>`` naming a dtype, else None."""
    key = _TORCH_ALIASES.get(attr, attr)
    return key if key in ITEMSIZE else None


def itemsize(name: str) -> int:
    return ITEMSIZE[name]


def to_torch(name: str) -> Any:
    import torch

    return getattr(torch, name)


def from_torch(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
