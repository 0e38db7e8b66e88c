"""What a checkpoint should hold: expected tensors, built from a config or from a model factory."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configs import ModelConfig
from .errors import InputError
from .naming import CANONICAL, CUSTOM, SCHEMES, Scheme, map_keys, role_of


@dataclass(frozen=True, slots=True)
class ExpectedTensor:
    key: str  # canonical key (or the factory's own name under the custom scheme)
    shape: tuple[int | None, ...]  # None: any size (vocab left to the tokenizer)


@dataclass(frozen=True)
class ModelSpec:
    scheme: Scheme  # the naming the model loads with
    tensors: dict[str, ExpectedTensor]
    # tied duplicate -> the key it shares storage with (output.weight -> tok_embeddings.weight).
    tied: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None  # storage dtype the config states, if any
    config: ModelConfig | None = None
    source: str = ""

    def display(self, key: str) -> str:
        """A canonical key as the target scheme spells it."""
        return self.scheme.from_canonical(key) or key


# Bias roles and the config flag that puts them in the model.
BIAS_FLAGS = {
    "layers.{i}.attention.wq.bias": "attention_bias", "layers.{i}.attention.wk.bias": "attention_bias",
    "layers.{i}.attention.wv.bias": "attention_bias", "layers.{i}.attention.wo.bias": "attention_bias",
    "layers.{i}.feed_forward.w1.bias": "mlp_bias", "layers.{i}.feed_forward.w2.bias": "mlp_bias",
    "layers.{i}.feed_forward.w3.bias": "mlp_bias",
}


def biases(canonical_keys: Iterable[str]) -> dict[str, list[str]]:
    """The bias tensors among canonical keys, by the config flag they need ("attention_bias", "mlp_bias")."""
    out: dict[str, list[str]] = {}
    for key in canonical_keys:
        if (flag := BIAS_FLAGS.get(role_of(key))) is not None:
            out.setdefault(flag, []).append(key)
    return out


def role_shapes(cfg: ModelConfig) -> dict[str, tuple[int | None, ...]]:
    """The shape of every canonical role ("layers.{i}.attention.wq.weight") in the config's model."""
    shapes: dict[str, tuple[int | None, ...]] = {
        "tok_embeddings.weight": (cfg.vocab_size, cfg.dim),
        "layers.{i}.attention.wq.weight": (cfg.n_heads * cfg.head_dim, cfg.dim),
        "layers.{i}.attention.wk.weight": (cfg.n_kv_heads * cfg.head_dim, cfg.dim),
        "layers.{i}.attention.wv.weight": (cfg.n_kv_heads * cfg.head_dim, cfg.dim),
        "layers.{i}.attention.wo.weight": (cfg.dim, cfg.n_heads * cfg.head_dim),
        "layers.{i}.feed_forward.w1.weight": (cfg.ffn_dim, cfg.dim),
        "layers.{i}.feed_forward.w2.weight": (cfg.dim, cfg.ffn_dim),
        "layers.{i}.feed_forward.w3.weight": (cfg.ffn_dim, cfg.dim),
        "layers.{i}.attention_norm.weight": (cfg.dim,),
        "layers.{i}.ffn_norm.weight": (cfg.dim,),
        "norm.weight": (cfg.dim,),
        "output.weight": (cfg.vocab_size, cfg.dim),
        "layers.{i}.attention.wq.bias": (cfg.n_heads * cfg.head_dim,),
        "layers.{i}.attention.wk.bias": (cfg.n_kv_heads * cfg.head_dim,),
        "layers.{i}.attention.wv.bias": (cfg.n_kv_heads * cfg.head_dim,),
        "layers.{i}.attention.wo.bias": (cfg.dim,),
        "layers.{i}.feed_forward.w1.bias": (cfg.ffn_dim,),
        "layers.{i}.feed_forward.w2.bias": (cfg.dim,),
        "layers.{i}.feed_forward.w3.bias": (cfg.ffn_dim,),
    }
    assert tuple(shapes) == CANONICAL
    return shapes


