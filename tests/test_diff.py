"""diff: key by key across formats and namings; --forward catches a q/k permutation that shapes cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main
from ckptcheck.diff import diff
from ckptcheck.naming import HF

from .writers import CONFIGS, FIXTURES

GOOD = FIXTURES / "good"
LINGUA = CONFIGS / "lingua_params.json"


@pytest.mark.parametrize("other", ["model.safetensors", "meta_mp", "dcp", "hf", "hf_sharded", "lingua_consolidated"])
def test_same_model_in_every_format_is_equal(other: str, capsys: pytest.CaptureFixture[str]) -> None:
    # the lingua fixtures hold fp32 copies of the bf16 weights: equal within bf16's precision only
    tol = ["--atol", "1e-2"] if other in ("lingua_consolidated", "dcp") else []
    assert main(["diff", str(GOOD / "consolidated.pth"), str(GOOD / other), "--model-config", str(LINGUA), *tol]) == 0
    assert capsys.readouterr().out.rstrip().endswith("EQUAL")


def test_differences_are_located(capsys: pytest.CaptureFixture[str]) -> None:
    report = diff(GOOD / "consolidated.pth", FIXTURES / "broken" / "damaged.pth")
    by_key = {k.key: k for k in report.keys if k.status != "equal"}
    assert by_key["layers.0.feed_forward.w3.weight"].status == "missing_in_b"
    assert by_key["norm.weight"].status == "dtype"
    assert by_key["layers.1.attention.wk.weight"].first_index == [3, 5]
    assert main(["diff", str(GOOD / "consolidated.pth"), str(FIXTURES / "broken" / "damaged.pth")]) == 1


def test_tolerance(tmp_path: Path) -> None:
    a = {"w": torch.ones(4, 4)}
    b = {"w": torch.ones(4, 4) + 1e-6}
    torch.save(a, tmp_path / "a.pth")
    torch.save(b, tmp_path / "b.pth")
    assert not diff(tmp_path / "a.pth", tmp_path / "b.pth").equal
    assert diff(tmp_path / "a.pth", tmp_path / "b.pth", atol=1e-5).equal


def test_forward_catches_a_missing_permutation(tiny_cfg, tiny_state, tmp_path: Path) -> None:
    """HF names on Meta-layout q/k: every shape right, every check green, the logits wrong."""
    wrong = {HF.from_canonical(k): v for k, v in tiny_state.items()}  # renamed, never permuted
    torch.save(wrong, tmp_path / "wrong.pth")
    report = diff(GOOD / "consolidated.pth", tmp_path / "wrong.pth", config=LINGUA, forward=True)
    # Key by key, B is compared in A's layout, so the un-permuted q/k differ ...
    assert {k.key for k in report.keys if k.status != "equal"} == {
        f"layers.{i}.attention.{w}.weight" for i in range(2) for w in ("wq", "wk")}
    # ... and the forward pass shows it changes what the model computes.
    assert report.forward is not None and not report.forward.equal
    right = diff(GOOD / "consolidated.pth", GOOD / "hf", config=LINGUA, forward=True)
    assert right.equal and right.forward.max_abs <= right.forward.tolerance


def test_layouts_differ_without_a_config_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    shutil.copy(GOOD / "consolidated.pth", tmp_path / "a.pth")  # no params.json beside it
    (tmp_path / "hf").mkdir()
    shutil.copy(GOOD / "hf" / "model.safetensors", tmp_path / "hf" / "model.safetensors")
    assert main(["diff", str(tmp_path / "a.pth"), str(tmp_path / "hf")]) == 2
    assert "pass --model-config" in capsys.readouterr().err


def test_nan_payload_bits_differ_by_no_amount(tmp_path: Path) -> None:
    """Two NaNs with different payload bits differ bitwise (different) but by nothing, never 'inf'."""
    a = torch.zeros(4, 4)
    b = a.clone()
    a.view(torch.int32)[1, 1] = 0x7FC00001
    b.view(torch.int32)[1, 1] = 0x7FC00002
    torch.save({"w": a}, tmp_path / "a.pth")
    torch.save({"w": b}, tmp_path / "b.pth")
    (key,) = diff(tmp_path / "a.pth", tmp_path / "b.pth").keys
    assert key.status == "different" and key.max_abs == 0
    assert "only NaN payload bits differ at first index [1, 1]" in key.detail
