"""A pickle as a list of opcodes that can be edited and re-emitted: ``genops`` reads it, ``emit`` writes it
back byte for byte, so a mutation changes one argument or opcode and leaves the rest of ``data.pkl`` valid."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Op:
    name: str
    arg: Any = None


def parse(data: bytes) -> list[Op]:
    return [Op(op.name, arg) for op, arg, _ in pickletools.genops(data)]


_OPCODES = {op.name: op for op in pickletools.opcodes}
_LEN = {"1": "<B", "2": "<H", "4": "<I", "8": "<Q"}


def _encode_arg(op: pickletools.OpcodeInfo, arg: Any) -> bytes:
    kind = op.arg.name if op.arg else None
    if kind is None:
        return b""
    if kind in ("uint1", "uint2", "uint4", "uint8", "int4"):
        return struct.pack({"uint1": "<B", "uint2": "<H", "uint4": "<I", "uint8": "<Q", "int4": "<i"}[kind], arg)
    if kind in ("long1", "long4"):
        body = pickle.encode_long(arg)
        return struct.pack("<B" if kind == "long1" else "<i", len(body)) + body
    if kind.startswith(("unicodestring", "bytes", "string")) and kind[-1] in _LEN:
        body = arg.encode("utf-8", "surrogatepass") if isinstance(arg, str) else (
            arg.encode("latin-1") if kind.startswith("string") else bytes(arg))
        return struct.pack(_LEN[kind[-1]], len(body)) + body
    if kind == "bytearray8":
        return struct.pack("<Q", len(arg)) + bytes(arg)
    if kind == "stringnl_noescape_pair":
        return arg.replace(" ", "\n", 1).encode() + b"\n"
    if kind in ("stringnl_noescape", "stringnl"):
        return (arg if kind == "stringnl_noescape" else repr(arg)).encode() + b"\n"
    if kind == "decimalnl_short":
        return (str(int(arg)) if not isinstance(arg, bool) else ("01" if arg else "00")).encode() + b"\n"
    if kind == "decimalnl_long":
        return str(arg).encode() + b"L\n"
    if kind == "floatnl":
        return repr(arg).encode() + b"\n"
    if kind == "float8":
        return struct.pack(">d", arg)
    raise ValueError(f"cannot emit {op.name} ({kind})")


def emit(ops: list[Op]) -> bytes:
    """The pickle bytes of ``ops`` (FRAME opcodes dropped: framing is optional and a mutation invalidates it)."""
    out = io.BytesIO()
    for op in ops:
        if op.name == "FRAME":
            continue
        info = _OPCODES[op.name]
        out.write(info.code.encode("latin-1") + _encode_arg(info, op.arg))
    return out.getvalue()


def push(value: Any) -> list[Op]:
    """The opcodes that push ``value`` (no memo), as protocol 3 writes them."""
    buf = io.BytesIO()
    pickler = pickle._Pickler(buf, protocol=3)  # the pure-Python pickler honours fast (no memo ops)
    pickler.fast = True
    pickler.dump(value)
    return [op for op in parse(buf.getvalue()) if op.name not in ("PROTO", "STOP")]
