"""Config checks pass only on evidence: a head split nothing corroborates is reported, not passed; a witness
(a saved config, rope.freqs) decides it; contradictions still fail, with advice that holds when applied."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ckptcheck.checks.model import CheckResult, Status
from ckptcheck.configs import load_config
from ckptcheck.engine import Options, plan, run
from ckptcheck.naming import HF
from ckptcheck.synth import in_scheme, random_state_dict

from .writers import FIXTURES

TRUE = {"model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 16, "multiple_of": 16}}
# 8 heads / 4 KV heads of size 4 fill the same rows: every shape agrees with the 4 / 2 model.
EIGHT_HEADS = {"model": {**TRUE["model"], "n_heads": 8, "n_kv_heads": 4}}


def _model(folder: Path, params: dict, extra: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / "truth.json").write_text(json.dumps(params))
    state = random_state_dict(load_config(folder.parent / "truth.json"), seed=1)
    torch.save({**state, **(extra or {})}, folder / "consolidated.pth")
    return folder / "consolidated.pth"


def _config(path: Path, params: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(params))
    return path


def _results(ckpt: Path, config: Path | None, target: str = "init") -> dict[str, CheckResult]:
    the_plan = plan(ckpt, config, Options(target=target))
    try:
        return {r.id: r for r in run(the_plan)}
    finally:
        the_plan.close()


def test_a_head_count_the_weights_cannot_decide_is_reported_not_passed(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "ckpt", TRUE)
    results = _results(ckpt, _config(tmp_path / "cfg" / "params.json", EIGHT_HEADS))
    for key in ("n_heads", "n_kv_heads"):
        r = results[f"config[{key}]"]
        assert r.status is Status.SKIP, r.message
        assert "cannot be verified" in r.message and "8 × 4 or 2 × 16 or 4 × 8" in r.message
        assert "conversions will assume head_dim = 4" in r.message
    assert not [r.id for r in results.values() if r.status is Status.FAIL]


def test_a_config_saved_beside_the_checkpoint_decides_the_head_split(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "ckpt", TRUE)
    _config(tmp_path / "ckpt" / "params.json", TRUE)  # what the training run saved
    wrong = _config(tmp_path / "cfg" / "params.json", EIGHT_HEADS)
    r = _results(ckpt, wrong)["config[n_heads]"]
    assert r.status is Status.FAIL
    assert f"{tmp_path / 'ckpt' / 'params.json'}" in r.message and "so n_heads = 4" in r.message
    assert r.repair == (f"set model.n_heads = 4 and model.n_kv_heads = 2 in {wrong}, "
                        "if the weights are the model you meant")
    right = _results(ckpt, _config(tmp_path / "cfg2" / "params.json", {"model": {**TRUE["model"], "norm_eps": 1e-5}}))
    assert right["config[n_heads]"].status is Status.PASS and right["config[n_kv_heads]"].status is Status.PASS


def test_the_config_under_test_is_not_its_own_witness() -> None:
    results = _results(FIXTURES / "good" / "dcp", None)  # checked against its own params.json
    assert results["config[n_heads]"].status is Status.SKIP


def _freqs(theta: float, head_dim: int = 8) -> torch.Tensor:
    """Meta's rope.freqs, kept in the checkpoint's dtype as Llama 2 files keep it."""
    return (1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(torch.bfloat16)


def test_rope_freqs_decides_the_head_split(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "ckpt", TRUE, {"rope.freqs": _freqs(10000.0)})  # head_dim 8
    wrong = _results(ckpt, _config(tmp_path / "cfg" / "params.json", EIGHT_HEADS))["config[n_kv_heads]"]
    assert wrong.status is Status.FAIL and "rope.freqs [4] shows head_dim 8" in wrong.message
    right = _results(ckpt, _config(tmp_path / "cfg2" / "params.json", TRUE))["config[n_heads]"]
    assert right.status is Status.PASS and "rope.freqs" in right.message


def test_head_counts_that_contradict_the_rows_still_fail(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "ckpt", TRUE)
    bad = {"model": {**TRUE["model"], "n_heads": 2, "n_kv_heads": 2, "head_dim": 8}}
    results = _results(ckpt, _config(tmp_path / "cfg" / "params.json", bad))
    assert results["config[n_heads]"].status is Status.FAIL
    assert "model.n_heads × head_dim = 2 × 8 = 16, but layers.0.attention.wq.weight has 32 rows" in (
        results["config[n_heads]"].message)


def test_missing_head_dim_advice_pins_head_dim(tmp_path: Path) -> None:
    """The issue's case: wq has twice dim's rows and the config states no head_dim.  Setting only the head
    count moved the implicit head_dim (dim / n_heads) and the check failed again with a new count."""
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    truth = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 8,
             "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 16, "intermediate_size": 64}
    cfg = load_config(_config(tmp_path / "truth" / "config.json", truth))
    torch.save(in_scheme(random_state_dict(cfg, seed=2), HF, cfg), ckpt_dir / "model.pth")
    given = {k: v for k, v in truth.items() if k != "head_dim"} | {"num_attention_heads": 4}
    config = _config(tmp_path / "cfg" / "config.json", given)
    r = _results(ckpt_dir / "model.pth", config)["config[n_heads]"]
    assert r.status is Status.FAIL
    assert r.repair == f"set num_key_value_heads = 1 and head_dim = 16 in {config}, if the weights are the model you meant"
    config.write_text(json.dumps(given | {"num_key_value_heads": 1, "head_dim": 16}))
    after = _results(ckpt_dir / "model.pth", config)
    assert after["config[n_heads]"].status is Status.SKIP and after["config[n_kv_heads]"].status is Status.SKIP


def _tie_result(tmp_path: Path, output: torch.Tensor | None, metadata_only: bool = False) -> CheckResult:
    tied = {"model": {**TRUE["model"], "weight_tying": True}}
    config = _config(tmp_path / "cfg" / "params.json", tied)
    state = random_state_dict(load_config(config), seed=4)
    state["output.weight"] = state["tok_embeddings.weight"].clone() if output is None else output
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / "consolidated.pth")  # separate storage, as DCP and FSDP save a tie
    the_plan = plan(tmp_path / "ckpt" / "consolidated.pth", config, Options(metadata_only=metadata_only))
    try:
        return {r.id: r for r in run(the_plan)}["config[tie_embeddings]"]
    finally:
        the_plan.close()


def test_a_tie_saved_as_a_copy_is_a_tie(tmp_path: Path) -> None:
    """lingua under FSDP saves a tied output.weight as its own tensor: equal values are the tie, not its absence
    (unexpected_key reports the copy, with the repair that drops it)."""
    r = _tie_result(tmp_path, None)
    assert r.status is Status.PASS and "bit-identical" in r.message


def test_a_separate_output_that_differs_is_no_tie(tmp_path: Path) -> None:
    r = _tie_result(tmp_path, torch.zeros(16, 32, dtype=torch.bfloat16))
    assert r.status is Status.FAIL and r.repair and "model.weight_tying = false" in r.repair


def test_without_values_a_separate_output_is_undecided(tmp_path: Path) -> None:
    r = _tie_result(tmp_path, None, metadata_only=True)
    assert r.status is Status.SKIP and "cannot be verified without reading values" in r.message


def test_norm_eps_and_rope_theta_need_a_saved_config(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "ckpt", TRUE)
    given = _config(tmp_path / "cfg" / "params.json", TRUE)  # rope_theta left at the default 10000
    alone = _results(ckpt, given)
    assert alone["config[rope_theta]"].status is Status.SKIP and "conversions will assume 10000.0" in (
        alone["config[rope_theta]"].message)
    _config(tmp_path / "ckpt" / "params.json", {"model": {**TRUE["model"], "rope_theta": 500000.0}})
    r = _results(ckpt, given)["config[rope_theta]"]
    assert r.status is Status.FAIL and r.repair == (
        f"set model.rope_theta = 500000.0 in {given}, if the weights are the model you meant")
    assert _results(ckpt, given)["config[norm_eps]"].status is Status.SKIP  # the saved config does not state it


def test_rope_freqs_values_decide_rope_theta(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "ckpt", TRUE, {"rope.freqs": _freqs(500000.0)})
    given = _config(tmp_path / "cfg" / "params.json", TRUE)  # theta left at the default 10000
    r = _results(ckpt, given)["config[rope_theta]"]
    assert r.status is Status.FAIL and r.repair == (
        f"set model.rope_theta = 500000.0 in {given}, if the weights are the model you meant")
    given.write_text(json.dumps({"model": {**TRUE["model"], "rope_theta": 500000.0}}))
    r = _results(ckpt, given)["config[rope_theta]"]
    assert r.status is Status.PASS and "rope.freqs" in r.message


def test_no_advice_sets_a_tying_field_a_meta_params_json_does_not_have(tmp_path: Path) -> None:
    """Meta's loader ignores weight_tying: advising it would never converge."""
    meta = _config(tmp_path / "cfg" / "params.json", TRUE["model"])
    state = random_state_dict(load_config(meta), seed=5)
    del state["output.weight"]
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / "consolidated.pth")
    results = _results(tmp_path / "ckpt" / "consolidated.pth", meta)
    for check_id in ("config[tie_embeddings]", "key_present[output.weight]"):
        r = results[check_id]
        assert r.status is Status.FAIL and r.repair and "cannot state tied embeddings" in r.repair, r.repair


