"""Repairs and conversions never destroy data and say only what is true (issue 10, section 3)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main

from .writers import CONFIGS, FIXTURES

LINGUA = CONFIGS / "lingua_params.json"
GOOD = FIXTURES / "good"


def _wrong_heads(tmp_path: Path) -> Path:
    """The fixtures' model (4 heads of 8, 2 KV heads) described as 8 heads of 4: the same shapes."""
    params = json.loads(LINGUA.read_text())["model"] | {"n_heads": 8, "n_kv_heads": 4}
    path = tmp_path / "elsewhere" / "params.json"
    path.parent.mkdir()
    path.write_text(json.dumps(params))
    return path


# --- a head split nothing verifies -----------------------------------------------------------------

@pytest.mark.parametrize("command", ["convert", "repair"])
def test_a_permutation_on_an_unverified_head_split_is_refused(command: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "hf"
    args = [command, str(GOOD / "consolidated.pth"), str(dst), "--to", "hf", "--model-config",
            str(_wrong_heads(tmp_path))]
    if command == "repair":  # a repair writes HF names only for an HF config: give it the same wrong split
        cfg = json.loads((CONFIGS / "hf_config.json").read_text()) | {"num_attention_heads": 8,
                                                                      "num_key_value_heads": 4, "head_dim": 4}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        args[-1] = str(tmp_path / "config.json")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing in or beside the checkpoint confirms" in err[0] and "--head-dim 4" in err[0]
    assert not dst.exists() and not list(tmp_path.glob(".*"))


def test_a_repair_dry_run_names_the_unverified_head_split(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ["repair", str(FIXTURES / "broken" / "hf_names.pth"), str(tmp_path / "out.pth"), "--model-config",
            str(LINGUA), "--dry-run"]
    assert main(args) == 2
    assert "--head-dim 8" in capsys.readouterr().err
    assert main([*args, "--head-dim", "8"]) == 0


def test_a_head_dim_flag_that_contradicts_the_config_is_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "hf"
    assert main(["convert", str(GOOD / "consolidated.pth"), str(dst), "--to", "hf", "--model-config", str(LINGUA),
                 "--head-dim", "4"]) == 2
    assert "is not the config's head_dim 8" in capsys.readouterr().err and not dst.exists()


def test_a_confirmed_split_converts_and_skips_are_not_counted_as_passes(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "hf"
    assert main(["convert", str(GOOD / "consolidated.pth"), str(dst), "--to", "hf", "--model-config", str(LINGUA),
                 "--head-dim", "8"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "re-checked" in x)
    # the written config.json is the only witness of the split it states: those checks cannot pass
    assert "not verifiable" in line and "config[n_heads]" in line, line
    assert not line.split(": ", 1)[1].startswith(tuple(f"{n} of {n} " for n in range(200))), line


def test_a_repair_reports_what_it_could_not_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(FIXTURES / "broken" / "ddp_prefix.pth"), str(dst), "--model-config", str(LINGUA)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("re-checked"))
    passed, total, skipped = map(int, re.search(r"(\d+) of (\d+) checks pass, (\d+) not verifiable", line).groups())
    assert passed + skipped == total and "config[n_heads]" in line, line
    assert main(["repair", str(FIXTURES / "broken" / "ddp_prefix.pth"), str(dst), "--model-config", str(LINGUA),
                 "--force", "--format", "json"]) == 0
    assert "config[n_heads]" in json.loads(capsys.readouterr().out)["not_verifiable_after"]


def test_a_conversion_that_does_not_permute_needs_no_confirmation(tmp_path: Path) -> None:
    assert main(["convert", str(GOOD / "consolidated.pth"), str(tmp_path / "out_dcp"), "--to", "dcp",
                 "--model-config", str(_wrong_heads(tmp_path))]) == 0


# --- casts that change values ------------------------------------------------------------------------

def _with_norm(tmp_path: Path, value: float) -> Path:
    state = torch.load(GOOD / "consolidated.pth", weights_only=True)
    state["norm.weight"] = state["norm.weight"].float()
    state["norm.weight"][0] = value
    torch.save(state, tmp_path / "in.pth")
    return tmp_path / "in.pth"


@pytest.mark.parametrize(("value", "what"), [(1e6, "1e+06 overflows to Inf"), (1e-9, "1e-09 is flushed to zero")])
@pytest.mark.parametrize("to", ["torch", "dcp"])
def test_a_cast_that_overflows_or_flushes_is_refused(value: float, what: str, to: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = _with_norm(tmp_path, value)
    dst = tmp_path / ("out.pth" if to == "torch" else "out")
    assert main(["convert", str(src), str(dst), "--to", to, "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "norm.weight" in err[0] and what in err[0], err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]


def test_a_repair_cast_that_overflows_is_refused_and_not_advised(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The fixture is bf16; a float32 norm holding 3.4e38 (beyond bf16's largest, 3.39e38) must not become Inf."""
    src = _with_norm(tmp_path, 3.4e38)
    dst = tmp_path / "out.pth"
    assert main(["check", str(src), "--model-config", str(LINGUA)]) == 1
    out = capsys.readouterr().out
    assert "no cast can repair this" in out and "(casts to bfloat16)" not in out, out
    assert main(["repair", str(src), str(dst), "--model-config", str(LINGUA)]) == 1
    out = capsys.readouterr().out
    assert "cannot repair: " in out and "norm.weight: casting to bfloat16" in out and "overflows to Inf" in out
    assert "repair: cast" not in out and not dst.exists()


def test_a_cast_that_only_rounds_is_written(tmp_path: Path) -> None:
    src = _with_norm(tmp_path, 1.0 + 2**-20)
    assert main(["convert", str(src), str(tmp_path / "out.pth"), "--dtype", "bf16"]) == 0
    assert torch.load(tmp_path / "out.pth", weights_only=True)["norm.weight"][0] == 1.0


# --- training state is never dropped unasked -------------------------------------------------------

def test_a_lingua_step_folder_to_torch_refuses_to_lose_its_train_state(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["convert", str(GOOD / "dcp"), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_state_00000.json" in err[0] and "--weights-only" in err[0] and not dst.exists()
    assert main(["convert", str(GOOD / "dcp"), str(dst), "--weights-only"]) == 0
    out = capsys.readouterr().out
    assert "1 dropped" in out and "dropped optim, train_state_00000.json: training state (--weights-only)" in out
    written = torch.load(dst, weights_only=True)
    assert "optim" not in written and "model" not in written and "norm.weight" in written


def test_a_lingua_step_folder_to_dcp_carries_its_train_state(tmp_path: Path) -> None:
    assert main(["convert", str(GOOD / "dcp"), str(tmp_path / "out"), "--to", "dcp"]) == 0
    assert (tmp_path / "out" / "train_state_00000.json").read_bytes() == (GOOD / "dcp" / "train_state_00000.json").read_bytes()


def test_a_resume_repair_refuses_to_lose_its_train_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(GOOD / "dcp"), str(dst), "--target", "lingua_resume", "--to", "torch"]) == 2
    assert "train_state_00000.json" in capsys.readouterr().err and not dst.exists()


def test_a_resume_repair_to_safetensors_refuses_to_drop_the_optimizer(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = GOOD / "lingua_consolidated"
    dst = tmp_path / "out"
    args = ["repair", str(src / "consolidated.pth"), str(dst), "--model-config", str(src / "params.json"),
            "--target", "resume", "--to", "safetensors"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot hold the training state optim" in err and "--weights-only" in err and not dst.exists()
    assert main([*args, "--weights-only"]) == 1  # written without it, and the resume target then fails
    assert "leave the training state behind (optim; --weights-only)" in capsys.readouterr().out


# --- an output is what its name says ----------------------------------------------------------------

def test_repair_writes_the_format_the_destination_names(tmp_path: Path) -> None:
    from safetensors import safe_open

    dst = tmp_path / "x.safetensors"
    assert main(["repair", str(FIXTURES / "broken" / "ddp_prefix.pth"), str(dst), "--model-config", str(LINGUA)]) == 0
    with safe_open(str(dst), "pt") as f:  # the reference reader opens it: it is safetensors, not a torch zip
        assert "norm.weight" in set(f.keys())


@pytest.mark.parametrize("command", ["convert", "repair"])
def test_a_destination_named_for_another_format_is_refused(command: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "x.safetensors"
    assert main([command, str(FIXTURES / "broken" / "ddp_prefix.pth"), str(dst), "--to", "torch",
                 "--model-config", str(LINGUA)]) == 2
    assert "the name says safetensors (.safetensors) but the output is torch" in capsys.readouterr().err
    assert not dst.exists()


def test_check_fails_a_file_whose_name_contradicts_its_content(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    misnamed = tmp_path / "model.safetensors"
    misnamed.write_bytes((GOOD / "consolidated.pth").read_bytes())
    assert main(["check", str(misnamed), "--model-config", str(LINGUA)]) == 1
    assert "named .safetensors (safetensors) but holds a torch file" in capsys.readouterr().out


# --- a rotary buffer is dropped only when it is the one loaders recompute ---------------------------

def _with_freqs(tmp_path: Path, freqs: torch.Tensor) -> Path:
    state = torch.load(GOOD / "consolidated.pth", weights_only=True)
    state["rope.freqs"] = freqs
    torch.save(state, tmp_path / "in.pth")
    return tmp_path / "in.pth"


def _freqs(theta: float, head_dim: int = 8) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)


@pytest.mark.parametrize(("freqs", "why"), [
    (torch.randn(4, 4), "shape [4, 4], not [4] for head_dim 8"),
    (_freqs(500000.0), "its values are not those of rope_theta 10000.0"),
    (_freqs(10000.0, head_dim=4), "shape [2], not [4]"),
])
def test_a_rotary_buffer_the_config_does_not_give_is_not_dropped(freqs: torch.Tensor, why: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = _with_freqs(tmp_path, freqs)
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst), "--model-config", str(LINGUA)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rope.freqs" in err[0] and why in err[0], err
    assert not dst.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_buffer_the_config_gives_is_dropped(dtype: torch.dtype, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = _with_freqs(tmp_path, _freqs(10000.0).to(dtype))
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--model-config", str(LINGUA)]) == 0
    assert "dropped rope.freqs: buffer that loaders recompute" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "nocfg.safetensors")]) == 2  # nothing to compare it with
    assert "pass --model-config" in capsys.readouterr().err


# --- what a repair may drop ---------------------------------------------------------------------------

def test_drop_of_a_tensor_the_model_needs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(GOOD / "consolidated.pth"), str(dst), "--model-config", str(LINGUA),
                 "--drop", "layers.0.attention.wq.weight"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a tensor the configured model needs" in err[0] and not dst.exists()


def _tied(tmp_path: Path, copy: torch.Tensor | None = None) -> Path:
    state = torch.load(GOOD / "consolidated.pth", weights_only=True)
    state["output.weight"] = state["tok_embeddings.weight"].float() if copy is None else copy
    torch.save(state, tmp_path / "in.pth")
    return tmp_path / "in.pth"


def test_an_fp32_copy_with_exactly_the_embeddings_values_is_dropped(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    assert main(["repair", str(_tied(tmp_path)), str(dst), "--model-config",
                 str(CONFIGS / "lingua_tied_params.json")]) == 0
    out = capsys.readouterr().out
    assert ("dropped output.weight: holding exactly the values of tok_embeddings.weight (float32, each value "
            "exactly representable in bfloat16)") in out and "bit-identical" not in out
    assert "output.weight" not in torch.load(dst, weights_only=True)


def test_an_fp32_copy_with_values_bf16_cannot_hold_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(GOOD / "consolidated.pth", weights_only=True)
    copy = state["tok_embeddings.weight"].float()
    copy[0, 0] += copy[0, 0].abs() * 2**-12 + 2**-30  # rounds to the embedding's value in bf16, but is not it
    assert copy[0, 0].bfloat16() == state["tok_embeddings.weight"][0, 0]
    dst = tmp_path / "out.pth"
    assert main(["repair", str(_tied(tmp_path, copy)), str(dst), "--model-config",
                 str(CONFIGS / "lingua_tied_params.json")]) == 1
    assert "dropping it would lose trained values" in capsys.readouterr().out and not dst.exists()


def test_init_optimizer_state_says_what_it_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(GOOD / "dcp"), str(tmp_path / "out"), "--to", "dcp", "--init-optimizer-state"]) == 0
    out = capsys.readouterr().out
    assert "1 dropped" in out and "dropped train_state_00000.json: training state replaced by --init-optimizer-state" \
        in out, out


def test_the_advised_repair_states_the_head_size_it_assumes(tmp_path: Path) -> None:
    """The advice names --head-dim where the permutation needs it, so following it runs (and shows it)."""
    import shlex

    from ckptcheck.engine import Options, plan, run

    src = FIXTURES / "broken" / "hf_names.pth"
    the_plan = plan(src, str(LINGUA), Options())
    try:
        advice = next(r.repair for r in run(the_plan) if r.repair and r.repair.startswith("ckptcheck repair"))
    finally:
        the_plan.close()
    assert "--head-dim 8" in advice and "check it against the training run" in advice, advice
    command = shlex.split(advice.split("  (")[0])
    command[3] = str(tmp_path / "out.pth")
    assert main(command[1:]) == 0


@pytest.mark.parametrize(("scale", "dropped"), [(1.0, True), (2.0, False)])
def test_freqs_cis_is_dropped_only_when_the_config_gives_it(scale: float, dropped: bool, tmp_path: Path) -> None:
    state = torch.load(GOOD / "consolidated.pth", weights_only=True)
    angles = torch.outer(torch.arange(64).float(), _freqs(10000.0) * scale)
    state["freqs_cis"] = torch.polar(torch.ones_like(angles), angles)  # Meta's complex [seq, head_dim / 2]
    torch.save(state, tmp_path / "in.pth")
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(tmp_path / "in.pth"), str(dst), "--model-config", str(LINGUA)]) == (0 if dropped else 2)
    assert dst.exists() == dropped


def test_the_advised_repair_for_a_weights_only_target_says_so_and_runs(tmp_path: Path) -> None:
    """A lingua step folder for Meta's reference code: the advice leaves the training state behind
    explicitly (--weights-only), and following it runs."""
    import shlex

    from ckptcheck.engine import Options
    from ckptcheck.matrix import compatibility_matrix

    rows = {r.target: r for r in compatibility_matrix(GOOD / "dcp", None, Options())}
    command = shlex.split(rows["meta"].repair)
    assert "--weights-only" in command, command
    command[3] = str(tmp_path / "out.pth")
    assert main(command[1:]) == 0


def test_the_tie_check_judges_a_copy_by_its_values_like_repair_does(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An fp32 copy holding exactly the bf16 embedding's values is a tie saved as a copy (config[tie_embeddings]
    passes); one that differs in a single value is not (fails)."""
    tied_config = str(CONFIGS / "lingua_tied_params.json")
    assert main(["check", str(_tied(tmp_path)), "--model-config", tied_config, "--format", "json"]) in (0, 1)
    results = {r["id"]: r for r in json.loads(capsys.readouterr().out)["checks"]}
    assert results["config[tie_embeddings]"]["status"] == "pass", results["config[tie_embeddings]"]
    state = torch.load(GOOD / "consolidated.pth", weights_only=True)
    copy = state["tok_embeddings.weight"].float()
    copy[0, 0] += copy[0, 0].abs() * 2**-12 + 2**-30
    assert main(["check", str(_tied(tmp_path, copy)), "--model-config", tied_config, "--format", "json"]) == 1
    results = {r["id"]: r for r in json.loads(capsys.readouterr().out)["checks"]}
    assert results["config[tie_embeddings]"]["status"] == "fail", results["config[tie_embeddings]"]
