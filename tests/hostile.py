"""Builders for the hostile-input corpus: every file is made in the test's temporary folder, from real
torch/safetensors/DCP output, then altered.  No payload file is committed."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .writers import CONFIGS, FIXTURES

LINGUA = CONFIGS / "lingua_params.json"
GOOD = FIXTURES / "good"


class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@dataclass
class Case:
    name: str
    build: Callable[[Path, Path], Path]  # (tmp folder, sentinel path) -> checkpoint path
    exit_code: int  # of `ckptcheck check CKPT --model-config LINGUA`
    expect: str  # text the one-line diagnostic or the unsafe report must contain
    config: Path = LINGUA
    args: tuple[str, ...] = ()


def touch(sentinel: Path) -> str:
    return f"touch {sentinel}"


def torch_zip(tmp: Path, data_pkl: bytes | None = None, extra: dict[str, bytes] | None = None,
              name: str = "model.pth", compress: bool = False) -> Path:
    """A real torch.save archive of {"w": zeros}, with data.pkl replaced and members added."""
    path = tmp / name
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as src:
        members = [(i.filename, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as dst:
        for member, data in members:
            if member.endswith("data.pkl") and data_pkl is not None:
                data = data_pkl
            dst.writestr(member, data)
        for member, data in (extra or {}).items():
            dst.writestr(member, data)
    return path


def legacy(tmp: Path, pickles: list[bytes]) -> Path:
    path = tmp / "legacy.pt"
    path.write_bytes(b"".join(pickles))
    return path


LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
LEGACY_PROTOCOL = pickle.dumps(1001, protocol=2)
LEGACY_INFO = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)


def dcp_copy(tmp: Path) -> Path:
    folder = tmp / "dcp"
    shutil.copytree(GOOD / "dcp", folder)
    return folder


def edit_metadata(folder: Path, change: Callable[[object], None]) -> Path:
    """Rewrite a DCP .metadata with torch's own classes (our own fixture, loaded with pickle: trusted)."""
    meta = pickle.loads((folder / ".metadata").read_bytes())
    change(meta)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder


def st_file(tmp: Path, header: dict | bytes, data: bytes, name: str = "model.safetensors") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def stack_global_memo_trick(sentinel: Path) -> bytes:
    """Protocol 4: the module and name strings are memoized, then fetched back for STACK_GLOBAL."""
    def s(text: str) -> bytes:
        b = text.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return (b"\x80\x04" + s("posix") + b"\x94" + s("decoy") + b"\x94" + s("system") + b"\x94"
            + b"0" + b"h\x00" + b"h\x02" + b"\x93" + s(touch(sentinel)) + b"\x85R.")


def decoy_strings(sentinel: Path) -> bytes:
    """Protocol 4: posix/system pushed, then two allowlisted strings pushed and popped before STACK_GLOBAL
    (a scanner tracking the last strings, not the stack, sees collections.OrderedDict)."""
    def s(text: str) -> bytes:
        b = text.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return (b"\x80\x04" + s("posix") + s("system") + s("collections") + s("OrderedDict") + b"00\x93"
            + s(touch(sentinel)) + b"\x85R.")


def _torch_save(tmp: Path, obj: object) -> Path:
    path = tmp / "model.pth"
    torch.save(obj, path)
    return path


def _dcp_bytes(tmp: Path, value: object) -> Path:
    import torch.distributed.checkpoint as dcp

    folder = tmp / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": torch.load(GOOD / "consolidated.pth", weights_only=True), "train_state": value},
                 checkpoint_id=str(folder))
    return folder


def _dcp_version(tmp: Path, version: object) -> Path:
    def change(meta):
        meta.version = version
    return edit_metadata(dcp_copy(tmp), change)


def zip_bomb(tmp: Path) -> Path:
    return torch_zip(tmp, data_pkl=pickle.dumps({}, protocol=2) + b"\x00" * (80 << 20), compress=True)


