"""Issue 11, torch pickles and the reader boundary: every input ends in exit 0, 1 or 2 with one line, in
bounded time and memory, and with the verdict ``torch.load(weights_only=True)`` reaches.  Each file is the
good fixture re-pickled record by record, then one thing changed; each test goes through the CLI."""

from __future__ import annotations

import collections
import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main

from .writers import CONFIGS, FIXTURES, torch_refuses

LINGUA = CONFIGS / "lingua_params.json"
GOOD = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
TARGET = "layers.0.attention.wq.weight"  # the tensor a case alters: (32, 32) bfloat16


class Storage:
    """Pickles as a persistent id: ("storage", type, key, location, numel)."""

    def __init__(self, key: object, numel: int, stype: object = torch.BFloat16Storage, location: object = "cpu"):
        self.pid = ("storage", stype, key, location, numel)


class Tensor:
    """Pickles as torch.save pickles a tensor, with any storage, offset, size, stride (and v3 dtype)."""

    def __init__(self, storage: Storage, shape: tuple[int, ...], stride: tuple[int, ...], offset: int = 0,
                 v3_dtype: torch.dtype | None = None) -> None:
        self.args = (storage, offset, torch.Size(shape), stride, False, collections.OrderedDict())
        self.v3_dtype = v3_dtype

    def __reduce__(self):
        if self.v3_dtype is not None:
            return torch._utils._rebuild_tensor_v3, (*self.args, self.v3_dtype)
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        return obj.pid if isinstance(obj, Storage) else None


