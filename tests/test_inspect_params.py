"""``inspect --params`` writes only what the evidence shows: head counts come from a witness (a config saved
beside the checkpoint, rope.freqs) or the user's flags, never from a guess; without them it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main
from ckptcheck.configs import load_config
from ckptcheck.synth import random_state_dict

# The model: 4 heads / 2 KV heads of 64.  wq has 256 rows and wk 128, which 2 / 1 heads of 128 fit too.
TRUE = {"model": {"dim": 256, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 8, "multiple_of": 256}}


def _model(folder: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    truth = folder.parent / "truth.json"
    truth.write_text(json.dumps(TRUE))
    path = folder / "consolidated.pth"
    torch.save({**random_state_dict(load_config(truth), seed=3), **(extra or {})}, path)
    return path


def _params(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    rc = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if rc == 0 else {}, err


def test_refuses_to_write_head_counts_nothing_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _model(tmp_path / "ckpt")
    for fmt in ("lingua", "meta"):
        assert main(["inspect", str(ckpt), "--params", fmt]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1
        assert "n_heads × head_dim = 256" in err and "--n-heads, --n-kv-heads or --head-dim" in err


@pytest.mark.parametrize("flags", [["--n-heads", "4"], ["--n-kv-heads", "2"], ["--head-dim", "64"],
                                   ["--n-heads", "4", "--n-kv-heads", "2", "--head-dim", "64"]])
def test_any_one_head_flag_fixes_the_split(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    rc, params, _ = _params(capsys, str(_model(tmp_path / "ckpt")), "--params", "lingua", *flags)
    assert rc == 0
    assert (params["model"]["n_heads"], params["model"]["n_kv_heads"]) == (4, 2) and "head_dim" not in params["model"]


def test_head_flags_that_do_not_fit_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(_model(tmp_path / "ckpt"))
    for flags in (["--n-heads", "3"], ["--n-heads", "4", "--head-dim", "128"], ["--n-heads", "1", "--n-kv-heads", "2"]):
        rc, _, err = _params(capsys, ckpt, "--params", "meta", *flags)
        assert rc == 2 and "the head split does not fit the weights" in err, (flags, err)


def test_a_saved_config_or_rope_freqs_states_the_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _model(tmp_path / "saved")
    (tmp_path / "saved" / "params.json").write_text(json.dumps({"model": {**TRUE["model"], "rope_theta": 5e5}}))
    rc, params, _ = _params(capsys, str(ckpt), "--params", "lingua")
    assert rc == 0 and params["model"]["n_heads"] == 4 and params["model"]["rope_theta"] == 5e5
    rc, _, err = _params(capsys, str(ckpt), "--params", "lingua", "--n-heads", "2")  # contradicts the saved config
    assert rc == 2 and "disagree" in err

    rc, params, _ = _params(capsys, str(_model(tmp_path / "rope", {"rope.freqs": torch.ones(32)})), "--params", "meta")
    assert rc == 0 and (params["n_heads"], params["n_kv_heads"]) == (4, 2) and "rope_theta" not in params


def test_written_params_check_clean_and_say_the_split_is_unverified(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _model(tmp_path / "ckpt")
    rc, params, err = _params(capsys, str(ckpt), "--params", "lingua", "--n-heads", "4")
    assert rc == 0 and "norm_eps is not in the weights" in err and "rope_theta is not in the weights" in err
    written = tmp_path / "written" / "params.json"
    written.parent.mkdir()
    written.write_text(json.dumps(params))
    assert main(["check", str(ckpt), "--model-config", str(written), "--metadata-only", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    status = {c["id"]: c["status"] for c in doc["checks"]}
    assert status["config[n_heads]"] == "skip" and status["config[dim]"] == "pass"


def test_description_leaves_out_what_nothing_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = _params(capsys, str(_model(tmp_path / "ckpt")), "--format", "json")
    assert rc == 0 and "n_heads" not in doc["inferred_params"] and doc["inferred_params"]["dim"] == 256
    assert "--n-heads" in doc["inferred_params_note"]


def test_a_stale_or_silent_saved_config_is_not_written_as_fact(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A params.json of another model two folders up states nothing about these weights; a config.json that
    leaves rms_norm_eps and rope_theta to defaults does not say the defaults."""
    ckpt = _model(tmp_path / "runs" / "exp1" / "step100")
    other = {"model": {**TRUE["model"], "n_layers": 4, "vocab_size": 64, "n_heads": 2, "rope_theta": 5e5}}
    (tmp_path / "runs" / "params.json").write_text(json.dumps(other))
    rc, _, err = _params(capsys, str(ckpt), "--params", "meta")
    assert rc == 2 and "--n-heads" in err  # the stale config's 2 heads are not taken

    silent = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8}
    ckpt = _model(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(silent))
    rc, params, err = _params(capsys, str(ckpt), "--params", "lingua")
    assert rc == 0 and params["model"]["n_heads"] == 4
    assert "norm_eps" not in params["model"] and "rope_theta" not in params["model"]
    assert "norm_eps is not in the weights" in err


