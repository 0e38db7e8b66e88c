"""Hypothesis strategies for mostly-valid checkpoints with one structural mutation each.

Each strategy draws a ``Case``: the files of a checkpoint folder (a fixture rebuilt with one header field, zip
record, pickle opcode, DCP ``Metadata`` field, shard or config value changed) and the CLI command to run on it.
Two oracles say when that command's exit 0 is wrong; each applies only where it is a verdict on the input:

- ``oracle`` (the real loader refuses): ``torch.load(weights_only=True)`` or safetensors' ``load_file`` refuses a
  file of the case.  Only for ``check`` (what ``pytest --ckpt`` runs too), whose exit 0 is the verdict "this is
  the checkpoint the run expects".  Not for ``check --metadata-only`` (it reads no tensor data by design), nor
  for ``diff`` (exit 0: the values are the same), ``convert`` and ``repair`` (exit 0: written and verified;
  turning a file torch refuses into one it loads is their job) or ``inspect`` (exit 0: described).
- ``must_refuse`` (wrong by construction): the mutation made data the command reads wrong - a flipped byte under
  a CRC-32, a shard that is a FIFO, a device or a link out of the folder, shard 01 missing, a config value no
  model has.  Model tensors count for every command that reads tensor data; training state (optimizer records)
  only for ``check --target resume``, ``repair --target resume`` and ``convert`` without ``--weights-only``
  (with it, that state is neither read nor written); a config only for the commands that judge one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle  # writes Metadata objects built here; reading one is the code under test
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from . import bases
from .pickle_ops import Op, emit, parse, push

SYMLINK, FIFO = "symlink:", "fifo"  # file entries that are not bytes: a link to the target, a named pipe


@dataclass(frozen=True)
class Case:
    family: str
    mutation: str  # the kind of change, no values: the crash class is (family, mutation, symptom)
    detail: str  # the values, for the reproducer
    files: tuple[tuple[str, bytes | str], ...] = field(repr=False)  # path -> bytes, SYMLINK+target, or FIFO
    argv: tuple[str, ...]  # "{case}" is the case folder, "{out}" an output path that does not exist
    oracle: tuple[tuple[str, str], ...] = ()  # ("torch" | "safetensors", path): must load for exit 0
    must_refuse: str = ""  # non-empty: the input is wrong by construction, exit 0 is a wrong verdict

    @property
    def input_bytes(self) -> int:
        return sum(len(v) for _, v in self.files if isinstance(v, bytes))

    @property
    def command(self) -> str:
        """The command and its flags without paths ("convert --to safetensors --weights-only"): outcomes are
        counted per command."""
        return " ".join(a for a in self.argv if "{case}" not in a and "{out}" not in a and a != "--model-config")


# --- values a field can take ---------------------------------------------------------------------------

HUGE_INTS = [2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**30]
INTS = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 7, 64, 8192, -2**31, -2**63, *HUGE_INTS]),
                 st.integers(-1000, 100_000))
BIG_DIGITS = 10**4400  # more digits than int->str converts: the error message itself must not raise
BIG_DIGITS_TEXT = "1" + "0" * 4400
STRINGS = st.sampled_from(["", "0", "1", "999", "middle", "big", "little", "cpu", "cuda:0", "meta", "../x",
                           "/etc/passwd", "a\x00b", "x" * 300, "FloatStorage", "BFloat16Storage",
                           "tok_embeddings.weight", "layers.0.attention.wq.weight", "\u0661", "v2"])
ODD = st.one_of(st.none(), st.booleans(), st.sampled_from([1.5, -0.0, math.nan, math.inf, -math.inf, 1e308]),
                STRINGS, st.just([1, 2]), st.just({"a": 1}), INTS)


def nested(depth: int, leaf: object = 0) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


DEEP = "\u2063deep\u2063"  # a placeholder json.dumps writes as is, replaced by nesting it cannot write


def dumps_deep(obj: object, depth: int) -> str:
    """``json.dumps(obj)`` with the string DEEP replaced by ``depth`` nested lists (json.dumps recurses)."""
    return json.dumps(obj, ensure_ascii=False).replace(json.dumps(DEEP, ensure_ascii=False),
                                                       "[" * depth + "0" + "]" * depth, 1)


DEPTHS = st.sampled_from([50, 1_000, 5_000])


# --- shared argv ---------------------------------------------------------------------------------------

LINGUA_CFG = ("--model-config", "{case}/params.json")
TORCH_DATA_COMMANDS = st.sampled_from(["check", "check", "check-meta", "convert", "diff", "inspect", "repair"])


def command(kind: str, ckpt: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The argv for one of the commands the fuzzer drives, on the checkpoint at ``{case}/<ckpt>``."""
    path = f"{{case}}/{ckpt}"
    if kind == "check":
        return ("check", path, *extra)
    if kind == "check-meta":
        return ("check", path, "--metadata-only", *extra)
    if kind == "convert":
        return ("convert", path, "{out}", "--to", "safetensors", "--weights-only")
    if kind == "diff":
        return ("diff", path, "{case}/reference.safetensors")
    if kind == "inspect":
        return ("inspect", path)
    if kind == "repair":  # into {out}, in the input's own format
        return ("repair", path, "{out}", *extra)
    raise ValueError(kind)