def _contiguous(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def good_entries() -> tuple[dict[str, object], dict[str, bytes]]:
    """The good fixture as (state dict of picklable records, storage bytes by key)."""
    state: dict[str, object] = {}
    records: dict[str, bytes] = {}
    for i, (key, t) in enumerate(GOOD.items()):
        records[str(i)] = t.contiguous().view(torch.uint8).numpy().tobytes()
        state[key] = Tensor(Storage(str(i), t.numel()), tuple(t.shape), _contiguous(t))
    return state, records


def archive(path: Path, state: object, records: dict[str, bytes], *, members: dict[str, bytes] | None = None,
            pkl_compression: int = zipfile.ZIP_STORED) -> Path:
    """A torch.save archive of ``state`` (as torch 2.x lays it out: same member names and order), with
    ``members`` replacing or adding records by name."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    torch.save({}, path)
    with zipfile.ZipFile(path) as src:
        names = {i.filename.split("/", 1)[1]: src.read(i) for i in src.infolist()}
    prefix = "archive/"
    names.update({"data.pkl": buf.getvalue(), **{f"data/{k}": v for k, v in records.items()}, **(members or {})})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in names.items():
            dst.writestr(prefix + name, data, compress_type=pkl_compression if name == "data.pkl" else zipfile.ZIP_STORED)
    return path


def run_check(path: Path, *args: str, config: Path = LINGUA) -> tuple[int, str, str]:
    """The CLI in a real process (memory-limited to 1.5 GB: a regression fails, it cannot OOM the machine)."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
        "from ckptcheck.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "check", str(path), "--model-config", str(config), *args],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def with_target(path: Path, tensor: object, records: dict[str, bytes] | None = None, **kwargs: object) -> Path:
    """The good fixture with the target tensor replaced by ``tensor`` (storage "t": ``records``)."""
    state, stored = good_entries()
    state[TARGET] = tensor
    return archive(path, state, {**stored, **(records or {})}, **kwargs)


def fails(out: str) -> list[str]:
    """The FAIL lines of a check run's output."""
    return [line.split()[1] for line in out.splitlines() if line.startswith("FAIL ")]


BF16_1024 = torch.arange(1024, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()


# -- allocation sized by a pickle argument ---------------------------------------------------------------------


def test_bytearray_sized_by_the_pickle_is_refused_before_it_is_allocated(tmp_path: Path) -> None:
    """bytearray(2**31) in a 70 KB .pth: torch.load allocates the 2 GB (and fails under the limit)."""
    class Big:
        def __reduce__(self):
            return bytearray, (2**31,)

    state, records = good_entries()
    path = archive(tmp_path / "model.pth", {**state, "x": Big()}, records)
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1, err
    assert "data.pkl: a constructor in the pickle asks for 2147483648 elements, more than its bytes can hold" in err
    assert torch_refuses(path) is not None


def test_torch_size_of_a_huge_bytearray_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """torch.Size(bytearray(2**27)): refused for what the bytes can hold, not built for 30 s."""
    size_of_bytearray = b"\x80\x02ctorch\nSize\nc__builtin__\nbytearray\nJ\x00\x00\x00\x08\x85R\x85R."
    state, records = good_entries()
    path = archive(tmp_path / "model.pth", state, records, members={"data.pkl": size_of_bytearray})
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1, err
    assert "data.pkl: a constructor in the pickle asks for 134217728 elements, more than its bytes can hold" in err


# -- stride-0 and overlapping views ----------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "stride", "dims"), [((2**20, 2**20), (0, 0), [0, 1]), ((2**24, 32), (0, 1), [0])],
                         ids=["2**40_elements", "1.4GB_copy"])
def test_stride_0_view_is_scanned_once_per_stored_element(tmp_path: Path, shape, stride, dims) -> None:
    """The finite scan reads the elements stored, not the view's 2**40 (a scan that never ends) or its
    2**29 (a 1.4 GB copy, refused by the 1.5 GB limit); the weight itself fails its shape check."""
    path = with_target(tmp_path / "model.pth", Tensor(Storage("t", 1024), shape, stride), {"t": BF16_1024})
    code, out, err = run_check(path)
    assert code == 1 and not err, err
    assert "shape[layers.0.attention.wq.weight]" in fails(out)
    assert f"repeats its stored values along dims {dims} (stride 0 or overlapping strides)" in out
    assert "finite[layers.0.attention.wq.weight]" not in fails(out)
    assert torch_refuses(path) is None  # torch.load loads the view: only a check can catch it


def test_stride_0_weight_fails_a_check_though_torch_loads_it(tmp_path: Path) -> None:
    path = with_target(tmp_path / "model.pth", Tensor(Storage("t", 1024), (32, 32), (0, 1)), {"t": BF16_1024})
    code, out, _err = run_check(path)
    assert code == 1 and fails(out) == ["shape[layers.0.attention.wq.weight]"], out
    assert ("layers.0.attention.wq.weight of shape [32, 32] repeats its stored values along dims [0] (stride 0 or "
            "overlapping strides)") in out
    assert torch_refuses(path) is None


def test_overlapping_view_is_scanned_over_the_storage_it_spans(tmp_path: Path) -> None:
    """Strides (1, 1) read 63 stored elements 1024 times in all: the scan reads the 63, and finds a NaN there."""
    values = torch.zeros(1024, dtype=torch.bfloat16)
    values[40] = float("nan")
    path = with_target(tmp_path / "model.pth", Tensor(Storage("t", 1024), (32, 32), (1, 1)),
                       {"t": values.view(torch.uint8).numpy().tobytes()})
    code, out, _err = run_check(path)
    assert code == 1 and fails(out) == ["shape[layers.0.attention.wq.weight]", "finite[layers.0.attention.wq.weight]"]
    assert "holds 1 NaN and 0 Inf values" in out and "along dims [0] (stride 0 or overlapping strides)" in out
    assert torch_refuses(path) is None


# -- views past their storage (v3: untyped storages counted in bytes) ------------------------------------------


@pytest.mark.parametrize(("shape", "offset"), [((32, 32), 512), ((64, 32), 0)], ids=["offset", "whole_record_and_more"])
def test_v3_view_reading_past_its_storage_is_refused_like_torch(tmp_path: Path, shape, offset) -> None:
    """Counted in bytes: 2048 elements from offset 0 of a 2048-byte storage run past it (the old count, in
    elements, took them for the whole record and reported a false bad CRC-32)."""
    path = with_target(tmp_path / "model.pth", Tensor(Storage("t", 2048, torch.UntypedStorage), shape, (32, 1),
                                                      offset=offset, v3_dtype=torch.bfloat16), {"t": BF16_1024})
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1 and "CRC" not in err, err
    assert (f"layers.0.attention.wq.weight: tensor of shape {list(shape)} at offset {offset} runs past its storage "
            "of 2048 bytes: torch.load refuses it") in err
    assert "Trying to resize storage that is not resizable" in torch_refuses(path)


@pytest.mark.parametrize("flipped", [False, True])
def test_v3_tensor_filling_its_storage_is_crc_checked_as_its_whole_record(tmp_path: Path, flipped: bool) -> None:
    """A v3 tensor whose bytes are its whole record: the record's CRC-32 is checked (and holds when intact)."""
    path = with_target(tmp_path / "model.pth", Tensor(Storage("t", 2048, torch.UntypedStorage), (32, 32), (32, 1),
                                                      v3_dtype=torch.bfloat16), {"t": BF16_1024})
    if flipped:  # one byte flipped on disk; the archive still records the CRC of the intact bytes
        raw = bytearray(path.read_bytes())
        raw[raw.index(BF16_1024) + 100] ^= 0x01
        path.write_bytes(bytes(raw))
    code, out, err = run_check(path)
    if flipped:
        assert code == 2 and err.count("\n") == 1 and "archive/data/t: bad CRC-32: the record is corrupted" in err, err
    else:
        assert (code, err) == (0, ""), out + err


# -- what torch.load(weights_only=True) refuses, we refuse with the reason -------------------------------------


def _drop_version(path: Path) -> Path:
    with zipfile.ZipFile(path) as z:
        kept = [(i.filename, z.read(i)) for i in z.infolist() if i.filename != "archive/version"]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in kept:
            z.writestr(name, data)
    return path


def _good(path: Path, **kwargs: object) -> Path:
    state, records = good_entries()
    return archive(path, state, records, **kwargs)


def _located(location: object = "cpu", key: object = "t") -> Tensor:
    return Tensor(Storage(key, 1024, location=location), (32, 32), (32, 1))


REFUSED_BY_TORCH = {
    "byteorder_middle": (lambda p: _good(p, members={"byteorder": b"middle"}),
                         "archive/byteorder: byte order 'middle' is neither little nor big: torch.load refuses it"),
    "version_999": (lambda p: _good(p, members={"version": b"999\n"}),
                    "archive/version: format version '999' is not one torch reads (1 to 10)"),
    "version_0": (lambda p: _good(p, members={"version": b"0\n"}), "format version '0' is not one torch reads"),
    "version_not_a_number": (lambda p: _good(p, members={"version": b"x3\n"}),
                             "format version 'x3' is not one torch reads"),
    "no_version_record": (lambda p: _drop_version(_good(p)), "archive/version: the archive has no version record"),
    "bzip2_data_pkl": (lambda p: _good(p, pkl_compression=zipfile.ZIP_BZIP2),
                       "archive/data.pkl: compressed with zip method 12, which torch.load cannot read"),
    "lzma_data_pkl": (lambda p: _good(p, pkl_compression=zipfile.ZIP_LZMA),
                      "archive/data.pkl: compressed with zip method 14, which torch.load cannot read"),
    "location_none": (lambda p: with_target(p, _located(None), {"t": BF16_1024}),
                      "storage location 'NoneType' names no device torch knows"),
    "location_unknown": (lambda p: with_target(p, _located("nowhere"), {"t": BF16_1024}),
                         "storage location 'nowhere' names no device torch knows: torch.load refuses it"),
    "bytes_storage_key": (lambda p: with_target(p, _located(key=b"t"), {"t": BF16_1024}),
                          "storage key b't' is bytes, not a string: torch.load refuses it"),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_TORCH))