def test_params_a_schema_cannot_express_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Biases (lingua, Meta) and a head size other than dim / n_heads (Meta) have no params.json field: a
    params.json without them would fail against the very weights it was written from."""
    biased = {"model": {**TRUE["model"], "attention_bias": True, "mlp_bias": True}}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "truth.json").write_text(json.dumps(biased))
    torch.save(random_state_dict(load_config(tmp_path / "b" / "truth.json"), seed=3), tmp_path / "b" / "c.pth")
    for fmt in ("lingua", "meta"):
        rc, _, err = _params(capsys, str(tmp_path / "b" / "c.pth"), "--params", fmt, "--n-heads", "4")
        assert rc == 2 and "bias tensors" in err and "params.json cannot state" in err, err

    narrow = str(_model(tmp_path / "ckpt"))  # wq 256 rows = dim: 8 heads of 32 is another head size
    rc, _, err = _params(capsys, narrow, "--params", "meta", "--n-heads", "8", "--head-dim", "32")
    assert rc == 0
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "truth.json").write_text(json.dumps({"model": {**TRUE["model"], "head_dim": 32}}))
    torch.save(random_state_dict(load_config(tmp_path / "n" / "truth.json"), seed=3), tmp_path / "n" / "c.pth")
    rc, _, err = _params(capsys, str(tmp_path / "n" / "c.pth"), "--params", "meta", "--n-heads", "4")
    assert rc == 2 and "Meta's params.json has no head_dim field" in err
    rc, params, _ = _params(capsys, str(tmp_path / "n" / "c.pth"), "--params", "lingua", "--n-heads", "4")
    assert rc == 0 and params["model"]["head_dim"] == 32


def test_a_partial_top_layer_leaves_n_layers_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _model(tmp_path / "ckpt", {"layers.1.attention.wq.weight": torch.zeros(256, 256)})
    rc, _, err = _params(capsys, str(ckpt), "--params", "lingua", "--n-heads", "4")
    assert rc == 2 and "n_layers is 1 or 2 (layer 1 holds 1 of 9 tensors)" in err, err
    rc, doc, _ = _params(capsys, str(ckpt), "--format", "json", "--n-heads", "4")
    assert rc == 0 and "n_layers" not in doc["inferred_params"]


def test_a_saved_rope_scaling_is_written_or_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A witness config.json (transformers 5 spelling) with Llama 3.1 scaling: the params.json says so; a
    scaling params.json cannot state is refused, never dropped."""
    from transformers import LlamaConfig

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    for name, scaling in (("ok", llama3), ("other", {**llama3, "original_max_position_embeddings": 64})):
        ckpt = _model(tmp_path / name)
        LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=8, rope_theta=500000.0, rope_scaling=scaling,
                    tie_word_embeddings=False).save_pretrained(tmp_path / name)
        rc, params, err = _params(capsys, str(ckpt), "--params", "lingua")
        if name == "ok":
            assert rc == 0 and params["model"]["use_scaled_rope"] is True and params["model"]["rope_theta"] == 5e5
        else:
            assert rc == 2 and "no params.json equivalent" in err, err
