"""Pickles are never executed: payloads are refused by name and nothing runs (the full corpus comes with
the hostile-input work; these cases pin the mechanism every reader shares)."""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptcheck.checks.model import Status
from ckptcheck.cli import main
from ckptcheck.engine import Options, plan, run
from ckptcheck.errors import CkptError, InputError, UnsafeInputError
from ckptcheck.formats import open_checkpoint

from .writers import CONFIGS


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# The standard library's class factories exec source they generate themselves: @dataclass methods and
# namedtuple's __new__.  A lazy import inside the run raises those, depending on which test first imports a
# module in this process; they are not input being executed.
_CLASS_FACTORIES = {dataclasses.__file__, collections.__file__}


def _from_class_factory() -> bool:
    """Whether the code being exec'd comes from a standard-library class factory (checked on the stack)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename in _CLASS_FACTORIES:
            return True
        frame = frame.f_back
    return False


class _Audit:
    """Records process-spawning and exec audit events, only while active (hooks cannot be removed)."""

    EVENTS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn")

    def __init__(self) -> None:
        self.active = False
        self.events: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event in self.EVENTS:
            self.events.append(event)
        # eval/exec of a string: module imports raise "exec" too, but with a real file name
        elif event == "exec" and getattr(args[0], "co_filename", "") == "<string>" and not _from_class_factory():
            self.events.append(event)

    def __enter__(self) -> _Audit:
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False


_AUDIT = _Audit()


@pytest.fixture
def sentinel(tmp_path: Path):
    """(marker file a payload would create, audit recorder); asserts afterwards that nothing ran."""
    path = tmp_path / "PWNED"
    # Import every reader first: defining dataclasses at import time legitimately raises "exec" events.
    for good in ("good/consolidated.pth", "good/dcp"):
        run(plan(CONFIGS.parent / good, CONFIGS / "lingua_params.json", Options(metadata_only=True)))
    _AUDIT.events.clear()
    yield path, _AUDIT
    assert not path.exists(), "a payload ran"
    assert not _AUDIT.events, f"code ran while reading: {_AUDIT.events}"


def _torch_zip_with(tmp_path: Path, payload: object) -> Path:
    """A real torch.save archive whose data.pkl is replaced by ``payload``'s pickle."""
    path = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps(payload, protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    return path


@pytest.mark.parametrize(("func", "culprit"), [
    (os.system, "posix.system"),
    (eval, "__builtin__.eval"),  # protocol 2, as torch.save writes, spells builtins the Python 2 way
    (exec, "__builtin__.exec"),
])
def test_reduce_payload_is_refused_by_name(tmp_path: Path, sentinel, func, culprit: str) -> None:
    marker, audit = sentinel
    arg = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w')"
    path = _torch_zip_with(tmp_path, {"w": _Payload(func, arg)})
    with audit, pytest.raises(UnsafeInputError) as exc:
        open_checkpoint(path)
    assert exc.value.culprit == culprit
    assert "can execute code" in exc.value.cause


def test_unsafe_checkpoint_is_an_unsafe_check_and_exit_1(tmp_path: Path, sentinel, capsys) -> None:
    marker, audit = sentinel
    path = _torch_zip_with(tmp_path, _Payload(os.system, f"touch {marker}"))
    with audit:
        the_plan = plan(path, CONFIGS / "lingua_params.json", Options())
        (result,) = run(the_plan)
    assert result.status is Status.UNSAFE and result.category == "safety"
    assert "posix.system" in result.message and "can execute code" in result.message
    assert main(["check", str(path), "--model-config", str(CONFIGS / "lingua_params.json")]) == 1
    assert "UNSAFE" in capsys.readouterr().out


def test_appended_second_pickle_is_reported(tmp_path: Path, sentinel) -> None:
    marker, audit = sentinel
    benign = pickle.dumps({"w": 1}, protocol=2)
    evil = pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2)
    path = _torch_zip_with(tmp_path, None)
    with zipfile.ZipFile(path) as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = benign + evil
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    with audit, pytest.raises(UnsafeInputError) as exc:
        open_checkpoint(path)
    assert exc.value.culprit == "posix.system"


def test_malicious_dcp_metadata_is_refused(tmp_path: Path, sentinel) -> None:
    marker, audit = sentinel
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    with audit, pytest.raises(UnsafeInputError) as exc:
        open_checkpoint(folder)
    assert exc.value.culprit == "posix.system" and exc.value.path.endswith(".metadata")


def test_io_global_is_unsafe(tmp_path: Path) -> None:
    path = _torch_zip_with(tmp_path, {"w": io.BytesIO(b"x")})
    with pytest.raises(UnsafeInputError) as exc:
        open_checkpoint(path)
    assert exc.value.culprit == "_io.BytesIO" and "can execute code" in exc.value.cause