def test_what_torch_load_refuses_is_refused_with_the_reason(tmp_path: Path, case: str) -> None:
    build, expect = REFUSED_BY_TORCH[case]
    path = build(tmp_path / "model.pth")
    assert torch_refuses(path) is not None
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1 and expect in err, err


ACCEPTED_BY_TORCH = {
    "deflated_data_pkl": lambda p: _good(p, pkl_compression=zipfile.ZIP_DEFLATED),
    "version_with_spaces_and_a_tail": lambda p: _good(p, members={"version": b" 3x\n"}),
    "bytes_location": lambda p: with_target(p, _located(b"cpu"), {"t": BF16_1024}),
    "int_storage_key": lambda p: with_target(p, _located(key=99), {"99": BF16_1024}),
}


@pytest.mark.parametrize("case", list(ACCEPTED_BY_TORCH))
def test_what_torch_load_reads_is_read(tmp_path: Path, case: str) -> None:
    path = ACCEPTED_BY_TORCH[case](tmp_path / "model.pth")
    assert torch_refuses(path) is None
    code, out, err = run_check(path)
    assert (code, err) == (0, ""), out + err


def test_a_gpu_location_is_read_on_a_cpu_machine(tmp_path: Path) -> None:
    """torch.load needs map_location for it here, as every training script on a CPU host passes."""
    code, out, err = run_check(with_target(tmp_path / "model.pth", _located("cuda:1"), {"t": BF16_1024}))
    assert (code, err) == (0, ""), out + err


