"""Meta model-parallel shards whose replicated tensors differ: one merged tensor would keep one copy
silently, so the check fails naming the key and the shards, and no conversion writes anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main

from .writers import FIXTURES

MP = FIXTURES / "good" / "meta_mp"
KEY = "layers.1.ffn_norm.weight"


def _differing_copies(tmp_path: Path, index: int = 5) -> Path:
    """meta_mp with one element of a replicated norm changed in shard 1 only."""
    folder = Path(shutil.copytree(MP, tmp_path / "mp"))
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard[KEY][index] += 1
    torch.save(shard, folder / "consolidated.01.pth")
    return folder


def test_identical_copies_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(MP), "-v"]) == 0
    out = capsys.readouterr().out
    assert f"replicas[{KEY}]" in out and "norm.weight" in out


@pytest.mark.parametrize("index", [0, 31])
def test_differing_copies_fail_naming_key_and_shards(tmp_path: Path, index: int, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Compared in bounded steps (a few rows at a time here): a difference in the last step is found too."""
    monkeypatch.setattr("ckptcheck.formats.meta_shards.COMPARE_BYTES", 8)
    folder = _differing_copies(tmp_path, index)
    assert main(["check", str(folder), "--format", "json"]) == 1
    out = capsys.readouterr().out
    import json

    results = {r["id"]: r for r in json.loads(out)["checks"]}
    failed = [i for i, r in results.items() if r["status"] == "fail"]
    assert failed == [f"replicas[{KEY}]"], failed
    assert "consolidated.01.pth" in results[f"replicas[{KEY}]"]["message"]
    assert results[f"finite[{KEY}]"]["status"] == "skip"


def test_metadata_only_does_not_read_the_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(_differing_copies(tmp_path)), "--metadata-only"]) == 0


@pytest.mark.parametrize("command", [["convert", "{src}", "{dst}", "--to", "torch"], ["repair", "{src}", "{dst}"],
                                     ["convert", "{src}", "{dst}", "--to", "safetensors"]])
def test_converting_refuses_and_writes_nothing(tmp_path: Path, command: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = _differing_copies(tmp_path)
    dst = tmp_path / ("out.safetensors" if "safetensors" in command else "out.pth")
    if command[0] == "repair":  # the plan refuses before converting: a failed check, exit 1
        assert main([a.format(src=src, dst=dst) for a in command]) == 1
        out = capsys.readouterr().out
        assert f"replicas[{KEY}]" in out and "no conversion picks one" in out, out
    else:  # the reader refuses to merge: bad input, exit 2
        assert main([a.format(src=src, dst=dst) for a in command]) == 2
        err = capsys.readouterr().err
        assert KEY in err and "consolidated.01.pth" in err, err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mp"]


def test_diff_does_not_call_them_equal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(_differing_copies(tmp_path)), str(MP)]) == 2
    assert KEY in capsys.readouterr().err


@pytest.mark.parametrize("differ", [False, True])
def test_rope_freqs_copies_that_differ_fail_replicas_not_the_run(tmp_path: Path, differ: bool,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """rope.freqs witnesses rope_theta; copies that differ witness no one theta, so the config check skips
    saying why and the replicas check fails, instead of the run stopping with exit 2."""
    folder = Path(shutil.copytree(MP, tmp_path / "mp"))
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        shard = torch.load(folder / name, weights_only=True)
        shard["rope.freqs"] = freqs * 1.5 if differ and name.endswith("01.pth") else freqs.clone()
        torch.save(shard, folder / name)
    assert main(["check", str(folder), "--format", "json"]) == (1 if differ else 0)
    import json

    results = {r["id"]: r for r in json.loads(capsys.readouterr().out)["checks"]}
    failed = [i for i, r in results.items() if r["status"] == "fail"]
    assert failed == (["replicas[rope.freqs]"] if differ else []), failed
    theta = results["config[rope_theta]"]
    assert theta["status"] == ("skip" if differ else "pass"), theta
    assert ("consolidated.01.pth" in theta["message"]) is differ


def test_matrix_offers_no_repair_that_would_refuse(tmp_path: Path) -> None:
    from ckptcheck.engine import Options
    from ckptcheck.matrix import compatibility_matrix

    src = _differing_copies(tmp_path)
    rows = compatibility_matrix(src, None, Options())
    for row in rows:
        assert row.cells["replicas"] == "fail"
        assert row.repair is not None and not row.repair.startswith("ckptcheck repair"), row.repair
        assert "no conversion picks one" in row.repair
