"""Repair: each broken fixture becomes a checkpoint that passes, or is refused with the reason."""

from __future__ import annotations

import json
import re
import shlex
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
    args = ["repair", str(FIXTURES / src), str(dst), "--model-config", LINGUA, "--format", "json", "--head-dim", "8"]
    code = main([*args, *(["--to", to] if to else [])])
    out = json.loads(capsys.readouterr().out)
    if src == "broken/extra_layer.pth":  # another architecture: refused, nothing written
        assert code == 1 and not out["repaired"] and not dst.exists()
        # refused as another model, or (when the config checks leave n_layers undecided) for its stray tensors
        assert any("different models" in r or "does not have" in r for r in out["refusals"]), out["refusals"]
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
    passed, total, unverifiable = re.search(r"re-checked .*: (\d+) of (\d+) checks pass(?:, (\d+) not verifiable)?",
                                            out).groups()
    assert int(passed) + int(unverifiable or 0) == int(total) and "FAIL" not in out, out


def test_unrepairable_input_is_refused_with_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(FIXTURES / "broken" / "damaged.pth"), str(dst), "--model-config", LINGUA]) == 1
    out = capsys.readouterr().out
    assert "cannot repair: tensors are missing" in out and "cannot repair: weights hold NaN" in out
    assert "nothing written" in out and not dst.exists()


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(FIXTURES / "broken" / "hf_names.pth"), str(dst), "--model-config", LINGUA,
                 "--dry-run", "--head-dim", "8"]) == 0
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


TIED = str(CONFIGS / "lingua_tied_params.json")


def test_a_bit_identical_tied_copy_is_dropped_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(FIXTURES / "broken" / "untied.pth"), str(dst), "--model-config", TIED]) == 0
    out = capsys.readouterr().out
    assert "drop output.weight: bit-identical to tok_embeddings.weight" in out
    assert "dropped output.weight: bit-identical to tok_embeddings.weight" in out
    assert "output.weight" not in torch_keys(dst)


def torch_keys(path: Path) -> set[str]:
    import torch

    return set(torch.load(path, weights_only=True))


def _save_with(tmp_path: Path, **changes) -> Path:
    import torch

    state = torch.load(FIXTURES / "broken" / "untied.pth", weights_only=True)
    for key, value in changes.items():
        state[key.replace("__", ".")] = value(state) if callable(value) else value
    path = tmp_path / "in.pth"
    torch.save(state, path)
    return path


def test_a_trained_output_is_never_dropped_to_fit_a_tied_config(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The config ties embeddings but output.weight holds its own values: refused, nothing written;
    named with --drop, it is dropped and listed."""
    src = _save_with(tmp_path, output__weight=lambda s: s["output.weight"] + 1)
    dst = tmp_path / "out.pth"
    assert main(["repair", str(src), str(dst), "--model-config", TIED]) == 1
    out = capsys.readouterr().out
    assert "whose values differ from tok_embeddings.weight" in out and "would lose trained values" in out
    assert "nothing written" in out and not dst.exists()
    results = run(plan(src, TIED, Options()))
    (extra,) = [r for r in results if r.category == "unexpected_key"]
    assert "refuses to drop output.weight" in extra.repair
    assert main(["repair", str(src), str(dst), "--model-config", TIED, "--drop", "output.weight"]) == 0
    assert "dropped output.weight: named with --drop" in capsys.readouterr().out
    assert "output.weight" not in torch_keys(dst)


def test_an_unknown_tensor_is_kept_unless_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    state["layers.0.attention.adapter.weight"] = torch.ones(4, 4)
    torch.save(state, tmp_path / "in.pth")
    dst = tmp_path / "out.pth"
    args = ["repair", str(tmp_path / "in.pth"), str(dst), "--model-config", LINGUA]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "drops only when named: layers.0.attention.adapter.weight" in out and not dst.exists()
    results = run(plan(tmp_path / "in.pth", LINGUA, Options()))
    (extra,) = [r for r in results if r.status.value == "fail"]
    command = shlex.split(extra.repair.split("  (")[0])  # the command the failure names works as printed
    assert command[-2:] == ["--drop", "layers.0.attention.adapter.weight"]
    assert main(command[1:]) == 0
    assert "dropped layers.0.attention.adapter.weight: named with --drop" in capsys.readouterr().out
    assert main([*args, "--drop", "no.such.key", "--force"]) == 2
    assert "'no.such.key' is not a tensor of this checkpoint" in capsys.readouterr().err


def test_a_trained_lm_head_under_another_name_is_not_advised_away(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Meta names with torchtitan's lm_head.weight: output.weight is missing, but the advice is not
    'tie the embeddings' (that would throw lm_head's trained values away), and repair refuses."""
    import torch

    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    state["lm_head.weight"] = state.pop("output.weight")
    torch.save(state, tmp_path / "in.pth")
    results = run(plan(tmp_path / "in.pth", LINGUA, Options()))
    (missing,) = [r for r in results if r.status.value == "fail" and r.category == "key_present"]
    assert "lm_head.weight, shaped like the output projection" in missing.message
    assert "weight_tying" not in missing.repair and "rename lm_head.weight" in missing.repair
    dst = tmp_path / "out.pth"
    assert main(["repair", str(tmp_path / "in.pth"), str(dst), "--model-config", LINGUA]) == 1
    assert "drops only when named: lm_head.weight" in capsys.readouterr().out and not dst.exists()


def test_rotary_buffers_are_dropped_as_redundant_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)  # head_dim 8, the config's theta
    state |= {"rope.freqs": freqs, "rope.inv_freq": freqs.clone()}
    torch.save(state, tmp_path / "in.pth")
    dst = tmp_path / "out.pth"
    assert main(["repair", str(tmp_path / "in.pth"), str(dst), "--model-config", LINGUA]) == 0
    out = capsys.readouterr().out
    assert "dropped rope.freqs: buffer" in out and "dropped rope.inv_freq: buffer" in out
    assert not {"rope.freqs", "rope.inv_freq"} & torch_keys(dst)