def test_a_copy_of_the_tested_config_is_not_a_witness(tmp_path: Path) -> None:
    """Byte-identical or reformatted, a copy of the config under test agrees with it by construction."""
    ckpt = _model(tmp_path / "ckpt", TRUE)
    wrong = _config(tmp_path / "cfg" / "params.json", EIGHT_HEADS)
    for copy in (wrong.read_text(), json.dumps(EIGHT_HEADS, indent=4)):
        (tmp_path / "ckpt" / "params.json").write_text(copy)
        results = _results(ckpt, wrong)
        for key in ("n_heads", "n_kv_heads"):
            r = results[f"config[{key}]"]
            assert r.status is Status.SKIP and "copies of it" in r.message, r.message


def test_a_stale_config_of_another_model_is_not_a_witness(tmp_path: Path) -> None:
    """Same q/k rows and dim, other layers and vocabulary: a config of another model two folders up."""
    ckpt = _model(tmp_path / "runs" / "exp1" / "step100", TRUE)
    _config(tmp_path / "runs" / "params.json",
            {"model": {**EIGHT_HEADS["model"], "n_layers": 3, "vocab_size": 64, "rope_theta": 5e5, "norm_eps": 1e-6}})
    results = _results(ckpt, _config(tmp_path / "cfg" / "params.json", TRUE))
    for key in ("n_heads", "n_kv_heads", "norm_eps", "rope_theta"):
        assert results[f"config[{key}]"].status is Status.SKIP, results[f"config[{key}]"].message


