"""The compatibility matrix: framework targets are data, each row's repair produces what that target loads."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from ckptcheck.cli import main
from ckptcheck.engine import Options
from ckptcheck.matrix import compatibility_matrix, framework_targets

from .writers import CONFIGS, FIXTURES

LINGUA = str(CONFIGS / "lingua_params.json")


def test_targets_are_the_suite_files() -> None:
    assert framework_targets() == ["hf", "lingua_init", "lingua_resume", "meta", "torchtitan"]


def test_matrix_of_a_consolidated_file() -> None:
    rows = {r.target: r for r in compatibility_matrix(FIXTURES / "good" / "consolidated.pth", LINGUA, Options())}
    assert rows["meta"].ok
    assert rows["lingua_init"].cells["layout"] == "fail" and rows["lingua_init"].cells["naming"] == "pass"
    assert rows["hf"].cells["naming"] == "fail" and "--to hf" in rows["hf"].repair
    assert rows["lingua_resume"].cells["resume"] == "fail"


@pytest.mark.parametrize("target", ["lingua_init", "hf", "torchtitan", "meta"])
def test_each_row_repair_produces_what_the_target_loads(target: str, tmp_path: Path) -> None:
    src = FIXTURES / "good" / ("hf" if target == "meta" else "consolidated.pth")
    rows = {r.target: r for r in compatibility_matrix(src, LINGUA, Options())}
    command = shlex.split(rows[target].repair)
    assert command[:2] == ["ckptcheck", "repair"]
    command[3] = str(tmp_path / Path(command[3]).name)  # write under tmp instead of beside the fixture
    assert main(command[1:]) == 0
    assert {r.target: r for r in compatibility_matrix(command[3], LINGUA, Options())}[target].ok


def test_matrix_in_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(FIXTURES / "good" / "dcp"), "--matrix", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["matrix"]["lingua_resume"]["ok"] and not doc["matrix"]["hf"]["ok"]
    assert main(["check", str(FIXTURES / "good" / "dcp"), "--matrix"]) == 0
    assert "compatibility matrix" in capsys.readouterr().out