def cases() -> list[Case]:
    import functools
    import pkgutil
    import runpy

    import pip

    out = [
        # --- never execute: payloads in every kind of pickle ckptcheck reads --------------------------------
        Case("reduce_os_system", lambda t, s: torch_zip(t, pickle.dumps({"w": Payload(os.system, touch(s))}, 2)),
             1, "posix.system"),
        Case("reduce_eval", lambda t, s: torch_zip(t, pickle.dumps(Payload(eval, f"open({str(s)!r}, 'w')"), 2)),
             1, "__builtin__.eval"),
        Case("reduce_exec_protocol_4", lambda t, s: torch_zip(t, pickle.dumps(Payload(exec, f"open({str(s)!r}, 'w')"), 4)),
             1, "builtins.exec"),
        Case("runpy_run_code", lambda t, s: torch_zip(t, pickle.dumps(Payload(runpy._run_code, "import os", {}), 2)),
             1, "runpy._run_code"),
        Case("pip_main", lambda t, s: torch_zip(t, pickle.dumps(Payload(pip.main, ["install", "x"]), 2)),
             1, "pip.main"),
        Case("pkgutil_resolve_name", lambda t, s: torch_zip(t, pickle.dumps(Payload(pkgutil.resolve_name, "os:system"), 2)),
             1, "pkgutil.resolve_name"),
        Case("partial_torch_load", lambda t, s: torch_zip(t, pickle.dumps(
            Payload(functools.partial, torch.load, "/tmp/other.pt"), 2)), 1, "functools.partial"),
        Case("inst_opcode", lambda t, s: torch_zip(t, b"(S'" + touch(s).encode() + b"'\nios\nsystem\n."),
             1, "os.system"),
        Case("obj_opcode", lambda t, s: torch_zip(t, b"(cos\nsystem\nS'" + touch(s).encode() + b"'\no."),
             1, "os.system"),
        Case("stack_global_memo_trick", lambda t, s: torch_zip(t, stack_global_memo_trick(s)), 1, "posix.system"),
        Case("nested_pickle_loads", lambda t, s: torch_zip(t, pickle.dumps(
            Payload(pickle.loads, pickle.dumps(Payload(os.system, touch(s)))), 2)), 1, "pickle.loads"),
        Case("benign_then_malicious", lambda t, s: torch_zip(
            t, pickle.dumps({"w": 1}, 2) + pickle.dumps(Payload(os.system, touch(s)), 2)), 1, "appended after the first"),
        Case("payload_in_other_member", lambda t, s: torch_zip(
            t, extra={"model/extra.pkl": pickle.dumps(Payload(os.system, touch(s)), 2)}), 1, "posix.system"),
        Case("payload_in_member_without_suffix", lambda t, s: torch_zip(
            t, extra={"model/.data/x": pickle.dumps(Payload(os.system, touch(s)), 2)}), 1, "posix.system"),
        Case("payload_in_unreferenced_storage_member", lambda t, s: torch_zip(
            t, extra={"model/data/99": pickle.dumps(Payload(os.system, touch(s)), 2)}), 1, "posix.system"),
        Case("protocol_0_payload_in_other_member", lambda t, s: torch_zip(
            t, extra={"model/notes": pickle.dumps(Payload(os.system, touch(s)), 0)}), 1, "posix.system"),
        Case("member_name_climbs_out", lambda t, s: torch_zip(t, extra={"model/../../evil": b"x"}), 1,
             "outside the archive"),
        Case("legacy_object_payload", lambda t, s: legacy(t, [LEGACY_MAGIC, LEGACY_PROTOCOL, LEGACY_INFO,
                                                              pickle.dumps(Payload(os.system, touch(s)), 2)]),
             1, "posix.system"),
        Case("legacy_magic_payload", lambda t, s: legacy(t, [pickle.dumps(Payload(os.system, touch(s)), 2)]),
             1, "posix.system"),
        Case("dcp_metadata_payload", lambda t, s: _dcp_metadata_payload(t, s), 1, "posix.system"),
        Case("dcp_bytes_entry_payload", lambda t, s: _dcp_bytes_payload(t, s), 1, "posix.system"),
        Case("dcp_storage_path_escapes", lambda t, s: _dcp_storage_path(t, "../../etc/passwd"), 1,
             "outside the checkpoint folder"),
        Case("index_weight_map_climbs_out", lambda t, s: _index(t, "../outside.safetensors"), 1,
             "outside the checkpoint folder"),
        Case("index_weight_map_absolute", lambda t, s: _index(t, "/etc/passwd"), 1, "outside the checkpoint folder"),
        Case("bare_pickle_protocol_0", lambda t, s: _write(t / "model.pth", pickle.dumps(
            {"w": Payload(os.system, touch(s))}, 0)), 1, "posix.system"),
        Case("bare_pickle_protocol_1", lambda t, s: _write(t / "model.pth", pickle.dumps(
            Payload(os.system, touch(s)), 1)), 1, "posix.system"),
        Case("stack_global_behind_popped_decoys", lambda t, s: _write(t / "model.pth", decoy_strings(s)), 1,
             "posix.system"),
        Case("side_member_unparseable", lambda t, s: torch_zip(
            t, extra={"model/extra.pkl": b"\x80\x02\x8c\x05posix\xff."}), 1, "cannot be proven free of code"),
        Case("side_member_decoy_strings", lambda t, s: torch_zip(t, extra={"model/extra.pkl": decoy_strings(s)}), 1,
             "posix.system"),
        Case("dangerous_beside_benign_global", lambda t, s: torch_zip(t, pickle.dumps(
            {"args": __import__("argparse").Namespace(), "w": Payload(os.system, touch(s))}, 2)), 1, "posix.system"),
        # --- never crash: one line, exit 2 ----------------------------------------------------------------------
        Case("zero_byte_pth", lambda t, s: _write(t / "model.pth", b""), 2, "the file is an empty file"),
        Case("png_named_pth", lambda t, s: _write(t / "model.pth", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100), 2,
             "the file is a PNG image"),
        Case("truncated_zip", lambda t, s: _truncate(torch_zip(t), 0.6), 2, "zip"),
        Case("bad_crc_data_pkl", lambda t, s: _flip_in_member(torch_zip(t), "data.pkl", -5), 2, "CRC"),
        Case("bad_crc_storage", lambda t, s: _flip_in_member(_copy(GOOD / "consolidated.pth", t), "data/0", 3), 2,
             "bad CRC-32"),
        Case("zip_bomb", lambda t, s: zip_bomb(t), 2, "zip bomb"),
        Case("storage_smaller_than_declared", lambda t, s: torch_zip(t, _tensor_pickle(numel=4, shape=(64,))), 2,
             "runs past its storage"),
        Case("storage_offset_past_end", lambda t, s: torch_zip(t, _tensor_pickle(numel=4, shape=(2,), offset=9)), 2,
             "runs past its storage"),
        Case("storage_numel_disagrees_with_record", lambda t, s: torch_zip(t, _tensor_pickle(numel=64, shape=(64,))),
             2, "declares 256"),
        Case("deeply_nested_pickle", lambda t, s: torch_zip(
            t, b"\x80\x02}X\x01\x00\x00\x00w" + b"]" * 100_000 + b"a" * 99_999 + b"s."), 2, "levels deep"),
        Case("pickle_string_past_end", lambda t, s: torch_zip(t, b"\x80\x02X\xff\xff\xff\x7fabc."), 2,
             "malformed pickle"),
        Case("safetensors_header_bomb", lambda t, s: _write(t / "m.safetensors", struct.pack("<Q", 1 << 40) + b"{}"),
             2, "over the 100000000 byte limit"),
        Case("safetensors_overlap", lambda t, s: st_file(t, {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12), 2, "overlaps"),
        Case("safetensors_gap", lambda t, s: st_file(t, {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, b"\x00" * 20), 2, "gap"),
        Case("safetensors_span_mismatch", lambda t, s: st_file(t, {
            "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8), 2, "needs 12"),
        Case("safetensors_duplicate_keys", lambda t, s: st_file(
            t, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
               b'"data_offsets": [0, 4]}}', b"\x00" * 4), 2, "duplicate key 'a'"),
        Case("safetensors_trailing_bytes", lambda t, s: st_file(t, {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 9), 2, "trailing bytes"),
        Case("index_missing_shard", lambda t, s: _index(t, "model-00009-of-00009.safetensors"), 2, "does not exist"),
        Case("dcp_missing_distcp", lambda t, s: _dcp_files(t, lambda f: f.unlink()), 2, "is missing"),
        Case("dcp_zero_byte_distcp", lambda t, s: _dcp_files(t, lambda f: f.write_bytes(b"")), 2,
             "past the end of the 0 byte file"),
        Case("dcp_truncated_distcp", lambda t, s: _dcp_files(t, lambda f: _truncate(f, 0.5)), 2, "past the end"),
        Case("dcp_chunk_out_of_bounds", lambda t, s: _dcp_chunk(t, offsets=(64, 0)), 2, "lies outside"),
        Case("dcp_chunks_do_not_cover", lambda t, s: _dcp_chunk(t, sizes=(3, 32)), 2, "chunks cover"),
        Case("dcp_declares_a_huge_tensor", lambda t, s: _dcp_huge(t), 2, "needs 4000000000000"),
        Case("zip_record_larger_than_file", lambda t, s: _grow_record(torch_zip(
            t, _tensor_pickle(numel=0xFFFFFFF0 // 4, shape=(0xFFFFFFF0 // 4,)))), 2, "cannot fit"),
        Case("bytearray_3gb_in_32_bytes", lambda t, s: torch_zip(t, b"\x80\x02c__builtin__\nbytearray\n"
                                                                  b"\x8a\x05\x00\x00\x00\xc0\x00\x85R."), 2,
             "more than its bytes can hold"),
        Case("bytearray_2gb_in_a_70kb_pth", lambda t, s: _torch_save(t, {"w": torch.zeros(16384),
                                                                           "x": Payload(bytearray, 2**31)}), 2,
             "more than its bytes can hold"),
        Case("torch_size_of_a_bytearray", lambda t, s: torch_zip(t, b"\x80\x02ctorch\nSize\nc__builtin__\nbytearray\n"
                                                                   b"\x8a\x04\x00\x00\x00\x08\x85R\x85R."), 2,
             "more than its bytes can hold"),
        Case("dcp_bytes_entry_bytearray", lambda t, s: _dcp_bytes(t, Payload(bytearray, 2**31)), 2,
             "more than its bytes can hold"),
        Case("legacy_object_bytearray", lambda t, s: legacy(t, [LEGACY_MAGIC, LEGACY_PROTOCOL, LEGACY_INFO,
                                                                pickle.dumps(Payload(bytearray, 2**31), 2)]),
             2, "more than its bytes can hold"),
        Case("huge_int_in_param_groups", lambda t, s: _torch_save(t, {"w": torch.zeros(2), "lr": 10**5000}), 2,
             "integer of 16610 bits"),
        Case("build_poisons_ordered_dict", lambda t, s: torch_zip(t, b"\x80\x02ccollections\nOrderedDict\nN}X\x0b"
                                                                    b"\x00\x00\x00__setitem__c__builtin__\nset\ns\x86b."),
             2, "malformed pickle"),
        Case("dcp_version_not_numeric", lambda t, s: _dcp_version(t, "v2"), 2, "metadata version 'v2'"),
        Case("dcp_version_huge_int", lambda t, s: _dcp_version(t, 10**5000), 2, "integer of 16610 bits"),
        Case("dcp_version_a_list", lambda t, s: _dcp_version(t, [1, 0]), 2, "metadata version a list"),
        Case("config_invalid_json", lambda t, s: GOOD / "consolidated.pth", 2, "invalid JSON",
             config=Path("INVALID_JSON")),
        Case("config_heads_do_not_divide_dim", lambda t, s: GOOD / "consolidated.pth", 2, "does not divide dim",
             config=Path("BAD_HEADS")),
        Case("config_kv_do_not_divide_heads", lambda t, s: GOOD / "consolidated.pth", 2, "does not divide n_heads",
             config=Path("BAD_KV")),
    ]
    return out


def _copy(src: Path, tmp: Path) -> Path:
    return Path(shutil.copy(src, tmp / src.name))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _flip_in_member(path: Path, suffix: str, where: int) -> Path:
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        start = info.header_offset + 30 + name_len + extra_len
        pos = start + (where % info.file_size)
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))
    return path


def _tensor_pickle(*, numel: int, shape: tuple[int, ...], offset: int = 0) -> bytes:
    """data.pkl for {"w": tensor}, declaring ``numel`` float32 elements in storage "0" (whose record holds 4)."""

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            stride = tuple(int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape)))
            return torch._utils._rebuild_tensor_v2, (Storage(), offset, torch.Size(shape), stride, False,
                                                      __import__("collections").OrderedDict())

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": Tensor()})
    return buf.getvalue()


def _dcp_metadata_payload(tmp: Path, sentinel: Path) -> Path:
    folder = dcp_copy(tmp)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(os.system, touch(sentinel))))
    return folder


def _dcp_bytes_payload(tmp: Path, sentinel: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    folder = tmp / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": torch.load(GOOD / "consolidated.pth", weights_only=True),
                  "train_state": Payload(os.system, touch(sentinel))}, checkpoint_id=str(folder))
    return folder


def _dcp_storage_path(tmp: Path, rel: str) -> Path:
    def change(meta):
        for info in meta.storage_data.values():
            info.relative_path = rel
    return edit_metadata(dcp_copy(tmp), change)


def _dcp_files(tmp: Path, action: Callable[[Path], object]) -> Path:
    folder = dcp_copy(tmp)
    action(next(folder.glob("*.distcp")))
    return folder


def _dcp_chunk(tmp: Path, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None) -> Path:
    def change(meta):
        entry = meta.state_dict_metadata["model.layers.0.attention.wq.weight"]
        chunk = entry.chunks[0]
        old = (meta.state_dict_metadata["model.layers.0.attention.wq.weight"], tuple(chunk.offsets))
        if offsets is not None:
            key = next(k for k in meta.storage_data if k.fqn == "model.layers.0.attention.wq.weight")
            info = meta.storage_data.pop(key)
            chunk.offsets = torch.Size(offsets)
            from torch.distributed.checkpoint.metadata import MetadataIndex

            meta.storage_data[MetadataIndex(key.fqn, offsets, key.index)] = info
        if sizes is not None:
            chunk.sizes = torch.Size(sizes)
        del old
    return edit_metadata(dcp_copy(tmp), change)


def _dcp_huge(tmp: Path) -> Path:
    """A tensor declared 10^12 elements large, stored in one small chunk: nothing may try to allocate it."""
    def change(meta):
        entry = meta.state_dict_metadata["model.norm.weight"]
        entry.size = torch.Size([10**12])
        entry.chunks[0].sizes = torch.Size([10**12])
    return edit_metadata(dcp_copy(tmp), change)


def _grow_record(path: Path) -> Path:
    """Rewrite a storage record's sizes in the central directory (not the data) to 2 TB."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    start = 0
    while True:  # find this member's central directory record
        start = data.find(b"PK\x01\x02", start)
        name_len = struct.unpack("<H", data[start + 28:start + 30])[0]
        if data[start + 46:start + 46 + name_len].decode() == info.filename:
            break
        start += 4
    big = 0xFFFFFFF0
    data[start + 20:start + 28] = struct.pack("<II", big, big)
    path.write_bytes(bytes(data))
    return path


def _index(tmp: Path, shard_name: str) -> Path:
    folder = tmp / "hf"
    shutil.copytree(GOOD / "hf_sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = shard_name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def bad_configs(tmp: Path) -> dict[str, Path]:
    base = json.loads(LINGUA.read_text())
    out = {"INVALID_JSON": tmp / "invalid.json"}
    out["INVALID_JSON"].write_text('{"model": {"dim": 32,')
    for name, change in (("BAD_HEADS", {"n_heads": 5}), ("BAD_KV", {"n_kv_heads": 3})):
        data = {**base, "model": {**base["model"], **change}}
        out[name] = tmp / f"{name}.json"
        out[name].write_text(json.dumps(data))
    return out

