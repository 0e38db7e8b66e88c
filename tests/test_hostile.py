"""The hostile-input corpus: every case gets its exact outcome, and nothing in it ever runs.

Unsafe input (a pickle naming code, a path leaving its folder) is reported as unsafe, exit 1; damaged
input gets one line naming the file, the item and the cause, exit 2 - never a traceback.  Each case is
watched by a sentinel file its payload would create and by an audit hook recording process spawns and
eval/exec of strings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ckptcheck.cli import main

from .hostile import bad_configs, cases
from .test_safe_pickle import _AUDIT

CASES = cases()


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 35
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "PWNED"
    work = tmp_path / "work"
    work.mkdir()
    path = case.build(work, sentinel)
    config = bad_configs(tmp_path).get(str(case.config), case.config)
    main(["check", str(Path(__file__).parent.parent / "fixtures" / "good" / "consolidated.pth"),
          "--model-config", str(Path(__file__).parent.parent / "fixtures" / "configs" / "lingua_params.json"),
          "--metadata-only"])  # imports everything first: module imports are not payloads
    capsys.readouterr()
    _AUDIT.events.clear()
    with _AUDIT:
        code = main(["check", str(path), "--model-config", str(config), *case.args])
    out, err = capsys.readouterr()
    assert not sentinel.exists(), "a payload ran"
    assert not _AUDIT.events, f"code ran: {_AUDIT.events}"
    assert code == case.exit_code, (out, err)
    if case.exit_code == 2:
        assert err.count("\n") == 1 and err.startswith("ckptcheck: error: ") and "Traceback" not in err
        assert case.expect in err, err
    else:
        assert "UNSAFE" in out and case.expect in out, out


@pytest.mark.parametrize("name", ["reduce_os_system", "bad_crc_storage", "dcp_chunks_do_not_cover", "bare_pickle_protocol_0",
                                  "bytearray_2gb_in_a_70kb_pth", "dcp_version_not_numeric"])
def test_in_a_real_process_without_traceback(name: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == name)
    path = case.build(tmp_path, tmp_path / "PWNED")
    proc = subprocess.run([sys.executable, "-m", "ckptcheck.cli", "check", str(path), "--model-config",
                           str(case.config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == case.exit_code
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "PWNED").exists()


def test_unsafe_input_fails_the_pytest_item(pytester: pytest.Pytester, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "dcp_bytes_entry_payload")
    path = case.build(tmp_path, tmp_path / "PWNED")
    result = pytester.runpytest("--ckpt", str(path), "--model-config", str(case.config))
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*test_safety*", "UNSAFE: *posix.system*"])
    assert not (tmp_path / "PWNED").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "ckptcheck.cli", "check", str(bad), "--model-config",
                           str(next(iter(CASES)).config), "--debug"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