def test_a_saved_config_is_evidence_only_for_what_it_states(tmp_path: Path) -> None:
    """A config.json that leaves rms_norm_eps / rope_theta out does not say transformers' defaults."""
    ckpt = _model(tmp_path / "ckpt", TRUE)
    _config(tmp_path / "ckpt" / "config.json", {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 16})
    given = _config(tmp_path / "cfg" / "params.json",
                    {"model": {**TRUE["model"], "norm_eps": 1e-5, "rope_theta": 500000.0}})
    results = _results(ckpt, given)
    assert results["config[n_heads]"].status is Status.PASS  # it states the heads
    for key in ("norm_eps", "rope_theta"):
        r = results[f"config[{key}]"]
        assert r.status is Status.SKIP and "cannot be verified" in r.message, r.message


def test_a_config_written_by_transformers_5_witnesses_rope_theta(tmp_path: Path) -> None:
    """transformers 5 writes theta inside rope_parameters: read as 10000 it would give the wrong advice."""
    from transformers import LlamaConfig

    ckpt = _model(tmp_path / "ckpt", TRUE)
    LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=16, rope_theta=500000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False).save_pretrained(tmp_path / "ckpt")
    given = _config(tmp_path / "cfg" / "params.json", TRUE)  # theta left at 10000
    r = _results(ckpt, given)["config[rope_theta]"]
    assert r.status is Status.FAIL and r.repair == (
        f"set model.rope_theta = 500000.0 in {given}, if the weights are the model you meant")