# -- float8, shapes torch overflows on, huge integers ----------------------------------------------------------


def test_float8_tensor_is_scanned_for_nan_not_a_crash(tmp_path: Path) -> None:
    values = torch.zeros(32, dtype=torch.float8_e4m3fn)
    values.view(torch.uint8)[3] = 0x7F  # NaN in e4m3fn
    state, records = good_entries()
    state["norm.weight"] = Tensor(Storage("f8", 32, torch.UntypedStorage), (32,), (1,), v3_dtype=torch.float8_e4m3fn)
    path = archive(tmp_path / "model.pth", state, {**records, "f8": values.view(torch.uint8).numpy().tobytes()})
    assert torch_refuses(path) is None
    code, out, err = run_check(path)
    assert code == 1 and not err, err
    assert "finite[norm.weight]" in fails(out) and "norm.weight holds 1 NaN and 0 Inf values (first at flat index 3)" in out


def test_zero_element_tensor_with_a_dimension_of_2_63_is_refused_before_torch(tmp_path: Path) -> None:
    path = with_target(tmp_path / "model.pth", Tensor(Storage("t", 1024), (2**63, 0), (1, 1)), {"t": BF16_1024})
    assert torch_refuses(path) is not None
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1, err
    assert "size is not a tuple of at most 64 non-negative 64-bit integers" in err


def test_zero_element_tensor_with_the_largest_dimension_is_read(tmp_path: Path) -> None:
    path = with_target(tmp_path / "model.pth", Tensor(Storage("t", 1024), (2**63 - 1, 0), (1, 1)), {"t": BF16_1024})
    code, out, err = run_check(path)
    assert code == 1 and not err, err  # no C++ frames: torch is never handed a shape it overflows on
    assert "shape[layers.0.attention.wq.weight]" in fails(out)


def test_integer_over_4300_digits_is_one_line(tmp_path: Path) -> None:
    state, records = good_entries()
    path = archive(tmp_path / "model.pth", {**state, "lr": 10**5000}, records)
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1, err
    assert "archive/data.pkl: the pickle holds an integer of 16610 bits" in err