def reference_files(kind: str) -> tuple[tuple[str, bytes], ...]:
    return (("reference.safetensors", bases.fixture("good/model.safetensors")),) if kind == "diff" else ()


def oracle_for(kind: str, entries: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The loader oracle judges ``check``'s verdict only (see the module docstring)."""
    return entries if kind == "check" else ()


# --- safetensors ---------------------------------------------------------------------------------------

def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def header_mutation(draw: st.DrawFn, data: bytes) -> tuple[bytes, str, str]:
    """A safetensors file with one change to its header, length field or body: (new bytes, kind, detail)."""
    header, body = _split_safetensors(data)
    keys = [k for k in header if k != "__metadata__"]
    key = draw(st.sampled_from(keys))
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop-key", "add-keys", "metadata", "deep-json",
                                 "big-digits", "length-field", "body", "duplicate-key", "not-object"]))
    raw: bytes | None = None
    length_delta = 0
    if kind == "dtype":
        value = draw(st.one_of(st.sampled_from(["F16", "BF16", "F32", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3",
                                                "F8_E5M2", "F4", "bf16", "float32", ""]), ODD))
        header[key]["dtype"] = value
        detail = f"{key}.dtype = {value!r}"
    elif kind == "shape":
        value = draw(st.one_of(st.lists(INTS, max_size=4), st.just([2**63, 0]), st.just([2**62, 0]),
                               st.just([0, 2**64]), ODD))
        header[key]["shape"] = value
        detail = f"{key}.shape = {value!r}"
    elif kind == "offsets":
        start, end = header[key]["data_offsets"]
        value = draw(st.one_of(st.tuples(INTS, INTS).map(list), st.just([end, start]), st.just([start, start]),
                               st.just([start + 1, end + 1]), st.just([start, end - 1]), ODD))
        header[key]["data_offsets"] = value
        detail = f"{key}.data_offsets = {value!r}"
    elif kind == "drop-key":
        del header[key]
        detail = f"drop {key}"
    elif kind == "add-keys":
        count = draw(st.sampled_from([1, 10, 1_000, 1, 10, 1_000, 10_000, 100_000]))
        for i in range(count):
            header[f"extra.{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        detail = f"{count} extra zero-size keys"
    elif kind == "metadata":
        value = draw(st.one_of(ODD, st.just({"format": "pt", "n": 1}), st.just({"a": {"b": 1}})))
        header["__metadata__"] = value
        detail = f"__metadata__ = {value!r}"
    elif kind == "deep-json":
        depth = draw(DEPTHS)
        header[key]["shape"] = DEEP
        raw = dumps_deep(header, depth).encode()
        detail = f"{key}.shape nested {depth} deep"
    elif kind == "big-digits":
        raw = json.dumps(header).replace(json.dumps(header[key]["shape"]), f"[{BIG_DIGITS_TEXT}]", 1).encode()
        detail = f"{key}.shape = [10**4400]"
    elif kind == "length-field":
        length_delta = draw(st.sampled_from([-9, -1, 1, 7, 2**20, 2**40, 2**63]))
        detail = f"header length {length_delta:+d}"
    elif kind == "body":
        cut = draw(st.sampled_from([-1, -100, 1, 4096]))
        body = body[:cut] if cut < 0 else body + b"\0" * cut
        detail = f"body {cut:+d} bytes"
    elif kind == "duplicate-key":
        text = json.dumps(header)
        entry = json.dumps({key: header[key]})[1:-1]
        raw = (text[:-1] + ", " + entry + "}").encode()
        detail = f"{key} twice in the header"
    else:
        raw = json.dumps(draw(st.sampled_from([[1, 2], "x", 3, None]))).encode()
        detail = "header is not an object"
    if raw is None:
        raw = json.dumps(header).encode()
    return struct.pack("<Q", (len(raw) + length_delta) % 2**64) + raw + body, f"header.{kind}", detail


@st.composite
def safetensors_cases(draw: st.DrawFn) -> Case:
    data, kind, detail = draw(header_mutation(bases.fixture("good/model.safetensors")))
    cmd = draw(TORCH_DATA_COMMANDS)
    files = (("model.safetensors", data), ("params.json", bases.config("lingua_params.json")),
             *reference_files(cmd))
    return Case("safetensors", kind, detail, files, command(cmd, "model.safetensors", LINGUA_CFG),
                oracle_for(cmd, (("safetensors", "model.safetensors"),)))


# --- safetensors index ---------------------------------------------------------------------------------

@st.composite
def index_cases(draw: st.DrawFn) -> Case:
    index = json.loads(bases.fixture("good/hf_sharded/model.safetensors.index.json"))
    weight_map = index["weight_map"]
    key = draw(st.sampled_from(sorted(weight_map)))
    shards = sorted(set(weight_map.values()))
    kind = draw(st.sampled_from(["shard-path", "drop-key", "extra-key", "all-one-shard", "weight-map-type",
                                 "metadata", "deep-json", "not-json", "drop-shard-file"]))
    raw: bytes | None = None
    drop_file = ""
    if kind == "shard-path":
        value = draw(st.one_of(st.sampled_from(["missing.safetensors", "../model.safetensors", "/dev/zero",
                                                "config.json", "", ".", "a\x00b.safetensors", *shards]), ODD))
        weight_map[key] = value
        detail = f"weight_map[{key}] = {value!r}"
    elif kind == "drop-key":
        del weight_map[key]
        detail = f"drop {key}"
    elif kind == "extra-key":
        weight_map[draw(STRINGS)] = draw(st.sampled_from(shards))
        detail = "an extra key in the weight map"
    elif kind == "all-one-shard":
        for k in weight_map:
            weight_map[k] = shards[0]
        detail = f"every key mapped to {shards[0]}"
    elif kind == "weight-map-type":
        index["weight_map"] = draw(ODD)
        detail = f"weight_map = {index['weight_map']!r}"
    elif kind == "metadata":
        index["metadata"] = {"total_size": draw(ODD)}
        detail = f"metadata = {index['metadata']!r}"
    elif kind == "deep-json":
        depth = draw(DEPTHS)
        index["metadata"] = DEEP
        raw = dumps_deep(index, depth).encode()
        detail = f"metadata nested {depth} deep"
    elif kind == "not-json":
        raw = draw(st.sampled_from([b"", b"{", b"\xff\xfe", b"[]", b"null"]))
        detail = f"index is {raw!r}"
    else:
        drop_file = draw(st.sampled_from(shards))
        detail = f"shard file {drop_file} missing"
    if raw is None:
        raw = json.dumps(index).encode()
    files = [("hf/model.safetensors.index.json", raw), ("hf/config.json", bases.fixture("good/hf_sharded/config.json"))]
    files += [(f"hf/{s}", bases.fixture(f"good/hf_sharded/{s}")) for s in shards if s != drop_file]
    cmd = draw(TORCH_DATA_COMMANDS)
    files += reference_files(cmd)
    oracle = tuple(("safetensors", f"hf/{s}") for s in shards if s != drop_file)
    return Case("index", f"index.{kind}", detail, tuple(files), command(cmd, "hf"), oracle_for(cmd, oracle))


# --- Hugging Face folders: config.json, an index and sharded safetensors, changed across files ----------

HF_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _save_safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


@st.composite
def hf_folder_cases(draw: st.DrawFn) -> Case:
    """The sharded fixture as a whole folder: one shard's header mutated, tensors moved or copied between the
    shards behind the index's back, a shard cast, the config's tying or dtype changed, a file of the set
    missing or one more beside it."""
    from safetensors.torch import load

    files: dict[str, bytes] = {f"hf/{n}": bases.fixture(f"good/hf_sharded/{n}")
                               for n in ("config.json", "model.safetensors.index.json", *HF_SHARDS)}
    shards = [load(files[f"hf/{n}"]) for n in HF_SHARDS]
    kind = draw(st.sampled_from(["shard-header", "shard-header", "shard-header", "move-key", "copy-key",
                                 "cast-shard", "tie", "torch-dtype", "drop-file", "single-beside"]))
    which = draw(st.sampled_from([0, 1]))
    must_refuse = ""
    if kind == "shard-header":
        data, sub, detail = draw(header_mutation(files[f"hf/{HF_SHARDS[which]}"]))
        files[f"hf/{HF_SHARDS[which]}"] = data
        kind, detail = f"shard.{sub}", f"{HF_SHARDS[which]}: {detail}"
    elif kind in ("move-key", "copy-key"):
        key = draw(st.sampled_from(sorted(shards[which])))
        zeros = draw(st.booleans())
        shards[1 - which][key] = torch.zeros_like(shards[which][key]) if zeros else shards[which][key]
        if kind == "move-key":
            del shards[which][key]
        elif zeros and shards[which][key].any():
            # transformers loads every shard file whole: which of the two differing copies it keeps is not
            # the index's to say
            must_refuse = "a tensor held by two shards with different values"
        for n, tensors in zip(HF_SHARDS, shards):
            files[f"hf/{n}"] = _save_safetensors(tensors)
        detail = (f"{key} {'moved' if kind == 'move-key' else 'copied'}{' as zeros' if zeros else ''} into "
                  f"{HF_SHARDS[1 - which]} (index unchanged)")
    elif kind == "cast-shard":
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float8_e4m3fn, torch.int8]))
        files[f"hf/{HF_SHARDS[which]}"] = _save_safetensors({k: v.to(dtype) for k, v in shards[which].items()})
        detail = f"{HF_SHARDS[which]} cast to {dtype}"
    elif kind in ("tie", "torch-dtype"):
        cfg = json.loads(files["hf/config.json"])
        field_name = "tie_word_embeddings" if kind == "tie" else "torch_dtype"
        cfg[field_name] = draw(st.one_of(st.sampled_from([True, "float32", "float8_e4m3fn", "int4", "auto"]), ODD))
        files["hf/config.json"] = json.dumps(cfg).encode()
        detail = f"config {field_name} = {_short(cfg[field_name])}"
    elif kind == "drop-file":
        victim = draw(st.sampled_from(["config.json", "model.safetensors.index.json", *HF_SHARDS]))
        del files[f"hf/{victim}"]
        detail = f"{victim} missing"
    else:
        files["hf/model.safetensors"] = bases.fixture("good/hf/model.safetensors")
        detail = "a single-file model.safetensors beside the index"
    cmd = draw(TORCH_DATA_COMMANDS)
    oracle = tuple(("safetensors", n) for n in files if n.endswith(".safetensors"))
    return Case("hf-folder", f"hf.{kind}", detail, (*files.items(), *reference_files(cmd)), command(cmd, "hf"),
                oracle_for(cmd, oracle), must_refuse if cmd == "check" else "")


