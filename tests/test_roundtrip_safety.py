"""The round trip never executes its input: a payload in a DCP bytes entry or ``.metadata`` is reported
as unsafe before any rank starts, and the ranks' own reader (``roundtrip.storage``) refuses it too,
while loading what torch's default reader loads from an honest checkpoint."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from ckptcheck import cli
from ckptcheck.errors import UnsafeInputError
from ckptcheck.roundtrip.storage import SafeLoadPlanner, open_dcp

from .hostile import Payload, touch
from .writers import FIXTURES

GOOD = FIXTURES / "good"


def _save(state: dict[str, Any], folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dcp.save without a process group warns that it runs alone
        dcp.save(state, checkpoint_id=str(folder))
    return folder


def optim_payload_dcp(tmp: Path, sentinel: Path) -> Path:
    """The good lingua DCP, saved again by torch with a pickle payload as the optimizer's lr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = _load_state_dict_from_keys(checkpoint_id=str(GOOD / "dcp"))  # our own fixture: trusted
    state["optim"]["param_groups"][0]["lr"] = Payload(os.system, touch(sentinel))
    folder = _save(state, tmp / "hostile_dcp")
    for name in ("params.json", "train_state_00000.json"):
        shutil.copy(GOOD / "dcp" / name, folder / name)
    return folder


@pytest.fixture
def no_ranks(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records any attempt to start torchrun (none must happen) instead of starting it."""
    started: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        started.append(args)
        raise AssertionError("a rank was started")

    monkeypatch.setattr("ckptcheck.roundtrip.launch.subprocess.Popen", refuse)
    return started


@pytest.mark.parametrize("how", ["optimizer", "dcp"])
def test_bytes_entry_payload_is_unsafe_before_any_rank_starts(how: str, tmp_path: Path, no_ranks: list[Any],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "pwned"
    folder = optim_payload_dcp(tmp_path, sentinel)
    args = [str(folder), "--optimizer"] if how == "optimizer" else [
        str(GOOD / "consolidated.pth"), "--model-config", str(GOOD / "dcp" / "params.json"), "--dcp", str(folder)]
    assert cli.main(["roundtrip", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ckptcheck: unsafe: ") and "posix.system" in err, err
    assert no_ranks == [] and not sentinel.exists()


def test_the_cli_refuses_it_as_a_user_runs_it(tmp_path: Path) -> None:
    """The same through the real command, which would start torchrun if the check came after."""
    sentinel = tmp_path / "pwned"
    folder = optim_payload_dcp(tmp_path, sentinel)
    proc = subprocess.run([sys.executable, "-m", "ckptcheck.cli", "roundtrip", str(folder), "--optimizer",
                           "--world-size", "1", "--timeout", "120"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unsafe" in proc.stderr and "posix.system" in proc.stderr
    assert not sentinel.exists()


def test_the_ranks_reader_refuses_a_bytes_entry_payload(tmp_path: Path) -> None:
    """What a rank runs, in-process: a payload swapped in after the launcher's check is refused, not run."""
    sentinel = tmp_path / "pwned"
    folder = optim_payload_dcp(tmp_path, sentinel)
    _, reader = open_dcp(folder)  # metadata is clean: the payload is in a bytes entry
    state = {"optim": {"param_groups": [{"lr": 0.0}]}}
    with pytest.raises(CheckpointException, match=r"UnsafeInputError: .*optim\.param_groups\.0\.lr.*posix\.system"):
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(folder, allow_partial_load=True))
    assert not sentinel.exists() and state["optim"]["param_groups"][0]["lr"] == 0.0


def test_the_ranks_reader_refuses_a_metadata_payload(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "dcp"
    shutil.copytree(GOOD / "dcp", folder)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(os.system, touch(sentinel))))
    with pytest.raises(UnsafeInputError, match=r"posix\.system"):
        open_dcp(folder)
    assert not sentinel.exists()


def _forbidden(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the ranks' reader called torch's unpickling")


def _fresh() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
            "train_state": {"step": 0, "lr": 0.0, "name": "", "betas": (0.0, 0.0), "flags": [], "dtype": None},
            "data_loader": {"position": {}}}


def test_the_safe_reader_loads_what_torch_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch-written DCP with non-tensor entries loads identically through both readers; ours never
    calls torch.load or pickle.load (torch's reader calls both)."""
    saved = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)},
             "train_state": {"step": 7, "lr": 2.5e-4, "name": "run-1", "betas": (0.9, 0.95), "flags": [True, None],
                             "dtype": torch.bfloat16},
             "data_loader": {"position": {"epoch": 3, "rng": torch.arange(5, dtype=torch.int64)}}}
    folder = _save(saved, tmp_path / "dcp")
    by_torch, by_us = _fresh(), _fresh()
    dcp.load(by_torch, checkpoint_id=str(folder))
    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, _forbidden)
    _, reader = open_dcp(folder)
    dcp.load(by_us, storage_reader=reader, planner=SafeLoadPlanner(folder))
    monkeypatch.undo()
    assert by_us["train_state"] == by_torch["train_state"] == saved["train_state"]
    for section in ("model", "data_loader"):
        torch.testing.assert_close(by_us[section], by_torch[section], rtol=0, atol=0)
    assert by_us["train_state"]["step"] == 7 and type(by_us["train_state"]["betas"]) is tuple


@pytest.mark.slow
def test_a_payload_swapped_in_after_the_check_is_refused_by_the_ranks(tmp_path: Path) -> None:
    """The ranks started on a DCP that turned hostile after the launcher's check (run_world is what
    runs after it): each rank refuses the bytes entry itself and says why; nothing runs."""
    from ckptcheck.roundtrip.launch import run_world

    sentinel = tmp_path / "pwned"
    folder = optim_payload_dcp(tmp_path, sentinel)
    trip = run_world(dcp=folder, source=GOOD / "dcp", world_size=2, config=str(GOOD / "dcp" / "params.json"),
                     factory=None, optimizer=True, save=None, timeout=120)
    assert not trip.ok and not sentinel.exists()
    errors = " ".join(trip.errors)
    assert "failed in phase load: ckptcheck.errors.UnsafeInputError" in errors and "posix.system" in errors, errors


def test_pytest_ckpt_roundtrip_refuses_it_without_starting_ranks(tmp_path: Path, no_ranks: list[Any],
                                                                  pytester: pytest.Pytester) -> None:
    sentinel = tmp_path / "pwned"
    folder = optim_payload_dcp(tmp_path, sentinel)
    result = pytester.runpytest("--ckpt", str(folder), "--ckpt-target", "resume", "--ckpt-roundtrip", "2", "-v")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_safety*FAILED*", "*posix.system*"])
    assert no_ranks == [] and not sentinel.exists()
