"""The FSDP round trip on real torch.distributed processes (gloo on CPU), launched by torchrun.

Slow (each world size starts its own processes): ``make test`` runs these, ``make test-fast`` skips them.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from ckptcheck.convert.api import convert
from ckptcheck.roundtrip.launch import read_reports, roundtrip
from ckptcheck.roundtrip.reaper import processes_with_env

from .writers import CONFIGS, FIXTURES

pytestmark = pytest.mark.slow
GOOD = FIXTURES / "good"
LINGUA = CONFIGS / "lingua_params.json"


def test_world_size_1(tmp_path: Path) -> None:
    result = roundtrip(GOOD / "consolidated.pth", config=LINGUA, world_size=1, workdir=tmp_path)
    assert result.ok, result.lines()
    assert result.converted and result.trips[0].ranks[0]["compared_tensors"] == 21


@pytest.mark.parametrize(("world", "reshard"), [(2, 4), (4, 2)])
def test_reshard(world: int, reshard: int, tmp_path: Path) -> None:
    """Converted by ckptcheck, loaded at N ranks, saved from N, loaded at M: equal to the source each time."""
    result = roundtrip(GOOD / "hf", config=None, world_size=world, reshard_to=reshard, workdir=tmp_path)
    assert result.ok, result.lines()
    assert [t.world_size for t in result.trips] == [world, reshard]
    for trip in result.trips:  # every rank compared all 21 tensors' shards (some shards may be empty)
        assert len(trip.ranks) == trip.world_size
        assert all(r["compared_tensors"] == 21 for r in trip.ranks)
        assert all(r["backend"] == "gloo" for r in trip.ranks)
    assert (tmp_path / f"saved_{world}" / ".metadata").is_file()


def test_optimizer_state_goes_through_the_trip(tmp_path: Path) -> None:
    result = roundtrip(GOOD / "dcp", config=None, world_size=2, reshard_to=1, optimizer=True, workdir=tmp_path)
    assert result.ok, result.lines()
    rank0 = result.trips[0].ranks[0]
    assert rank0["compared_tensors"] == 21 * 4  # the weight, then step, exp_avg, exp_avg_sq
    # this torch's AdamW has a field the checkpoint's param group predates: loaded with its default
    assert all(k.startswith("optim.param_groups.") for k in rank0["absent_in_checkpoint"])


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    result = roundtrip(GOOD / "tied", config=None, world_size=2, workdir=tmp_path)
    assert result.ok, result.lines()
    assert all(r["tied"] is True for r in result.trips[0].ranks)
    untied = roundtrip(GOOD / "consolidated.pth", config=LINGUA, world_size=2, workdir=tmp_path / "u")
    assert untied.ok and all(r["tied"] is None for r in untied.trips[0].ranks)


def test_a_shard_that_differs_from_the_source_names_key_rank_and_index(tmp_path: Path) -> None:
    """A DCP that loads cleanly but holds other values than the source: the comparison finds it."""
    import torch

    state = torch.load(GOOD / "consolidated.pth", weights_only=True)
    w2 = state["layers.1.feed_forward.w2.weight"]  # [32, 96] bf16: element [13, 39] is in rank 0's rows of 2
    w2[13, 39] = -w2[13, 39] - 1
    torch.save(state, tmp_path / "other.pth")
    dcp = tmp_path / "dcp"
    convert(tmp_path / "other.pth", dcp, to="dcp", config=LINGUA)
    result = roundtrip(GOOD / "consolidated.pth", config=LINGUA, world_size=2, dcp=dcp, workdir=tmp_path / "w")
    assert not result.ok
    (mismatch,) = result.trips[0].mismatches
    assert mismatch["key"] == "layers.1.feed_forward.w2.weight"
    assert (mismatch["rank"], mismatch["world_size"], mismatch["rows"]) == (0, 2, [0, 16])
    assert mismatch["first_index"] == [13, 39]


def test_a_corrupted_dcp_record_names_the_key(tmp_path: Path) -> None:
    """A flipped byte in a chunk's record fails its CRC as the ranks read it, naming the tensor."""
    from ckptcheck.formats.dcp import read_metadata
    from ckptcheck.formats.torchzip import TorchArchive, single_tensor_ref

    dcp = tmp_path / "dcp"
    convert(GOOD / "consolidated.pth", dcp, to="dcp", config=LINGUA)
    items, _ = read_metadata(dcp)
    chunk = items["model.layers.1.feed_forward.w2.weight"].chunks[0]
    with open(dcp / chunk.file, "r+b") as f:
        archive = TorchArchive(f, path="blob", base=chunk.start, length=chunk.length)
        where = archive._data_offset(single_tensor_ref(archive, "w2").storage) + 2 * (13 * 96 + 39)
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x55]))
    result = roundtrip(GOOD / "consolidated.pth", config=LINGUA, world_size=2, dcp=dcp, workdir=tmp_path / "w")
    assert not result.ok and not result.trips[0].mismatches
    errors = " ".join(result.trips[0].errors)
    assert "failed in phase load" in errors and "model.layers.1.feed_forward.w2.weight" in errors, errors
    assert "bad CRC-32" in errors, errors