# A head size other than dim / n_heads: 4 heads of 4 in a model of dim 32.
NARROW = {"model": {**TRUE["model"], "head_dim": 4}}


def test_the_meta_target_fails_a_head_size_meta_cannot_state(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "ckpt", NARROW)
    meta = _config(tmp_path / "cfg" / "params.json", NARROW["model"])  # a Meta-schema params.json with head_dim
    r = _results(ckpt, meta, "meta")["config[head_dim]"]
    assert r.status is Status.FAIL and "no head_dim field" in r.message and "16 rows, not dim = 32" in r.message
    lingua = _config(tmp_path / "lingua" / "params.json", NARROW)
    assert "config[head_dim]" not in _results(ckpt, lingua, "lingua_init")  # lingua states head_dim
    plain = _model(tmp_path / "plain", TRUE)
    assert _results(plain, _config(tmp_path / "m2" / "params.json", TRUE["model"]), "meta")[
        "config[head_dim]"].status is Status.PASS


def test_no_advice_sets_a_head_dim_a_meta_params_json_does_not_have(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "ckpt", NARROW)
    meta = _config(tmp_path / "cfg" / "params.json", TRUE["model"])  # 4 heads of 8: wq would have 32 rows
    failing = [r for r in _results(ckpt, meta).values() if r.status is Status.FAIL and r.category == "config"]
    assert failing and all(r.repair and "set head_dim" not in r.repair for r in failing), [r.repair for r in failing]
    assert any(r.repair and "cannot state head_dim" in r.repair for r in failing)


BIASED = {"model": {**TRUE["model"], "attention_bias": True, "mlp_bias": True}}


def test_lingua_and_meta_targets_fail_biases(tmp_path: Path) -> None:
    """lingua's and Meta's Llama have no biases: a biased checkpoint cannot load there, whatever the config says."""
    ckpt = _model(tmp_path / "ckpt", BIASED)
    config = _config(tmp_path / "cfg" / "params.json", BIASED)
    for target in ("lingua_init", "lingua_resume", "meta"):
        results = _results(ckpt, config, target)
        for flag in ("attention_bias", "mlp_bias"):
            r = results[f"config[{flag}]"]
            assert r.status is Status.FAIL and "such tensors (layers.0." in r.message, (target, r.message)
    assert "config[attention_bias]" not in _results(ckpt, config, "hf")


def test_a_partial_top_layer_gets_no_n_layers_advice(tmp_path: Path) -> None:
    """One tensor of a third layer: "set n_layers = 3" would leave its 8 other tensors missing."""
    state = torch.load(FIXTURES / "broken" / "extra_layer.pth", weights_only=True)
    assert [k for k in state if k.startswith("layers.2.")] == ["layers.2.attention.wq.weight"]
    ckpt = FIXTURES / "broken" / "extra_layer.pth"
    results = _results(ckpt, FIXTURES / "configs" / "meta_params.json")
    r = results["config[n_layers]"]
    assert r.status is Status.SKIP and "layer 2 holds 1 of 9 tensors" in r.message, r.message
    assert results["unexpected_key[layers.2.attention.wq.weight]"].status is Status.FAIL
    five = _config(tmp_path / "cfg" / "params.json", {**json.loads(
        (FIXTURES / "configs" / "meta_params.json").read_text()), "n_layers": 5})
    r = _results(ckpt, five)["config[n_layers]"]
    assert r.status is Status.FAIL and r.repair and "n_layers = 2 and drop" in r.repair and "= 3 and restore" in r.repair
