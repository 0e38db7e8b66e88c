"""The exit status is the verdict whatever happens to the output streams: a reader that leaves early
(``ckptcheck check BAD | true``) or a stream closed at start (``>&-``) never turns a failure into success.

Real processes, the installed console script: the read end of the pipe is closed before the child writes
anything, so every write it makes meets a pipe without a reader (EPIPE), deterministically.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .writers import CONFIGS, FIXTURES

CKPTCHECK = str(Path(sys.executable).parent / "ckptcheck")
GOOD = str(FIXTURES / "good" / "consolidated.pth")
DAMAGED = str(FIXTURES / "broken" / "damaged.pth")
LINGUA = str(CONFIGS / "lingua_params.json")


@pytest.mark.parametrize(("args", "status"), [
    (["check", DAMAGED, "--model-config", LINGUA, "-v"], 1),
    (["check", DAMAGED, "--model-config", LINGUA, "--format", "json"], 1),
    (["check", GOOD, "--model-config", LINGUA, "-v"], 0),
    (["diff", GOOD, DAMAGED, "--model-config", LINGUA], 1),
    (["inspect", GOOD], 0),
])
def test_reader_gone_keeps_the_verdict(args: list[str], status: int, tmp_path: Path) -> None:
    proc = subprocess.Popen([CKPTCHECK, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.wait(timeout=300) == status, err
    assert "Traceback" not in err and "Exception ignored" not in err and "internal error" not in err


def test_stderr_reader_gone_keeps_exit_2(tmp_path: Path) -> None:
    proc = subprocess.Popen([CKPTCHECK, "check", str(tmp_path / "missing.pth"), "--model-config", LINGUA],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stderr.close()  # type: ignore[union-attr]
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert proc.wait(timeout=300) == 2
    assert out == ""  # the error line went nowhere, not to stdout


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
def test_streams_closed_at_start_keep_the_verdict(closed: str, tmp_path: Path) -> None:
    proc = subprocess.run(["bash", "-c", f'"$@" {closed}', "_", CKPTCHECK, "check", DAMAGED, "--model-config", LINGUA],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
