"""``ckptcheck check`` and ``inspect`` as a shell runs them: output, JSON document, exit codes 0/1/2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ckptcheck.cli import main

from .writers import CONFIGS, FIXTURES

GOOD = str(FIXTURES / "good" / "consolidated.pth")
DAMAGED = str(FIXTURES / "broken" / "damaged.pth")
LINGUA = str(CONFIGS / "lingua_params.json")
CHECK_FIELDS = {"id", "category", "key", "status", "expected", "obtained", "message", "why", "repair"}


def test_check_good_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", GOOD, "--model-config", LINGUA]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("PASS: 96 checks, 92 passed, 0 failed, 4 skipped")
    assert "torch, meta naming, 21 tensors" in out


def test_check_broken_exits_1_and_names_each_failure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", DAMAGED, "--model-config", LINGUA]) == 1
    out = capsys.readouterr().out
    for line in ("FAIL   key_present[layers.0.feed_forward.w3.weight]", "FAIL   dtype[norm.weight]",
                 "FAIL   finite[layers.1.attention.wk.weight]", "expected: bfloat16", "obtained: float32"):
        assert line in out
    assert out.rstrip().endswith("FAIL: 96 checks, 86 passed, 3 failed, 7 skipped")


def test_json_document_follows_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", DAMAGED, "--model-config", LINGUA, "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"schema_version", "ckptcheck_version", "checkpoint", "config", "checks", "summary"}
    assert doc["checkpoint"]["format"] == "torch" and doc["checkpoint"]["naming"] == "meta"
    assert doc["config"]["schema"] == "lingua" and doc["config"]["dim"] == 32
    assert all(set(c) == CHECK_FIELDS for c in doc["checks"])
    assert {c["status"] for c in doc["checks"]} == {"pass", "fail", "skip"}
    failed = {c["id"]: c for c in doc["checks"] if c["status"] == "fail"}
    assert set(failed) == {"key_present[layers.0.feed_forward.w3.weight]", "dtype[norm.weight]",
                           "finite[layers.1.attention.wk.weight]"}
    assert failed["dtype[norm.weight]"]["expected"] == "bfloat16"
    assert all(c["repair"] for c in failed.values())
    assert doc["summary"]["verdict"] == "fail" and doc["summary"]["fail"] == 3
    assert doc["summary"]["by_category"]["finite"] == {"pass": 19, "fail": 1, "skip": 1}


def test_config_found_beside_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(FIXTURES / "good" / "dcp")]) == 0
    assert "using the config found beside the checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["check", "/nonexistent/model.pth", "--model-config", LINGUA], "/nonexistent/model.pth: no such file or folder"),
    (["check", GOOD, "--model-config", "/nonexistent/params.json"], "/nonexistent/params.json: no such file"),
    (["check", GOOD], "no model config"),
    (["check", GOOD, "--model-config", LINGUA, "--dtype", "int3"], "invalid choice"),
    (["check", GOOD, "--model-config", LINGUA, "--model-factory", "nomodule"], "expected module:function"),
    (["inspect", str(CONFIGS / "lingua_params.json")], "not a checkpoint"),
    (["check", GOOD, "--model-config", LINGUA, "--target", "bogus"], "unknown target 'bogus'; known: hf, init, lingua_init"),
])
def test_bad_input_exits_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) if "--dtype" in args else _nullcontext():
        code = main(args)
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_exit_2_from_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(Path(GOOD).read_bytes()[:5000])
    proc = subprocess.run([sys.executable, "-m", "ckptcheck.cli", "check", str(bad), "--model-config", LINGUA],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"ckptcheck: error: {bad}: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_inspect_prints_table_and_inferred_params(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(FIXTURES / "good" / "hf")]) == 0
    out = capsys.readouterr().out
    assert "naming      hf (Hugging Face transformers)" in out
    assert "model.layers.0.self_attn.q_proj.weight" in out
    assert "total       21 tensors" in out


def test_inspect_params_reproduce_the_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["inspect", GOOD, "--params", "lingua", "--n-heads", "4", "--n-kv-heads", "2"]) == 0
    params = tmp_path / "params.json"
    params.write_text(capsys.readouterr().out)
    assert main(["check", GOOD, "--model-config", str(params), "--metadata-only"]) == 0


def test_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(FIXTURES / "good" / "lingua_consolidated"), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nesting"] == "model" and doc["sections"] == ["optim"]
    assert doc["tensor_count"] == 21 and doc["tensors"][0]["dtype"] == "float32"
