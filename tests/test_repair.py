"""Repair: each broken fixture becomes a checkpoint that passes, or is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptcheck.cli import main
from ckptcheck.engine import Options, plan, run

from .writers import CONFIGS, FIXTURES

LINGUA = str(CONFIGS / "lingua_params.json")


@pytest.mark.parametrize(("src", "to", "steps"), [
    ("broken/hf_names.pth", None, ["rename keys from Hugging Face transformers"]),
    ("broken/ddp_prefix.pth", "dcp", ["strip wrapper prefixes 'module.'", "nest the model tensors under 'model'"]),
    ("broken/extra_layer.pth", None, None),
    ("good/meta_mp", None, ["merge 2 model-parallel shards"]),
    ("good/hf", "torch", ["rename keys", "permute wq/wk"]),
])
def test_repair_produces_a_passing_checkpoint(src: str, to: str | None, steps, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / ("out" if to in ("dcp", "hf") else "out.pth")
    args = ["repair", str(FIXTURES / src), str(dst), "--model-config", LINGUA, "--format", "json"]
    code = main([*args, *(["--to", to] if to else [])])
    out = json.loads(capsys.readouterr().out)
    if src == "broken/extra_layer.pth":  # another architecture: refused, nothing written
        assert code == 1 and not out["repaired"] and not dst.exists()
        assert any("different models" in r for r in out["refusals"])
        return
    assert code == 0, out
    assert out["repaired"] and out["failed_after"] == []
    text = " ".join(out["steps"])
    assert all(s in text for s in steps)
    results = run(plan(dst, LINGUA, Options()))
    assert all(r.status.value in ("pass", "skip") for r in results)


def test_dtype_is_cast_to_the_expected_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    state["norm.weight"] = state["norm.weight"].float()
    torch.save(state, tmp_path / "mixed.pth")
    assert main(["repair", str(tmp_path / "mixed.pth"), str(tmp_path / "fixed.pth"), "--model-config", LINGUA]) == 0
    out = capsys.readouterr().out
    assert "cast 1 tensors to bfloat16 (the checkpoint's dominant dtype)" in out
    assert "93 of 93 checks pass" in out


def test_unrepairable_input_is_refused_with_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(FIXTURES / "broken" / "damaged.pth"), str(dst), "--model-config", LINGUA]) == 1
    out = capsys.readouterr().out
    assert "cannot repair: tensors are missing" in out and "cannot repair: weights hold NaN" in out
    assert "nothing written" in out and not dst.exists()


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(FIXTURES / "broken" / "hf_names.pth"), str(dst), "--model-config", LINGUA,
                 "--dry-run"]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out and not dst.exists()


def test_failure_messages_name_a_repair_command_that_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command printed by a failing check, run as printed (with DST moved to tmp), repairs it."""
    import shlex

    src = tmp_path / "prefixed.pth"
    src.write_bytes((FIXTURES / "broken" / "ddp_prefix.pth").read_bytes())
    results = run(plan(src, LINGUA, Options()))
    (failed,) = [r for r in results if r.status.value == "fail"]
    command = shlex.split(failed.repair.split("  (")[0])
    assert command[:2] == ["ckptcheck", "repair"] and command[2] == str(src)
    assert main(command[1:]) == 0
    assert Path(command[3]).is_file()


def test_the_recheck_judges_the_output_with_the_config_written_beside_it(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Hugging Face names written to DCP get a config.json (not a params.json that loads Meta names),
    and the re-check reads the output with the config found beside it, as any later check will."""
    dst = tmp_path / "out"
    assert main(["repair", str(FIXTURES / "good" / "hf"), str(dst), "--to", "dcp", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conversion"]["config_written"] == str(dst / "config.json") and out["failed_after"] == []
    assert not (dst / "params.json").exists()
    assert main(["check", str(dst)]) == 0
