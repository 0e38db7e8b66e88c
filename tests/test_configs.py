from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptcheck.configs import ffn_hidden, load_config
from ckptcheck.errors import InputError

from .writers import CONFIGS


def test_ffn_formula_matches_published_models() -> None:
    assert ffn_hidden(4096, 256, None) == 11008  # Llama 2 7B / lingua 7B
    assert ffn_hidden(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert ffn_hidden(8192, 4096, 1.3) == 28672  # Llama 3 70B


def test_three_schemas_describe_the_same_model() -> None:
    lingua, meta, hf = (load_config(CONFIGS / n) for n in ("lingua_params.json", "meta_params.json", "hf_config.json"))
    dims = lambda c: (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.ffn_dim)  # noqa: E731
    assert dims(lingua) == dims(meta) == dims(hf) == (32, 2, 4, 2, 8, 128, 96)
    assert (lingua.schema, meta.schema, hf.schema) == ("lingua", "meta", "hf")
    assert hf.dtype == "bfloat16" and lingua.dtype is None
    assert hf.field_name("n_kv_heads") == "num_key_value_heads" and lingua.field_name("dim") == "model.dim"


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "params.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


@pytest.mark.parametrize(("data", "item", "cause"), [
    ('{"dim": 32,', "line 1 column 12", "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object"),
    ({"dim": 32, "n_layers": 2, "n_heads": 5}, "field n_heads", "5 does not divide dim=32"),
    ({"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 3}, "field n_kv_heads", "3 does not divide n_heads=4"),
    ({"dim": 32, "n_layers": 0, "n_heads": 4}, "field n_layers", "positive integer"),
    ({"dim": "32", "n_layers": 2, "n_heads": 4}, "field dim", "must be an integer"),
    ({"model": {"dim": 32, "n_layers": 2}}, "field model.n_heads", "missing"),
    ({"hidden_size": 32, "model_type": "qwen2"}, "field model_type", "not a Llama-family"),
    ({"foo": 1}, None, "not a model config"),
    ('{"dim": 1, "dim": 2}', None, "duplicate key 'dim'"),
])
def test_invalid_configs_name_the_field(tmp_path: Path, data: object, item: str | None, cause: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as exc:
        load_config(path)
    assert exc.value.path == str(path)
    assert exc.value.item == item
    assert cause in exc.value.cause


def test_meta_vocab_minus_one_means_tokenizer(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": -1}))
    assert cfg.vocab_size is None and cfg.n_kv_heads == 4


def test_explicit_head_dim(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"model": {"dim": 48, "n_layers": 1, "n_heads": 4, "head_dim": 16}}))
    assert cfg.head_dim == 16


def _transformers_config(tmp_path: Path, **rope: object) -> Path:
    """A config.json written by the installed transformers itself (5.x: rope_parameters, no top-level theta)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, **rope).save_pretrained(tmp_path)
    return tmp_path / "config.json"


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_rope_theta_and_scaling_are_read_in_either_spelling(tmp_path: Path, spelling: str) -> None:
    from ckptcheck.configs import to_lingua_params

    if spelling == "rope_parameters":
        path = _transformers_config(tmp_path, rope_theta=500000.0, rope_scaling=dict(LLAMA3))
        assert "rope_theta" not in json.loads(path.read_text())  # what transformers 5 writes
    else:
        path = _write(tmp_path, {**json.loads((CONFIGS / "hf_config.json").read_text()), "rope_theta": 500000.0,
                                 "rope_scaling": {**LLAMA3, "type": "llama3"}})
    cfg = load_config(path)
    assert cfg.rope_theta == 500000.0 and cfg.states("rope_theta")
    assert cfg.rope_scaling == LLAMA3
    assert to_lingua_params(cfg)["model"]["use_scaled_rope"] is True
    assert to_lingua_params(cfg)["model"]["rope_theta"] == 500000.0


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_a_scaling_params_json_cannot_express_is_refused(tmp_path: Path, spelling: str) -> None:
    from ckptcheck.configs import to_lingua_params

    other = {**LLAMA3, "original_max_position_embeddings": 64}
    if spelling == "rope_parameters":
        path = _transformers_config(tmp_path, rope_theta=500000.0, rope_scaling=other)
    else:
        path = _write(tmp_path, {**json.loads((CONFIGS / "hf_config.json").read_text()), "rope_scaling": other})
    with pytest.raises(InputError, match=f"field {spelling}.*no params.json equivalent"):
        to_lingua_params(load_config(path))


def test_plain_rope_of_transformers_5_is_no_scaling(tmp_path: Path) -> None:
    cfg = load_config(_transformers_config(tmp_path))
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert cfg.states("rope_theta") and cfg.states("norm_eps")
