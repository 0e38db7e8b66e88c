"""Interoperability with transformers (a test-only dependency): its LlamaForCausalLM loads ckptcheck's
--to hf output and computes ckptcheck's reference logits; and a model transformers saved converts to the
Meta/lingua layout with the same logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: this test runs in CI, never skips

from ckptcheck.configs import load_config
from ckptcheck.convert.api import convert
from ckptcheck.formats import open_checkpoint
from ckptcheck.llama import streaming_logits

from .writers import CONFIGS, FIXTURES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENS = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(7))


def _hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(TOKENS[None]).logits[0]


@pytest.mark.parametrize("src", ["consolidated.pth", "meta_mp", "dcp"])
def test_transformers_loads_our_hf_output(src: str, tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "lingua_params.json")
    convert(FIXTURES / "good" / src, tmp_path / "hf", to="hf", config=cfg, head_dim=cfg.head_dim, weights_only=True)
    with open_checkpoint(FIXTURES / "good" / src) as ckpt:
        reference = streaming_logits(ckpt, cfg, TOKENS)
    theirs = _hf_logits(tmp_path / "hf")
    assert torch.allclose(theirs, reference, atol=1e-5, rtol=1e-4), (theirs - reference).abs().max()


def test_a_model_transformers_saved_converts_to_meta_layout(tmp_path: Path) -> None:
    hf_cfg = json.loads((CONFIGS / "hf_config.json").read_text())
    hf_cfg["torch_dtype"] = "float32"
    config = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures",)})
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        theirs = model(TOKENS[None]).logits[0]
    convert(tmp_path / "saved", tmp_path / "meta.pth", naming="meta", config=tmp_path / "saved" / "config.json")
    cfg = load_config(CONFIGS / "lingua_params.json")
    with open_checkpoint(tmp_path / "meta.pth") as ckpt:
        assert "layers.0.attention.wq.weight" in ckpt.manifest.tensors
        ours = streaming_logits(ckpt, cfg, TOKENS)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (ours - theirs).abs().max()


def test_a_written_config_describes_the_weights_as_written(tmp_path: Path) -> None:
    """fp32 weights and a Meta params.json that leaves the vocabulary to the tokenizer (-1): the written
    config.json says float32 and the embedding's vocabulary, transformers reads every field as written,
    loads the weights as float32, and ckptcheck passes its own output with that config."""
    from ckptcheck.cli import main

    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    torch.save({k: v.float() for k, v in state.items()}, tmp_path / "fp32.pth")
    model = json.loads((CONFIGS / "lingua_params.json").read_text())["model"]
    params = {k: v for k, v in model.items() if k not in ("max_seqlen", "weight_tying")}
    params |= {"vocab_size": -1, "norm_eps": 1e-6, "rope_theta": 500000.0, "use_scaled_rope": True,
               "max_seq_len": 512}
    (tmp_path / "params.json").write_text(json.dumps(params))
    convert(tmp_path / "fp32.pth", tmp_path / "hf", to="hf", config=tmp_path / "params.json")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["torch_dtype"] == "float32" and written["vocab_size"] == 128
    auto = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(auto, transformers.LlamaConfig)
    assert (auto.vocab_size, auto.max_position_embeddings, auto.rms_norm_eps, auto.tie_word_embeddings) == \
        (128, 512, 1e-6, False)
    assert auto.rope_scaling["rope_type"] == "llama3" and auto.rope_scaling["rope_theta"] == 500000.0
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert loaded.dtype == torch.float32
    assert main(["check", str(tmp_path / "hf")]) == 0


def test_config_fields_survive_hf_to_params_and_back(tmp_path: Path) -> None:
    """HF config -> params.json (a DCP conversion) -> config.json (back to hf): positions, Llama 3.1 rope
    scaling, norm eps, tying and vocabulary read the same in transformers at the end."""
    hf_cfg = json.loads((CONFIGS / "hf_config.json").read_text())
    hf_cfg |= {"max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    convert(FIXTURES / "good" / "consolidated.pth", tmp_path / "dcp", to="dcp", naming="meta",
            config=tmp_path / "config.json")
    params = json.loads((tmp_path / "dcp" / "params.json").read_text())["model"]
    assert params["max_seqlen"] == 4096 and params["use_scaled_rope"] is True
    convert(tmp_path / "dcp", tmp_path / "hf", to="hf", config=tmp_path / "dcp" / "params.json")
    back = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    before = transformers.AutoConfig.from_pretrained(str(tmp_path))
    for name in ("max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "vocab_size", "rope_scaling",
                 "hidden_size", "num_key_value_heads", "intermediate_size"):
        assert getattr(back, name) == getattr(before, name), name


def test_a_rope_scaling_params_json_cannot_express_is_refused(tmp_path: Path) -> None:
    from ckptcheck.errors import InputError

    hf_cfg = json.loads((CONFIGS / "hf_config.json").read_text())
    hf_cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(InputError, match="rope_scaling.*no params.json equivalent"):
        convert(FIXTURES / "good" / "consolidated.pth", tmp_path / "dcp", to="dcp", naming="meta",
                config=tmp_path / "config.json")
    assert not (tmp_path / "dcp").exists()
