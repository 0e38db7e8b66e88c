"""Property tests: random Llama shapes convert Meta -> HF -> Meta bit for bit, with the same logits."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptcheck.configs import load_config
from ckptcheck.convert.api import convert
from ckptcheck.formats import open_checkpoint
from ckptcheck.llama import streaming_logits
from ckptcheck.synth import random_state_dict


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv=st.integers(1, 3), groups=st.integers(1, 3), half_hd=st.integers(1, 4), layers=st.integers(1, 2),
       to=st.sampled_from(["hf", "safetensors", "torch"]))
def test_meta_hf_meta_is_bitwise_and_forward_equal(kv: int, groups: int, half_hd: int, layers: int, to: str) -> None:
    heads, hd = kv * groups, 2 * half_hd
    dim = heads * hd
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        params = {"model": {"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv, "vocab_size": 32,
                            "multiple_of": 4}}
        (d / "params.json").write_text(json.dumps(params))
        cfg = load_config(d / "params.json")
        state = random_state_dict(cfg, dtype="float32", seed=heads * 100 + kv)
        torch.save(state, d / "src.pth")
        mid = d / ("hf" if to == "hf" else f"mid.{'pth' if to == 'torch' else 'safetensors'}")
        convert(d / "src.pth", mid, to=to, naming="hf", config=cfg)
        convert(mid, d / "back.pth", naming="meta", config=cfg)
        tokens = torch.arange(6) % 32
        with open_checkpoint(d / "back.pth") as back, open_checkpoint(mid) as hf:
            for key, t in state.items():
                assert torch.equal(back.load(key), t), key
            assert torch.allclose(streaming_logits(hf, cfg, tokens), streaming_logits(back, cfg, tokens), atol=1e-5)
