"""Biases survive conversion and repair: a transformers Llama with attention_bias and mlp_bias, saved by
transformers, converted to Meta names and back, or repaired, loads in transformers with no missing or
re-initialised keys and the same logits."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main
from ckptcheck.configs import load_config
from ckptcheck.convert.api import convert
from ckptcheck.diff import diff
from ckptcheck.engine import Options, plan, run
from ckptcheck.formats import open_checkpoint
from ckptcheck.llama import streaming_logits

from .writers import CONFIGS

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENS = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A biased model as transformers saves it (float32, non-zero biases), and its logits."""
    hf_cfg = json.loads((CONFIGS / "hf_config.json").read_text())
    hf_cfg |= {"torch_dtype": "float32", "attention_bias": True, "mlp_bias": True}
    config = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("biased") / "saved"
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(TOKENS[None]).logits[0]
    return folder, logits


def _load(folder: Path) -> torch.Tensor:
    model, info = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                output_loading_info=True)
    assert model.config.attention_bias and model.config.mlp_bias
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(TOKENS[None]).logits[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_the_config_reads_the_bias_flags_and_the_spec_expects_the_biases(biased) -> None:
    folder, _ = biased
    cfg = load_config(folder / "config.json")
    assert cfg.attention_bias and cfg.mlp_bias
    results = run(plan(folder, None, Options()))
    ids = {r.key for r in results if r.category == "key_present"}
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.o_proj.bias",
            "model.layers.0.mlp.down_proj.bias"} <= ids
    assert [r.id for r in results if r.status.value == "fail"] == []


def test_biases_convert_to_meta_and_back_with_the_same_logits(biased, tmp_path: Path) -> None:
    folder, theirs = biased
    config = folder / "config.json"
    convert(folder, tmp_path / "meta.pth", naming="meta", config=config)
    with open_checkpoint(tmp_path / "meta.pth") as ckpt:
        assert {"layers.0.attention.wq.bias", "layers.0.attention.wk.bias", "layers.1.feed_forward.w2.bias"} \
            <= set(ckpt.manifest.tensors)
        _close(streaming_logits(ckpt, load_config(config), TOKENS), theirs)  # q/k bias rows permuted right
    assert diff(folder, tmp_path / "meta.pth", config=config).equal  # diff maps bias names and rows too
    convert(tmp_path / "meta.pth", tmp_path / "hf", to="hf", config=config, head_dim=load_config(config).head_dim)
    _close(_load(tmp_path / "hf"), theirs)


def test_a_meta_config_with_biases_writes_a_config_json_transformers_loads(biased, tmp_path: Path) -> None:
    folder, theirs = biased
    convert(folder, tmp_path / "meta.pth", naming="meta", config=folder / "config.json")
    params = json.loads((CONFIGS / "lingua_params.json").read_text())
    params["model"] |= {"attention_bias": True, "mlp_bias": True}
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert [r.id for r in run(plan(tmp_path / "meta.pth", tmp_path / "params.json", Options()))
            if r.status.value == "fail"] == []
    convert(tmp_path / "meta.pth", tmp_path / "hf", to="hf", config=tmp_path / "params.json")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["attention_bias"] is True and written["mlp_bias"] is True
    _close(_load(tmp_path / "hf"), theirs)


def test_repair_keeps_the_biases(biased, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DDP-prefixed copy is repaired (prefixes stripped) without dropping a single bias."""
    from safetensors.torch import load_file, save_file

    folder, theirs = biased
    src = tmp_path / "prefixed"
    src.mkdir()
    state = load_file(str(folder / "model.safetensors"))
    save_file({f"module.{k}": v for k, v in state.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text((folder / "config.json").read_text())
    code = main(["repair", str(src), str(tmp_path / "fixed"), "--to", "hf", "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["repaired"] and out["conversion"]["dropped"] == [], out
    _close(_load(tmp_path / "fixed"), theirs)


def test_convert_rechecks_its_output_with_the_config_it_wrote(biased, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Biased weights converted with a bias-free config: the written config.json would make transformers
    drop the biases, and the re-check says so (exit 1) instead of reporting success."""
    folder, _ = biased
    code = main(["convert", str(folder), str(tmp_path / "hf"), "--to", "hf", "--model-config",
                 str(CONFIGS / "hf_config.json")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"re-checked with {tmp_path / 'hf' / 'config.json'}" in out
    assert "FAIL unexpected_key[model.layers.0.self_attn.q_proj.bias]" in out
    assert main(["convert", str(folder), str(tmp_path / "ok"), "--to", "hf"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"re-checked with .*: \d+ of \d+ checks pass", out) and "FAIL" not in out, out
