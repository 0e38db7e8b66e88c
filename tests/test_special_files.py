"""A path that is no regular file (a FIFO, a device) is refused with one line, never read: old code
blocked forever opening a FIFO with no writer, or read /dev/zero without end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptcheck.cli import main

from .writers import FIXTURES

# A guard so that a regression fails instead of hanging the suite; a pass takes well under a second.
HANG_GUARD_S = 120


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _dcp_with(tmp: Path, name: str, make) -> Path:
    folder = tmp / "dcp"
    shutil.copytree(FIXTURES / "good" / "dcp", folder)
    (folder / name).unlink()
    make(folder / name)
    return folder


def _none(path: Path) -> list[str]:
    return []


CASES = {  # name: (build, text of the one line, more arguments for the path)
    "fifo_file": (lambda t: _fifo(t / "m.pth"), "is a FIFO", _none),
    "dev_zero": (lambda t: _link_zero(t / "z.pth"), "is a character device", _none),
    "dcp_metadata_fifo": (lambda t: _dcp_with(t, ".metadata", _fifo), "is a FIFO", _none),
    "index_json_fifo": (lambda t: _fifo(t / "model.safetensors.index.json"), "is a FIFO", _none),
    "config_fifo": (lambda t: _dcp_with(t, "params.json", _fifo), "is a FIFO",
                    lambda p: ["--model-config", str(p / "params.json")]),
    "train_state_fifo": (lambda t: _dcp_with(t, "train_state_00000.json", _fifo), "is a FIFO",
                         lambda p: ["--target", "lingua_resume"]),
}


def _link_zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize("case", CASES)
def test_special_file_is_refused_by_the_cli_process(tmp_path: Path, case: str) -> None:
    build, expect, args = CASES[case]
    path = build(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ckptcheck", "check", str(path), *args(path)], capture_output=True,
                          text=True,
                          timeout=HANG_GUARD_S, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in proc.stderr


def test_python_dash_m_runs_the_cli(tmp_path: Path, capsys) -> None:
    good = str(FIXTURES / "good" / "consolidated.pth")
    proc = subprocess.run([sys.executable, "-m", "ckptcheck", "inspect", good], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=tmp_path)
    assert proc.returncode == main(["inspect", good]) == 0
    assert proc.stdout == capsys.readouterr().out
