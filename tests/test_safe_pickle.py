"""Pickles are never executed: payloads are refused by name and nothing runs (the full corpus comes with
the hostile-input work; these cases pin the mechanism every reader shares)."""

from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ckptcheck.checks.model import Status
from ckptcheck.cli import main
from ckptcheck.engine import Options, plan, run
from ckptcheck.errors import UnsafeInputError
from ckptcheck.formats import open_checkpoint

from .writers import CONFIGS


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


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
        elif event == "exec" and getattr(args[0], "co_filename", "") == "<string>":
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
    assert "known to execute code" in exc.value.cause


def test_unsafe_checkpoint_is_an_unsafe_check_and_exit_1(tmp_path: Path, sentinel, capsys) -> None:
    marker, audit = sentinel
    path = _torch_zip_with(tmp_path, _Payload(os.system, f"touch {marker}"))
    with audit:
        the_plan = plan(path, CONFIGS / "lingua_params.json", Options())
        (result,) = run(the_plan)
    assert result.status is Status.UNSAFE and result.category == "safety"
    assert "posix.system" in result.message and "known to execute code" in result.message
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
    assert exc.value.culprit == "_io.BytesIO" and "known to execute code" in exc.value.cause