# --- BUILD cannot change what the allowlist hands out ---------------------------------------------------------

def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _build_on_global(module: str, name: str, attr: str, value: bytes, slots: bool = True) -> bytes:
    """Protocol 2: push the global itself, then BUILD with {attr: value} as slot state (setattr on it) or as
    dict state."""
    state = b"}" + _unicode(attr) + value + b"s"
    return b"\x80\x02" + _global(module, name) + (b"N" + state + b"\x86" if slots else state) + b"b."


@pytest.mark.parametrize(("module", "name", "attr", "value"), [
    ("collections", "OrderedDict", "__setitem__", _global("builtins", "set")),  # SETITEMS on every later state dict
    ("torch._utils", "_rebuild_tensor_v2", "__defaults__", b")"),  # every later tensor misses an argument
    ("torch", "float32", "__class__", _global("collections", "OrderedDict")),
    ("builtins", "bytearray", "__init__", _global("builtins", "set")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo", "__setstate__", _global("builtins", "set")),
], ids=["OrderedDict", "rebuild_tensor", "dtype_marker", "bytearray", "dcp_record"])
@pytest.mark.parametrize("slots", [True, False], ids=["setattr", "dict_state"])
def test_build_on_an_allowlisted_global_fails_and_changes_nothing(tmp_path: Path, module: str, name: str,
                                                                 attr: str, value: bytes, slots: bool) -> None:
    """Old code: BUILD's setattr changed AttrDict and the rebuild functions for every later file."""
    poison = _build_on_global(module, name, attr, value, slots)
    from ckptcheck.formats.torch_pickle import TORCH_ALLOWLIST

    with pytest.raises(CkptError) as exc:
        open_checkpoint(_torch_zip_raw(tmp_path, poison))
    # a DCP record is no global of a torch.save file: there it is refused by name, before any BUILD
    assert isinstance(exc.value, UnsafeInputError) is ((module, name) not in TORCH_ALLOWLIST)
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(poison)
    with pytest.raises(CkptError):
        open_checkpoint(folder)
    following = tmp_path / "next.pth"
    torch.save(OrderedDict(w=torch.arange(4.0)), following)
    with open_checkpoint(following) as ckpt:
        assert torch.equal(ckpt.load("w"), torch.arange(4.0))
    with open_checkpoint(CONFIGS.parent / "good" / "dcp") as ckpt:
        assert len(ckpt.manifest.tensors) == 21


def _torch_zip_raw(tmp_path: Path, data_pkl: bytes) -> Path:
    from .hostile import torch_zip

    return torch_zip(tmp_path, data_pkl)


# --- sizes are bounded by the file -------------------------------------------------------------------------------

def _long(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


@pytest.mark.parametrize("data_pkl", [
    b"\x80\x02" + _global("__builtin__", "bytearray") + _long(3 << 30) + b"\x85R.",  # 3 GB from 32 bytes
    b"\x80\x02" + _global("torch", "Size") + _global("__builtin__", "bytearray") + _long(1 << 27) + b"\x85R\x85R.",
    b"\x80\x02" + _global("__builtin__", "set") + _global("__builtin__", "bytearray") + _long(1 << 27) + b"\x85R\x85R.",
])
def test_constructor_sizes_are_bounded_by_the_file(tmp_path: Path, data_pkl: bytes) -> None:
    with pytest.raises(InputError, match="more than its bytes can hold"):
        open_checkpoint(_torch_zip_raw(tmp_path, data_pkl))


def test_bytearray_in_a_large_pth_and_a_dcp_bytes_entry(tmp_path: Path) -> None:
    big = tmp_path / "big.pth"
    torch.save({"w": torch.zeros(16384), "extra": _Payload(bytearray, 2**31)}, big)  # 70 KB asking for 2 GB
    with pytest.raises(InputError, match="more than its bytes can hold"):
        open_checkpoint(big)
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    dcp.save({"model": {"w": torch.zeros(4)}, "train_state": _Payload(bytearray, 2**31)}, checkpoint_id=str(folder))
    assert main(["check", str(folder), "--model-config", str(CONFIGS / "lingua_params.json")]) == 2


# --- the scanner for pickles that are never loaded ---------------------------------------------------------------

def _short(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def test_pushed_and_popped_strings_do_not_hide_stack_global(tmp_path: Path, sentinel) -> None:
    marker, audit = sentinel
    evil = (b"\x80\x04" + _short("posix") + _short("system") + _short("collections") + _short("OrderedDict")
            + b"00\x93" + _short(f"touch {marker}") + b"\x85R.")
    bare = tmp_path / "model.pth"
    bare.write_bytes(evil)
    with audit, pytest.raises(UnsafeInputError) as exc:
        open_checkpoint(bare)
    assert exc.value.culprit == "posix.system"


@pytest.mark.parametrize("protocol", [0, 1])
def test_protocol_0_and_1_bare_pickles_are_recognised(tmp_path: Path, sentinel, protocol: int, capsys) -> None:
    marker, audit = sentinel
    bare = tmp_path / "model.pth"
    bare.write_bytes(pickle.dumps({"w": _Payload(os.system, f"touch {marker}")}, protocol))
    with audit:
        code = main(["check", str(bare), "--model-config", str(CONFIGS / "lingua_params.json")])
    assert code == 1 and "posix.system" in capsys.readouterr().out


def test_unparseable_side_pickle_is_unsafe(tmp_path: Path) -> None:
    from .hostile import torch_zip

    side = b"\x80\x02" + _short("posix") + b"\xff\xfe."  # an opcode pickle does not know
    path = torch_zip(tmp_path, extra={"model/extra.pkl": side})
    with pytest.raises(UnsafeInputError, match="cannot be proven free of code"):
        open_checkpoint(path)


def test_stack_global_on_computed_operands_is_unsafe(tmp_path: Path) -> None:
    from .hostile import torch_zip

    side = b"\x80\x04" + _short("posix") + b"N\x93."  # module known, name not a string: cannot be named
    path = torch_zip(tmp_path, extra={"model/extra.pkl": side})
    with pytest.raises(UnsafeInputError, match="not known strings"):
        open_checkpoint(path)


# --- DCP metadata version ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v2", ["1", "0"], 3.0, "1.0.0; rm -rf"], ids=["v2", "list", "float", "junk"])
def test_dcp_metadata_with_an_odd_version_is_one_line_exit_2(tmp_path: Path, version, capsys) -> None:
    from .hostile import dcp_copy, edit_metadata

    def change(meta):
        meta.version = version

    folder = edit_metadata(dcp_copy(tmp_path), change)
    assert main(["check", str(folder), "--model-config", str(CONFIGS / "lingua_params.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metadata version" in err and "Traceback" not in err


def test_scanning_is_bounded(tmp_path: Path, monkeypatch) -> None:
    """A never-loaded pickle of more opcodes than a scan follows is unsafe, not a hang."""
    from ckptcheck import safe_pickle

    from .hostile import torch_zip

    monkeypatch.setattr(safe_pickle, "MAX_SCAN_OPCODES", 1000)
    path = torch_zip(tmp_path, extra={"model/extra.pkl": b"\x80\x02" + b"N0" * 600 + b"N."})
    with pytest.raises(UnsafeInputError, match="more than 1000 opcodes"):
        open_checkpoint(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_legacy_files_of_every_pickle_protocol_are_read(tmp_path: Path, protocol: int) -> None:
    """torch.save(..., _use_new_zipfile_serialization=False, pickle_protocol=4) frames its pickles: still a
    legacy file, not a bare pickle whose raw storage bytes cannot be proven free of code."""
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format_name == "torch-legacy" and torch.equal(ckpt.load("w"), torch.arange(4.0))


def test_a_legacy_object_pickle_allocates_no_more_than_a_data_pkl_could_hold(tmp_path: Path, monkeypatch) -> None:
    """The bytes left in a legacy file are mostly storages: they do not widen what its pickles may allocate."""
    from ckptcheck.formats import legacy

    from .hostile import LEGACY_INFO, LEGACY_MAGIC, LEGACY_PROTOCOL

    monkeypatch.setattr(legacy, "MAX_DATA_PKL", 1000)
    path = tmp_path / "legacy.pt"
    path.write_bytes(LEGACY_MAGIC + LEGACY_PROTOCOL + LEGACY_INFO + pickle.dumps(_Payload(bytearray, 100_000), 2)
                     + pickle.dumps([], 2) + b"\x00" * 200_000)
    with pytest.raises(InputError, match="more than its bytes can hold"):
        open_checkpoint(path)


def test_distinct_unknown_globals_are_bounded(tmp_path: Path) -> None:
    """Each refused global costs a stand-in class: a pickle naming millions would take gigabytes."""
    from ckptcheck.safe_pickle import MAX_UNKNOWN_GLOBALS

    from .hostile import torch_zip

    names = b"".join(_global("numpy.dtypes", f"N{i}DType") + b"0" for i in range(MAX_UNKNOWN_GLOBALS + 1))
    with pytest.raises(InputError, match=f"more than {MAX_UNKNOWN_GLOBALS} globals"):
        open_checkpoint(torch_zip(tmp_path, b"\x80\x02" + names + b"N."))
