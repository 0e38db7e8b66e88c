from __future__ import annotations

import pytest

from ckptcheck.naming import CANONICAL, HF, META, SCHEMES, TITAN, map_keys, strip_wrappers


def _keys(layers: int = 2) -> list[str]:
    out = []
    for t in CANONICAL:
        out += [t.replace("{i}", str(i)) for i in range(layers)] if "{i}" in t else [t]
    return out


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_each_scheme_is_detected_and_round_trips(scheme) -> None:
    canonical = _keys()
    stored = [scheme.from_canonical(k) for k in canonical]
    assert None not in stored
    mapping = map_keys(stored)
    assert mapping.scheme is scheme
    assert sorted(mapping.canonical.values()) == sorted(canonical)
    assert not mapping.unknown and not mapping.wrappers


def test_known_names() -> None:
    assert HF.from_canonical("layers.3.feed_forward.w1.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert HF.from_canonical("layers.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert TITAN.from_canonical("layers.0.attention.wk.weight") == "layers.0.attention.qkv_linear.wk.weight"
    assert TITAN.from_canonical("output.weight") == "lm_head.weight"
    assert META.to_canonical("layers.12.attention.wo.weight") == "layers.12.attention.wo.weight"


def test_wrappers_are_stripped_and_reported() -> None:
    assert strip_wrappers("module._orig_mod.layers.0.attention.wq.weight") == (
        "layers.0.attention.wq.weight", ("module.", "_orig_mod."))
    assert strip_wrappers("layers.0._checkpoint_wrapped_module.attention.wq.weight")[0] == "layers.0.attention.wq.weight"
    mapping = map_keys(["module." + k for k in _keys()])
    assert mapping.scheme is META and mapping.wrappers == ("module.",)
    assert mapping.stored_for("norm.weight") == "module.norm.weight"


def test_buffers_and_unknown_keys() -> None:
    mapping = map_keys([*_keys(), "rope.freqs", "lm_head.bias"])
    assert mapping.buffers == ("rope.freqs",)
    assert mapping.unknown == ("lm_head.bias",)
