"""The pytest door, driven through pytester as a user runs it: items, ids, failures, exit codes, xdist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .writers import CONFIGS, FIXTURES

GOOD = str(FIXTURES / "good" / "consolidated.pth")
DAMAGED = str(FIXTURES / "broken" / "damaged.pth")
LINGUA = str(CONFIGS / "lingua_params.json")


def test_good_checkpoint_passes_every_item(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", GOOD, "--model-config", LINGUA, "-v")
    result.assert_outcomes(passed=92, skipped=4)  # n_heads, n_kv_heads, norm_eps, rope_theta: no witness
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "*consolidated.pth::test_naming?meta? PASSED*",
        "*::test_config?n_kv_heads? SKIPPED*",
        "*consolidated.pth::test_key_present?layers.0.attention.wq.weight? PASSED*",
        "*consolidated.pth::test_shape?tok_embeddings.weight? PASSED*",
        "*::test_finite?norm.weight? PASSED*",
    ])


def test_broken_checkpoint_fails_with_readable_assertions(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", DAMAGED, "--model-config", LINGUA)
    assert result.ret == 1
    result.assert_outcomes(passed=86, failed=3, skipped=7)
    result.stdout.fnmatch_lines([
        "*test_key_present?layers.0.feed_forward.w3.weight?*",
        "layers.0.feed_forward.w3.weight is missing",
        "expected: present",
        "obtained: missing",
        "why: *missing tensor*",
        "repair: *",
    ])
    result.stdout.fnmatch_lines(["norm.weight is float32; the checkpoint's dominant dtype is bfloat16*"])
    result.stdout.fnmatch_lines(["layers.1.attention.wk.weight holds 1 NaN and 0 Inf values*"])
    assert "Traceback" not in result.stdout.str()


def test_dash_k_selects_by_key(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", GOOD, "--model-config", LINGUA, "-k", "wq and shape", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_shape?layers.0.attention.wq.weight? PASSED*"])


def test_metadata_only_skips_value_checks(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", DAMAGED, "--model-config", LINGUA, "--ckpt-metadata-only")
    result.assert_outcomes(passed=66, failed=2, skipped=28)


def test_resume_target_and_dtype_option(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", GOOD, "--model-config", LINGUA, "--ckpt-target", "resume",
                                "--ckpt-dtype", "bf16", "-k", "resume or dtype")
    result.assert_outcomes(passed=21, failed=1)
    result.stdout.fnmatch_lines(["*no optimizer state*", "*init_ckpt_path*"])


def test_unreadable_checkpoint_fails_collection_with_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    result = pytester.runpytest("--ckpt", str(bad), "--model-config", LINGUA)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"ckptcheck: {bad}: not a checkpoint: the file is a PNG image"])
    assert "Traceback" not in result.stdout.str()


def test_invalid_config_fails_collection_with_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    cfg = tmp_path / "params.json"
    cfg.write_text('{"model": {"dim": 32, "n_layers": 2, "n_heads": 5}}')
    result = pytester.runpytest("--ckpt", GOOD, "--model-config", str(cfg))
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"ckptcheck: {cfg}: field model.n_heads: 5 does not divide dim=32*"])


def test_under_xdist(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", DAMAGED, "--model-config", LINGUA, "-n", "2")
    assert result.ret == 1
    result.assert_outcomes(passed=86, failed=3, skipped=7)


def test_explicit_test_paths_still_collected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mine="def test_mine():\n    assert True\n")
    result = pytester.runpytest("--ckpt", GOOD, "--model-config", LINGUA, "test_mine.py", "-k", "mine or naming")
    result.assert_outcomes(passed=2)
    implicit = pytester.runpytest("--ckpt", GOOD, "--model-config", LINGUA, "-k", "mine or naming")
    implicit.assert_outcomes(passed=1)  # without paths, --ckpt is the whole run


def test_plain_pytest_is_untouched_and_imports_no_torch(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="import sys\n\ndef test_plain():\n    assert 'torch' not in sys.modules\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_installed_plugin_works_from_any_directory(tmp_path: Path) -> None:
    """The pytest11 entry point: a fresh interpreter in an unrelated folder finds the options."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--ckpt", GOOD, "--model-config", LINGUA,
         "-k", "naming"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