FACTORY = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path
    from ckptcheck.configs import load_config
    from ckptcheck.model import Transformer

    def crash_on_rank_1(raw):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("rank one cannot build its model")
        return Transformer(load_config(os.environ["TINY_CONFIG"]))

    def hang_on_rank_1(raw):
        if os.environ.get("RANK") == "1":
            Path(os.environ["HANG_READY"]).touch()
            time.sleep(3600)
        return Transformer(load_config(os.environ["TINY_CONFIG"]))

    def torn_report_on_rank_1(raw):
        """Killed while writing its report: the worker writes rank1.json.tmp, then renames it."""
        if os.environ.get("RANK") == "1":
            report = Path(sys.argv[sys.argv.index("--report") + 1])
            (report / "rank1.json.tmp").write_text('{"rank": 1, "phases": {"in')
            os.kill(os.getpid(), signal.SIGKILL)
        return Transformer(load_config(os.environ["TINY_CONFIG"]))
''')


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Rank factories that fail, and a mark in the environment every process of the trip inherits, so
    that a process outliving the trip is found in /proc whatever the launcher does."""
    (tmp_path / "trip_factories.py").write_text(FACTORY)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("TINY_CONFIG", str(LINGUA))
    monkeypatch.setenv("HANG_READY", str(tmp_path / "rank1_hangs"))
    monkeypatch.setenv(MARK, uuid.uuid4().hex)
    return tmp_path


MARK = "CKPTCHECK_TEST_TRIP_MARK"


def leftovers() -> list[int]:
    """Processes of the trip still alive now that it has returned (it kills and reaps before it does)."""
    return processes_with_env(MARK, os.environ[MARK])


def test_a_crashed_rank_fails_with_its_own_error(factories: Path) -> None:
    result = roundtrip(GOOD / "consolidated.pth", config=LINGUA, world_size=2, factory="trip_factories:crash_on_rank_1",
                       workdir=factories / "w", timeout=120)
    assert not result.ok
    errors = " ".join(result.trips[0].errors)
    assert "rank 1 failed in phase build" in errors and "rank one cannot build its model" in errors
    assert leftovers() == []


def test_a_hung_rank_times_out_and_leaves_no_process(factories: Path) -> None:
    result = roundtrip(GOOD / "consolidated.pth", config=LINGUA, world_size=2, factory="trip_factories:hang_on_rank_1",
                       workdir=factories / "w", timeout=30)
    # Rank 1 is asleep, or on a loaded machine still starting, when the time is up: either way the
    # trip's processes are alive then, and none may be left.
    assert not result.ok
    assert any("timed out" in e or "failed" in e for e in result.trips[0].errors)
    assert leftovers() == []


def test_a_rank_killed_while_writing_its_report_is_named(factories: Path) -> None:
    result = roundtrip(GOOD / "consolidated.pth", config=LINGUA, world_size=2,
                       factory="trip_factories:torn_report_on_rank_1", workdir=factories / "w", timeout=120)
    assert not result.ok
    assert "rank 1's report is incomplete (the rank was killed while writing it)" in result.trips[0].errors
    assert leftovers() == []


def test_a_torn_report_file_is_named_not_parsed(tmp_path: Path) -> None:
    """A report cut short (a worker that writes in place, killed midway) is not a JSONDecodeError."""
    (tmp_path / "rank0.json").write_text(json.dumps({"rank": 0, "error": None}))
    (tmp_path / "rank1.json").write_text('{"rank": 1, "pha')
    ranks, errors = read_reports(tmp_path, 2)
    assert [r["rank"] for r in ranks] == [0]
    assert errors == ["rank 1's report is incomplete (the rank was killed while writing it)"]


def test_sigterm_to_the_launcher_leaves_no_process(factories: Path) -> None:
    """The launcher is stopped from outside while a rank hangs: its cleanup still ends every process."""
    code = ("from ckptcheck.roundtrip.launch import roundtrip; import sys; "
            f"roundtrip({str(GOOD / 'consolidated.pth')!r}, config={str(LINGUA)!r}, world_size=2, "
            f"factory='trip_factories:hang_on_rank_1', workdir={str(factories / 'w')!r}, timeout=600)")
    launcher = subprocess.Popen([sys.executable, "-c", code])
    try:
        while not (factories / "rank1_hangs").exists():  # waits for an event, bounded by the check below
            assert launcher.poll() is None, "the launcher ended before rank 1 hung"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        launcher.kill()
        launcher.wait()
    assert leftovers() == []


def test_pytest_items(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", str(GOOD / "tied"), "--ckpt-roundtrip", "2", "-k", "roundtrip", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*::test_fsdp_roundtrip?world_size=2? PASSED*"])


def test_optimizer_trip_from_a_consolidated_file(tmp_path: Path) -> None:
    """ckptcheck's converter carries lingua's optim section into the DCP the ranks load."""
    result = roundtrip(GOOD / "lingua_consolidated", config=None, world_size=2, optimizer=True, workdir=tmp_path)
    assert result.ok, result.lines()
    assert result.converted and result.trips[0].ranks[0]["compared_tensors"] == 21 * 4


def test_sigkill_of_the_launcher_ends_its_ranks_and_the_next_trip_removes_its_folders(
        factories: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL runs no cleanup in the launcher: its ranks and torchrun end themselves, and the next
    round trip in the same temporary folder removes the dead one's folders (converted DCP included)."""
    tmp = factories / "tmp"
    tmp.mkdir()
    cli = Path(sys.executable).parent / "ckptcheck"
    launcher = subprocess.Popen([cli, "roundtrip", GOOD / "consolidated.pth", "--model-config", LINGUA,
                                 "--world-size", "2", "--model-factory", "trip_factories:hang_on_rank_1"],
                                env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True)
    try:
        ready_by = time.monotonic() + 300  # a generous bound: only a broken launcher takes this long
        while not (factories / "rank1_hangs").exists():
            assert launcher.poll() is None, "the launcher ended before rank 1 hung"
            assert time.monotonic() < ready_by, "rank 1 did not start within 300 s"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGKILL)
        # the launcher stays unreaped (a zombie) meanwhile: the ranks must take that for gone too
        deadline = time.monotonic() + 120
        while leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leftovers() == []
    finally:
        launcher.kill()
        launcher.wait()
    dead = sorted(tmp.iterdir())
    assert any(p.name.startswith("ckptcheck-roundtrip-") for p in dead), dead
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    result = roundtrip(GOOD / "consolidated.pth", config=LINGUA, world_size=1)
    assert result.ok, result.lines()
    assert sorted(tmp.iterdir()) == []  # the dead run's folders, torchelastic's included, and this run's


def _with_unknown_optimizer_entry(tmp_path: Path) -> Path:
    """lingua's consolidated checkpoint whose optimizer state holds an object weights_only refuses."""
    import argparse

    import torch

    state = torch.load(GOOD / "lingua_consolidated" / "consolidated.pth", weights_only=True)
    state["optim"]["param_groups"][0]["args"] = argparse.Namespace(lr=1.0)
    folder = tmp_path / "src"
    folder.mkdir()
    torch.save(state, folder / "consolidated.pth")
    shutil.copy(GOOD / "lingua_consolidated" / "params.json", folder / "params.json")
    return folder


def test_an_unknown_optimizer_entry_is_left_behind_unless_the_trip_loads_the_optimizer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ranks load model tensors only, so the training state is not converted; with --optimizer the
    refusal names what the user can do with roundtrip (it has no --weights-only)."""
    from ckptcheck.cli import main

    src = _with_unknown_optimizer_entry(tmp_path)
    result = roundtrip(src, config=None, world_size=1, workdir=tmp_path / "w")
    assert result.ok, result.lines()
    assert main(["roundtrip", str(src), "--world-size", "1", "--optimizer"]) == 2
    err = capsys.readouterr().err
    assert "argparse.Namespace" in err and "without --optimizer" in err and "--weights-only" not in err, err


def test_head_dim_confirms_the_split_a_round_trip_permutes_with(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """HF names under an outside config: converting for the ranks permutes q/k on a split nothing in the
    checkpoint confirms, so the trip refuses (one line naming --head-dim) until the user confirms it."""
    from ckptcheck.cli import main

    src = tmp_path / "model.safetensors"
    shutil.copy(GOOD / "hf" / "model.safetensors", src)
    args = ["roundtrip", str(src), "--model-config", str(CONFIGS / "hf_config.json"), "--world-size", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --head-dim 8" in err[0], err
    assert main([*args, "--head-dim", "8"]) == 0
    assert "ok    world size 1: 21 shards compared bit for bit" in capsys.readouterr().out