# -- two entries, one dotted key -------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", ["a_b", "target"])
def test_two_tensors_flattening_to_one_key_are_refused(tmp_path: Path, nested: str) -> None:
    state, records = good_entries()
    other = Tensor(Storage("t", 1024), (32, 32), (32, 1))
    if nested == "a_b":
        state.update({"a": {"b": other}, "a.b": Tensor(Storage("u", 512), (16, 32), (32, 1))})
        expect = "a.b: two entries flatten to this key (['a']['b'] and ['a.b'])"
    else:
        state["layers"] = {"0": {"attention": {"wq": {"weight": other}}}}
        expect = ("layers.0.attention.wq.weight: two entries flatten to this key (['layers.0.attention.wq.weight'] "
                  "and ['layers']['0']['attention']['wq']['weight'])")
    path = archive(tmp_path / "model.pth", state, {**records, "t": BF16_1024, "u": BF16_1024[:1024]})
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1 and expect in err, err


# -- the reader boundary ---------------------------------------------------------------------------------------


def test_an_exception_escaping_a_reader_is_one_line_naming_file_item_and_type(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever a reader raises while loading a tensor ends as exit 2, naming the file, the tensor and the
    exception's type (a genuine bug stays recognisable in the line)."""
    from ckptcheck.formats.torchzip import TorchArchive

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("setStorage: sizes [4] out of bounds\n  C++ frames")

    path = _good(tmp_path / "model.pth")
    monkeypatch.setattr(TorchArchive, "read", broken)
    assert main(["check", str(path), "--model-config", str(LINGUA)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "C++ frames" not in err, err
    assert f"{path}: " in err and ": cannot be read (RuntimeError: setStorage: sizes [4] out of bounds)" in err


def test_an_exception_escaping_a_reader_while_opening_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptcheck.formats import torchzip

    def broken(*_args: object, **_kwargs: object) -> None:
        raise KeyError("0")

    path = _good(tmp_path / "model.pth")
    monkeypatch.setattr(torchzip, "tensor_entries", broken)
    assert main(["check", str(path), "--model-config", str(LINGUA)]) == 2
    err = capsys.readouterr().err
    assert err == f"ckptcheck: error: {path}: cannot be read (KeyError: '0')\n", err


# -- pickle opcodes torch's weights_only unpickler does not implement ------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickle_protocol_torch_load_refuses_fails_the_version_check(tmp_path: Path, legacy: bool) -> None:
    """torch.save(..., pickle_protocol=4) writes FRAME, STACK_GLOBAL...: torch.load(weights_only=True)
    refuses the file, and says only 'Unsupported operand 149'."""
    path = tmp_path / "model.pth"
    torch.save(GOOD, path, pickle_protocol=4, _use_new_zipfile_serialization=not legacy)
    assert "Unsupported operand" in torch_refuses(path)
    code, out, err = run_check(path)
    assert code == 1 and not err, err
    assert "version[weights_only_opcodes]" in fails(out)
    assert ("torch.load(weights_only=True) refuses the file: its pickle uses the opcodes FRAME, MEMOIZE, "
            "SHORT_BINUNICODE, STACK_GLOBAL, which torch's weights_only unpickler does not read") in out


def test_torch_saves_own_protocol_names_no_opcode(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(GOOD, path)
    code, out, err = run_check(path, "-v")
    assert (code, err) == (0, "") and "weights_only_opcodes" not in out, out + err


def test_size_and_stride_as_lists_are_read_as_torch_reads_them(tmp_path: Path) -> None:
    class ListTensor(Tensor):
        def __reduce__(self):
            storage, offset, size, stride, *rest = self.args
            return torch._utils._rebuild_tensor_v2, (storage, offset, list(size), list(stride), *rest)

    path = with_target(tmp_path / "model.pth", ListTensor(Storage("t", 1024), (32, 32), (32, 1)), {"t": BF16_1024})
    assert torch_refuses(path) is None
    code, out, err = run_check(path)
    assert (code, err) == (0, ""), out + err


def test_a_record_stored_twice_under_one_name_is_refused(tmp_path: Path) -> None:
    """Two data/0 records: torch reads the first, Python's zipfile the last; the verdict would be on the
    bytes training never loads."""
    path = _good(tmp_path / "model.pth")
    with zipfile.ZipFile(path, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("archive/data/0", bytes(8192))  # tok_embeddings.weight's size, all zeros
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1, err
    assert "archive/data/0: the archive holds two records of this name" in err


def test_a_size_over_4300_digits_is_named_without_printing_it(tmp_path: Path) -> None:
    """bytearray(10**5000): the refusal's own message must not convert the number to text (ValueError)."""
    class Big:
        def __reduce__(self):
            return bytearray, (10**5000,)

    state, records = good_entries()
    path = archive(tmp_path / "model.pth", {**state, "x": Big()}, records)
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1, err
    assert ("data.pkl: a constructor in the pickle asks for a 16610-bit number of elements, more than its bytes "
            "can hold") in err


@pytest.mark.parametrize(("shape", "stride", "how"), [
    ((2**20, 2**20), (0, 0), "along dims [0, 1]"), ((32, 32), (0, 1), "along dims [0]"),
    ((2**20, 1024), (0, 1), "along dims [0]"), ((993, 32), (1, 1), "along dims [0]"),
], ids=["2**40", "rows", "2**40_rows", "overlap"])
def test_stride_0_view_is_not_copied_out_by_convert(tmp_path: Path, shape, stride, how) -> None:
    """A 70 KB file whose view repeats one value 2**40 times would be written out as 2 TB (it filled the
    disk): streaming reads refuse it, naming the dims, before any copy."""
    path = with_target(tmp_path / "model.pth", Tensor(Storage("t", 1024), shape, stride), {"t": BF16_1024})
    out = tmp_path / "out.safetensors"
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 28, 1 << 28))\n"
        "from ckptcheck.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "convert", str(path), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert (f"layers.0.attention.wq.weight: repeats its stored values {how} (stride 0 or overlapping strides): "
            "copying it would write") in proc.stderr
    assert not out.exists()


class FlaggedTensor(Tensor):
    """A v2 tensor with any requires_grad, backward hooks and metadata."""

    def __init__(self, requires_grad: object, hooks: object, metadata: object,
                 stype: object = torch.BFloat16Storage) -> None:
        super().__init__(Storage("t", 1024, stype), (32, 32), (32, 1))
        self.flags = (requires_grad, hooks, metadata)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (*self.args[:4], *self.flags)


@pytest.mark.parametrize(("tensor", "expect"), [
    (FlaggedTensor("x", collections.OrderedDict(), None), "requires_grad is a str, not a bool: torch.load refuses it"),
    (FlaggedTensor(True, collections.OrderedDict(), None, torch.ShortStorage),
     "a int16 tensor that requires grad: torch.load refuses it"),
    (FlaggedTensor(False, collections.OrderedDict(), [1]), "tensor metadata is a list, not a dict: torch.load refuses it"),
], ids=["requires_grad_not_bool", "int_requires_grad", "metadata_not_dict"])
def test_autograd_state_torch_load_refuses_is_refused(tmp_path: Path, tensor: FlaggedTensor, expect: str) -> None:
    path = with_target(tmp_path / "model.pth", tensor, {"t": BF16_1024})
    assert torch_refuses(path) is not None
    code, _out, err = run_check(path)
    assert code == 2 and err.count("\n") == 1 and expect in err, err


@pytest.mark.parametrize("tensor", [FlaggedTensor(True, collections.OrderedDict(), None),
                                    FlaggedTensor(False, 5, {"a": 1})], ids=["requires_grad", "odd_hooks_and_metadata"])
def test_autograd_state_torch_load_reads_is_read(tmp_path: Path, tensor: FlaggedTensor) -> None:
    path = with_target(tmp_path / "model.pth", tensor, {"t": BF16_1024})
    assert torch_refuses(path) is None
    code, out, err = run_check(path)
    assert (code, err) == (0, ""), out + err