def spec_from_config(cfg: ModelConfig, tensors_held: int | None = None) -> ModelSpec:
    """The tensors the config's model has.  ``tensors_held``, the number of tensors in the checkpoint under
    test, bounds the layers listed: a checkpoint of T tensors holds at most T layers, so the spec lists no
    more than T (every layer a real mismatch leaves out is still listed) and its size is linear in the
    checkpoint, whatever n_layers says; the config check reports the n_layers the weights do not have."""
    shapes = {k: v for k, v in role_shapes(cfg).items() if k not in BIAS_FLAGS or getattr(cfg, BIAS_FLAGS[k])}
    tensors: dict[str, ExpectedTensor] = {}
    tied: dict[str, str] = {}

    def add(key: str, shape: tuple[int | None, ...]) -> None:
        tensors[key] = ExpectedTensor(key, shape)

    add("tok_embeddings.weight", shapes["tok_embeddings.weight"])
    listed = cfg.n_layers if tensors_held is None else min(cfg.n_layers, max(tensors_held, 1))
    for layer in range(listed):
        for template, shape in shapes.items():
            if template.startswith("layers."):
                add(template.replace("{i}", str(layer)), shape)
    add("norm.weight", shapes["norm.weight"])
    if cfg.tie_embeddings:
        tied["output.weight"] = "tok_embeddings.weight"
    else:
        add("output.weight", shapes["output.weight"])
    return ModelSpec(
        scheme=SCHEMES[cfg.target_scheme], tensors=tensors, tied=tied, dtype=cfg.dtype, config=cfg,
        source=cfg.source,
    )


def require_layers_held(cfg: ModelConfig, tensors_held: int) -> None:
    """Refuse to build the config's model for a checkpoint that holds fewer tensors than the config has
    layers: it cannot be this model, and building 10**9 layers, even on the meta device, never ends."""
    if cfg.n_layers > tensors_held:
        raise InputError(cfg.source, f"field {cfg.field_name('n_layers')}", f"{cfg.n_layers} layers, but the "
                         f"checkpoint holds {tensors_held} entries: it cannot be this model")


def build_factory_model(target: str, config: ModelConfig | None = None) -> Any:
    """Call ``module:function`` (with the config's raw JSON if it takes a parameter) and return its
    ``nn.Module``; the caller chooses the device (ckptcheck always builds on meta first)."""
    import torch

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(None, "--model-factory", f"expected module:function, got {target!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(None, "--model-factory", f"cannot import {target}: {exc}") from None
    try:
        takes_arg = bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        takes_arg = False
    try:
        model = fn(config.raw if config is not None else {}) if takes_arg else fn()
    except Exception as exc:
        raise InputError(None, "--model-factory", f"{target} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(None, "--model-factory", f"{target} returned {type(model).__name__}, not an nn.Module")
    return model


def spec_from_factory(target: str, config: ModelConfig | None = None) -> ModelSpec:
    """Build ``module:function``'s model on the meta device and expect its state dict.

    Building on the meta device allocates no memory, so a 70B factory costs what a 1B one does.
    """
    import torch

    with torch.device("meta"):
        model = build_factory_model(target, config)
    state = model.state_dict(keep_vars=True)
    first_key: dict[int, str] = {}
    tied_raw: dict[str, str] = {}
    for key, value in state.items():
        ident = id(value)
        if ident in first_key:
            tied_raw[key] = first_key[ident]
        else:
            first_key[ident] = key
    mapping = map_keys(state)
    scheme = mapping.scheme if not mapping.unknown and not mapping.buffers else CUSTOM
    to_key = (lambda k: mapping.canonical[k]) if not scheme.is_custom else (lambda k: k)
    tensors = {
        to_key(k): ExpectedTensor(to_key(k), tuple(v.shape)) for k, v in state.items() if k not in tied_raw
    }
    tied = {to_key(k): to_key(v) for k, v in tied_raw.items()}
    return ModelSpec(scheme=scheme, tensors=tensors, tied=tied, config=config, source=target)