# --- torch zip: records and data.pkl opcodes -----------------------------------------------------------

_MEMO_OPS = {"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "PUT", "GET", "MEMOIZE"}
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"}
_STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINSTRING", "SHORT_BINSTRING"}
GLOBALS = st.sampled_from([
    "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3", "torch._utils _rebuild_parameter",
    "torch FloatStorage", "torch BFloat16Storage", "torch HalfStorage", "torch ByteStorage",
    "torch Float8_e4m3fnStorage", "torch UntypedStorage", "torch Size", "torch device", "torch float8_e4m3fn",
    "collections OrderedDict", "builtins bytearray", "builtins set", "builtins dict", "builtins getattr",
    "torch.serialization _get_layout", "torch._tensor _rebuild_from_type_v2", "posix system", "builtins eval",
])
# allowlisted constructors whose size comes from the pickle, stored as one more item of the top-level dict
CONSTRUCTS = st.sampled_from([
    ("builtins bytearray", [2**31]), ("builtins bytearray", [2**27]), ("torch Size", "bytearray"),
    ("collections OrderedDict", []), ("torch BFloat16Storage", [2**31]), ("builtins set", []),
])


def _construct(name: str, args: list | str) -> list[Op]:
    """The opcodes that set key "fuzz.extra" of the dict on the stack to ``name(*args)``."""
    if args == "bytearray":  # torch.Size(bytearray(2**27)): a size made of 2**27 dimensions
        value = [Op("GLOBAL", name), Op("GLOBAL", "builtins bytearray"), *push(2**27), Op("TUPLE1"), Op("REDUCE"),
                 Op("TUPLE1"), Op("REDUCE")]
    else:
        value = [Op("GLOBAL", name), Op("MARK"), *[op for a in args for op in push(a)], Op("TUPLE"), Op("REDUCE")]
    return [*push("fuzz.extra"), *value, Op("SETITEM")]


def _after_top_dict(ops: list[Op]) -> int:
    """Where an item can go into the top-level dict: after its EMPTY_DICT and memo put (1 if none)."""
    at = next((i for i, op in enumerate(ops) if op.name == "EMPTY_DICT"), 0) + 1
    return at + (at < len(ops) and ops[at].name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"))


@st.composite
def pickle_mutation(draw: st.DrawFn, data: bytes) -> tuple[bytes, str, str]:
    """``data`` (a pickle) with one opcode-level change: (new bytes, mutation kind, detail)."""
    ops = parse(data)
    kind = draw(st.sampled_from(["int", "int", "str", "str", "retype", "memo", "global", "delete", "duplicate",
                                 "swap", "construct", "big-digits", "unsupported-op"]))
    pick = {"int": _INT_OPS, "big-digits": _INT_OPS, "str": _STR_OPS, "retype": _INT_OPS | _STR_OPS,
            "memo": _MEMO_OPS, "global": {"GLOBAL"}}.get(kind)
    where = [i for i, op in enumerate(ops) if pick is None or op.name in pick] or [0]
    i = draw(st.sampled_from(where[1:-1] if kind in ("delete", "duplicate", "swap") and len(where) > 2 else where))
    old = ops[i]
    if kind == "int":
        new = draw(INTS)
        ops[i:i + 1] = push(new)
    elif kind == "big-digits":
        new = BIG_DIGITS
        ops[i:i + 1] = push(new)
    elif kind == "str":
        new = draw(STRINGS)
        ops[i:i + 1] = push(new)
    elif kind == "retype":
        new = draw(st.one_of(st.none(), st.just(b"0"), st.just(1.5), st.just(math.nan), st.just(True), INTS,
                             STRINGS))
        ops[i:i + 1] = push(new)
    elif kind == "memo":
        new = draw(st.sampled_from([0, 1, 2, 255]))
        ops[i] = Op(old.name, new if old.name != "MEMOIZE" else None)
    elif kind == "global":
        new = draw(GLOBALS)
        ops[i] = Op("GLOBAL", new)
    elif kind == "delete":
        new = None
        del ops[i]
    elif kind == "duplicate":
        new = old
        ops.insert(i, old)
    elif kind == "swap":
        new = ops[i + 1] if i + 1 < len(ops) else old
        ops[i], ops[i + 1 if i + 1 < len(ops) else i] = new, old
    elif kind == "construct":
        name, args = draw(CONSTRUCTS)
        new = f"{name}{tuple(args) if isinstance(args, list) else '(bytearray(2**27))'}"
        i, old = _after_top_dict(ops), "(inserted)"
        ops[i:i] = _construct(name, args)
    else:  # an opcode torch's weights-only unpickler does not implement: POP (and the None it drops)
        new, old = "NONE POP", "(inserted)"
        i = _after_top_dict(ops)
        ops[i:i] = [Op("NONE"), Op("POP")]
    return emit(ops), f"pickle.{kind}", f"op {i}: {_short(old)} -> {_short(new)}"


def _short(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int over the digit limit
        return "<int of ~4400 digits>"
    return text if len(text) <= 80 else text[:77] + "..."


@st.composite
def zip_mutation(draw: st.DrawFn, data: bytes) -> tuple[bytes, str, str]:
    """A torch zip with one change to its records or its ``data.pkl``: (new bytes, mutation kind, detail)."""
    archive = bases.read_zip(data)
    records = list(archive.records)
    names = [n for n, _ in records]
    pkl = f"{archive.prefix}/data.pkl"
    storages = [n for n in names if "/data/" in n]
    kinds = ["pickle", "pickle", "pickle", "pickle", "byteorder", "version", "compression", "drop-record",
             "extra-record"] + (["storage-size", "duplicate-record"] if storages else [])
    kind = draw(st.sampled_from(kinds))
    compression: dict[str, int] = {}
    if kind == "pickle":
        new, kind, detail = draw(pickle_mutation(dict(records)[pkl]))
        records[names.index(pkl)] = (pkl, new)
    elif kind in ("byteorder", "version"):
        name = f"{archive.prefix}/{'byteorder' if kind == 'byteorder' else '.format_version'}"
        value = draw(st.sampled_from([b"middle", b"big", b"", b"999", b"2", b"1", b"little\n", b"\xff"]))
        if name in names:
            records[names.index(name)] = (name, value)
        else:
            records.insert(1, (name, value))
        detail = f"{name} = {value!r}"
        kind = f"record.{kind}"
    elif kind == "compression":
        name = draw(st.sampled_from([pkl, *storages[:2]]))
        method = draw(st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]))
        compression[name] = method
        detail = f"{name} compressed with method {method}"
        kind = "record.compression"
    elif kind == "drop-record":
        name = draw(st.sampled_from(names))
        del records[names.index(name)]
        detail = f"{name} removed"
        kind = "record.drop"
    elif kind == "extra-record":
        name = draw(st.sampled_from([f"{archive.prefix}/data/999", f"{archive.prefix}/extra.pkl", "other/data.pkl",
                                     f"{archive.prefix}/../escape", f"{archive.prefix}/data.pkl"]))
        records.append((name, draw(st.sampled_from([b"", b"\x80\x02}q\x00.", b"x" * 64]))))
        detail = f"{name} added"
        kind = "record.extra"
    elif kind == "storage-size":
        name = draw(st.sampled_from(storages))
        delta = draw(st.sampled_from([-1, -2, -64, 1, 2, 4096]))
        old = dict(records)[name]
        records[names.index(name)] = (name, old[:delta] if delta < 0 else old + b"\0" * delta)
        detail = f"{name} {delta:+d} bytes"
        kind = "record.storage-size"
    else:
        name = draw(st.sampled_from(storages))
        records.append((name, b"\0" * len(dict(records)[name])))
        detail = f"{name} twice (second all zero)"
        kind = "record.duplicate"
    return bases.write_zip(records, compression), kind, detail


@st.composite
def torch_cases(draw: st.DrawFn) -> Case:
    source = draw(st.sampled_from(["good/consolidated.pth", "good/lingua_consolidated/consolidated.pth",
                                   "good/tied/consolidated.pth"]))
    data, kind, detail = draw(zip_mutation(bases.fixture(source)))
    cmd = draw(TORCH_DATA_COMMANDS)
    cfg = "lingua_tied_params.json" if "tied" in source else "lingua_params.json"
    files = (("consolidated.pth", data), ("params.json", bases.config(cfg)), *reference_files(cmd))
    return Case("torch", kind, f"{source}: {detail}", files, command(cmd, "consolidated.pth", LINGUA_CFG),
                oracle_for(cmd, (("torch", "consolidated.pth"),)))


# --- legacy torch serialization: five pickles, then the storages' bytes ---------------------------------

LEGACY_PICKLES = ("magic number", "protocol version", "sys info", "data", "storage keys")


def split_legacy(data: bytes) -> tuple[list[bytes], bytes]:
    """The legacy format's five pickles and the raw storages after them."""
    pickles, pos = [], 0
    for _ in LEGACY_PICKLES:
        end = pos + max(p for _, _, p in pickletools.genops(data[pos:])) + 1
        pickles.append(data[pos:end])
        pos = end
    return pickles, data[pos:]


@st.composite
def legacy_cases(draw: st.DrawFn) -> Case:
    pickles, tail = split_legacy(bases.fixture("old/legacy.pt"))
    which = draw(st.sampled_from([3, 3, 3, 4, 4, 0, 1, 2, -1]))
    if which >= 0:
        pickles[which], kind, detail = draw(pickle_mutation(pickles[which]))
        kind, detail = f"legacy.{LEGACY_PICKLES[which].replace(' ', '-')}.{kind}", f"{LEGACY_PICKLES[which]}: {detail}"
    else:  # each storage is an 8-byte element count and its bytes
        at = draw(st.sampled_from([0, 8, len(tail) // 2, len(tail) - 1]))
        value = draw(st.sampled_from([b"", b"\xff" * 8, b"\0" * 8, struct.pack("<q", -1), struct.pack("<Q", 2**40)]))
        tail = tail[:at] + value + (tail[at + len(value):] if value else b"")
        kind, detail = "legacy.storages", f"storages: {value!r} at {at}" + (" (truncated)" if not value else "")
    cmd = draw(TORCH_DATA_COMMANDS)
    files = (("legacy.pt", b"".join(pickles) + tail), ("params.json", bases.config("lingua_params.json")),
             *reference_files(cmd))
    return Case("legacy", kind, detail, files, command(cmd, "legacy.pt", LINGUA_CFG),
                oracle_for(cmd, (("torch", "legacy.pt"),)))


# --- DCP: Metadata fields, bytes entries, data -----------------------------------------------------------

def _tensor_items(md) -> list[str]:
    return [k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]


def _bytes_items(md) -> list[str]:
    return [k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]


def _storage_of(md, fqn: str) -> MetadataIndex:
    return next(i for i in md.storage_data if i.fqn == fqn)


def _rebuild_distcp(md, distcp: bytes, replace: dict[MetadataIndex, bytes]) -> bytes:
    """The .distcp with the entries in ``replace`` swapped in, every later offset moved to fit."""
    order = sorted(md.storage_data.items(), key=lambda kv: kv[1].offset)
    out = bytearray()
    for index, info in order:
        piece = replace.get(index, distcp[info.offset:info.offset + info.length])
        md.storage_data[index] = dataclasses.replace(info, offset=len(out), length=len(piece))
        out += piece
    return bytes(out)


def _tensor_data_span(distcp: bytes, info: _StorageInfo) -> tuple[int, int]:
    """Where the tensor's own bytes lie in the .distcp: DCP's writer stores each tensor as a torch.save zip."""
    blob = distcp[info.offset:info.offset + info.length]
    archive = bases.read_zip(blob)
    name = next(n for n, _ in archive.records if "/data/" in n)
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        entry = z.getinfo(name)
    name_len, extra_len = struct.unpack("<HH", blob[entry.header_offset + 26:entry.header_offset + 30])
    start = info.offset + entry.header_offset + 30 + name_len + extra_len
    return start, start + entry.compress_size


def _size(values: list[int]) -> torch.Size | tuple[int, ...]:
    """torch.Size where it holds the values (int64), else the plain tuple a crafted pickle can carry."""
    return torch.Size(values) if all(-2**63 <= v < 2**63 for v in values) else tuple(values)


SIZES = st.one_of(st.lists(INTS, min_size=0, max_size=3).map(_size), st.just("0,0"), st.just(7),
                  st.just((0.5, 1.5)), st.just(None), st.just((2**63, 0)), st.just(torch.Size([2**62, 0])))


_DCP_ARGV = {  # the DCP commands that read the training state too
    "resume": ("check", "{case}/dcp", "--target", "resume"),
    "convert-all": ("convert", "{case}/dcp", "{out}", "--to", "dcp"),
    "repair": ("repair", "{case}/dcp", "{out}", "--target", "resume"),
}
_READS_TRAINING_STATE = frozenset(_DCP_ARGV)


@st.composite
def dcp_cases(draw: st.DrawFn) -> Case:
    base = bases.dcp_base()
    md = base.fresh_metadata()
    distcp = base.distcp
    tensors, blobs = _tensor_items(md), _bytes_items(md)
    key = draw(st.sampled_from(tensors))
    entry = md.state_dict_metadata[key]
    kind = draw(st.sampled_from(["chunk-offsets", "chunk-sizes", "tensor-size", "dtype", "storage-path",
                                 "storage-offset", "storage-length", "version", "drop-storage", "drop-item",
                                 "extra-chunk", "planner-data", "bytes-pickle", "data-flip"]))
    must_refuse = ""
    target = draw(st.sampled_from(["resume", "resume", "check-meta", "convert", "convert-all", "repair",
                                   "inspect"]))
    if kind == "chunk-offsets":
        value = draw(SIZES)
        entry.chunks[0] = dataclasses.replace(entry.chunks[0], offsets=value)
        detail = f"{key} chunk offsets = {_short(value)}"
    elif kind == "chunk-sizes":
        value = draw(SIZES)
        entry.chunks[0] = dataclasses.replace(entry.chunks[0], sizes=value)
        detail = f"{key} chunk sizes = {_short(value)}"
    elif kind == "tensor-size":
        value = draw(SIZES)
        entry.size = value
        detail = f"{key} size = {_short(value)}"
    elif kind == "dtype":
        value = draw(st.sampled_from([torch.float8_e4m3fn, torch.int64, torch.bool, torch.complex64, torch.float64,
                                      "bf16", None, 3]))
        entry.properties = dataclasses.replace(entry.properties, dtype=value)
        detail = f"{key} dtype = {value!r}"
    elif kind in ("storage-path", "storage-offset", "storage-length"):
        index = _storage_of(md, draw(st.sampled_from([key, *blobs[:2]])))
        info = md.storage_data[index]
        if kind == "storage-path":
            value = draw(st.one_of(st.sampled_from(["../__0_0.distcp", "/dev/zero", "missing.distcp", "a\x00b",
                                                    "params.json", ".", ""]), ODD))
            md.storage_data[index] = dataclasses.replace(info, relative_path=value)
        elif kind == "storage-offset":
            value = draw(st.one_of(INTS, st.sampled_from([info.offset + 1, info.offset - 1, "0", 0.5])))
            md.storage_data[index] = dataclasses.replace(info, offset=value)
        else:
            value = draw(st.one_of(INTS, st.sampled_from([info.length + 1, info.length - 1, "0", 0.5])))
            md.storage_data[index] = dataclasses.replace(info, length=value)
        detail = f"{index.fqn} storage {kind.split('-')[1]} = {value!r}"
    elif kind == "version":
        value = draw(st.sampled_from(["v2", ["1"], None, "999", "1.0", "2.0.0", 3, "", "1.0.0\x00"]))
        md.version = value
        detail = f"version = {value!r}"
    elif kind == "drop-storage":
        index = _storage_of(md, draw(st.sampled_from([key, *blobs[:2]])))
        del md.storage_data[index]
        detail = f"storage of {index.fqn} removed"
    elif kind == "drop-item":
        victim = draw(st.sampled_from([key, *blobs[:2]]))
        del md.state_dict_metadata[victim]
        detail = f"{victim} removed from the metadata"
    elif kind == "extra-chunk":
        chunk = entry.chunks[0]
        entry.chunks.append(draw(st.sampled_from([chunk, ChunkStorageMetadata(torch.Size([1] * len(chunk.sizes)),
                                                                              chunk.sizes)])))
        detail = f"{key} gets a second chunk"
    elif kind == "planner-data":
        md.planner_data = draw(st.one_of(ODD, st.just({key: ["x"]}), st.just({key: nested(900)})))
        detail = f"planner_data = {_short(md.planner_data)}"
    elif kind == "bytes-pickle":
        index = _storage_of(md, draw(st.sampled_from(blobs)))
        info = md.storage_data[index]
        blob = distcp[info.offset:info.offset + info.length]
        new_blob, sub, detail = draw(zip_mutation(blob))
        distcp = _rebuild_distcp(md, distcp, {index: new_blob})
        detail = f"bytes entry {index.fqn}: {detail}"
        kind = f"bytes-entry.{sub}"
        target = "resume"
    else:
        info = md.storage_data[_storage_of(md, key)]
        start, end = _tensor_data_span(distcp, info)
        at = draw(st.integers(start, end - 1))
        flipped = bytearray(distcp)
        flipped[at] ^= draw(st.integers(1, 255))
        distcp = bytes(flipped)
        detail = f"byte {at} flipped inside {key}'s data"
        target = draw(st.sampled_from(["resume", "convert", "convert-all", "repair"]))
        if key.startswith("model.") or target in _READS_TRAINING_STATE:
            must_refuse = "a byte of a tensor's data flipped under its zip record's CRC-32"
    files = (("dcp/.metadata", pickle.dumps(md)), ("dcp/__0_0.distcp", distcp),
             *((f"dcp/{n}", b) for n, b in base.extras))
    argv = _DCP_ARGV.get(target) or command(target, "dcp")
    label = kind if kind.startswith("bytes-entry") else "data.flip" if kind == "data-flip" else f"metadata.{kind}"
    return Case("dcp", label, detail, files, argv, (), must_refuse)


# --- Meta model-parallel shard folders ------------------------------------------------------------------

@st.composite
def meta_shard_cases(draw: st.DrawFn) -> Case:
    names = ("consolidated.00.pth", "consolidated.01.pth")
    shards = {n: bases.fixture(f"good/meta_mp/{n}") for n in names}
    files: dict[str, bytes | str] = {f"meta/{n}": v for n, v in shards.items()}
    files["meta/params.json"] = bases.fixture("good/meta_mp/params.json")
    # a device or FIFO shard costs a whole time limit while that class is open: drawn rarely
    kind = draw(st.sampled_from(["drop", "extra-copy", "rename", "rename", "outside-link", "sliced", "duplicate",
                                 "dev-zero", "fifo", *["pickle"] * 11]))
    must_refuse = ""
    victim = draw(st.sampled_from(names))
    if kind == "drop":
        del files[f"meta/{victim}"]
        detail = f"{victim} missing"
    elif kind == "extra-copy":
        files["meta/consolidated.02.pth"] = shards[victim]
        detail = f"{victim} copied as consolidated.02.pth"
    elif kind == "rename":
        new = draw(st.sampled_from(["consolidated.\u0661.pth", "consolidated.1.pth", "consolidated.001.pth",
                                    "consolidated.01.pt", "consolidated.-1.pth", "consolidated.01.pth.bak"]))
        files[f"meta/{new}"] = files.pop("meta/consolidated.01.pth")
        detail = f"consolidated.01.pth renamed {new!r}"
        if new in ("consolidated.\u0661.pth", "consolidated.01.pt", "consolidated.01.pth.bak"):
            must_refuse = "shard 01 is missing: no other file is named consolidated.NN.pth with ASCII digits"
    elif kind == "dev-zero":
        files[f"meta/{victim}"] = SYMLINK + "/dev/zero"
        detail = f"{victim} -> /dev/zero"
        must_refuse = "a shard that is a device"
    elif kind == "fifo":
        files[f"meta/{victim}"] = FIFO
        detail = f"{victim} is a FIFO"
        must_refuse = "a shard that is a FIFO"
    elif kind == "outside-link":
        files["outside.pth"] = shards[victim]
        files[f"meta/{victim}"] = SYMLINK + "../outside.pth"
        detail = f"{victim} -> a file outside the checkpoint folder"
        must_refuse = "a shard that is a symlink leaving the checkpoint"
    elif kind in ("sliced", "duplicate"):
        files["meta/consolidated.01.pth"] = bases.meta_shard_variant(kind)
        detail = "shard 01's wq " + ("lost a row" if kind == "sliced" else "is shard 00's")
    else:
        data, kind, detail = draw(zip_mutation(shards[victim]))
        files[f"meta/{victim}"] = data
        detail = f"{victim}: {detail}"
    cmd = draw(st.sampled_from(["check", "check", "check-meta", "convert", "inspect", "repair"]))
    if kind == "sliced":
        must_refuse = "the merged wq is one row short of the config's model"
    if cmd in ("convert", "inspect") and kind in ("rename", "sliced"):
        must_refuse = ""  # they judge no config: half a model converts, and is described
    oracle = tuple(("torch", n) for n, v in files.items() if isinstance(v, bytes) and n.startswith("meta/")
                   and n.endswith(".pth"))
    return Case("meta-shards", f"shards.{kind}", detail, tuple(files.items()), command(cmd, "meta"),
                oracle_for(cmd, oracle), must_refuse)


# --- configs ----------------------------------------------------------------------------------------------

_LINGUA_NUMERIC = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps",
                   "rope_theta", "ffn_dim_multiplier")
_HF_NUMERIC = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size", "rms_norm_eps", "rope_theta")


@st.composite
def config_cases(draw: st.DrawFn) -> Case:
    hf = draw(st.booleans())
    cfg = json.loads(bases.config("hf_config.json" if hf else "lingua_params.json"))
    fields = cfg if hf else cfg["model"]
    names = _HF_NUMERIC if hf else _LINGUA_NUMERIC
    name = draw(st.sampled_from(sorted(fields)))
    kind = draw(st.sampled_from(["value", "value", "numeric-bad", "drop", "extra", "deep-json", "big-digits",
                                 "not-object"]))
    raw: str | None = None
    must_refuse = ""
    if kind == "value":
        value = draw(ODD)
        fields[name] = value
        detail = f"{name} = {value!r}"
    elif kind == "numeric-bad":
        name = draw(st.sampled_from(names))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1, -1e-5, 10**9, 2**62, 1e308]))
        fields[name] = value
        detail = f"{name} = {value!r}"
        plausible = (name in ("norm_eps", "rms_norm_eps", "rope_theta") and 0 < value < math.inf
                     or (not hf and name == "vocab_size" and value == -1))  # lingua's "from the tokenizer"
        if not plausible:
            must_refuse = f"{name} = {value!r} is not the model these weights are"
    elif kind == "drop":
        del fields[name]
        detail = f"{name} removed"
    elif kind == "extra":
        fields[draw(STRINGS)] = draw(ODD)
        detail = "an extra field"
    elif kind == "deep-json":
        depth = draw(DEPTHS)
        fields[name] = DEEP
        raw = dumps_deep(cfg, depth)
        detail = f"{name} nested {depth} deep"
    elif kind == "big-digits":
        fields[name] = 0
        raw = json.dumps(cfg).replace(f'"{name}": 0', f'"{name}": {BIG_DIGITS_TEXT}', 1)
        detail = f"{name} = 10**4400"
    else:
        raw = json.dumps(draw(st.sampled_from([[1], "x", None, 3])))
        detail = "config is not an object"
    text = (raw if raw is not None else json.dumps(cfg)).encode()
    if hf:
        files = (("hf/config.json", text), ("hf/model.safetensors", bases.fixture("good/hf/model.safetensors")))
        argv = ("check", "{case}/hf")
    else:
        files = (("params.json", text), ("consolidated.pth", bases.fixture("good/consolidated.pth")))
        argv = ("check", "{case}/consolidated.pth", *LINGUA_CFG)
    if draw(st.booleans()):
        argv = (*argv, "--metadata-only")
    return Case("config", f"{'hf' if hf else 'lingua'}.{kind}", detail, files, argv, (), must_refuse)


FAMILIES = {
    "safetensors": safetensors_cases(),
    "index": index_cases(),
    "hf-folder": hf_folder_cases(),
    "torch": torch_cases(),
    "legacy": legacy_cases(),
    "dcp": dcp_cases(),
    "meta-shards": meta_shard_cases(),
    "config": config_cases(),
}
