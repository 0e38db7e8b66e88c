"""Synthetic Llama-family checkpoints, for fixtures, tests and benchmarks.

Random weights with the right shapes in canonical (Meta) naming and layout, moved to any scheme with
the same renaming and rotary re-layout the converters use, and AdamW state shaped as lingua saves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import dtypes
from .configs import ModelConfig
from .layouts import change_rotary
from .naming import Scheme
from .spec import spec_from_config

if TYPE_CHECKING:
    import torch


def random_state_dict(cfg: ModelConfig, *, dtype: str = "bfloat16", seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical keys, Meta layout; norms near 1, projections ~N(0, 0.02) like an initialised model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, expected in spec_from_config(cfg).tensors.items():
        shape = tuple(cfg.vocab_size if d is None else d for d in expected.shape)
        if len(shape) == 1 and not key.endswith(".bias"):  # norms
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        out[key] = t.to(dtypes.to_torch(dtype))
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def in_scheme(state: dict[str, torch.Tensor], scheme: Scheme, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A canonical state dict renamed into ``scheme`` with its rotary layout."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = scheme.from_canonical(key)
        if name is None:
            raise ValueError(f"{scheme.name} has no name for {key}")
        out[name] = change_rotary(key, t, "interleaved", scheme.rotary, cfg.n_heads, cfg.n_kv_heads)
    return out


def adamw_state(state: dict[str, torch.Tensor], *, step: int = 10, lr: float = 3e-4, seed: int = 1) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, as ``get_state_dict`` returns it (lingua, torchtitan)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    per_param: dict[str, Any] = {}
    for name, p in state.items():
        per_param[name] = {
            "step": torch.tensor(float(step)),
            "exp_avg": (1e-3 * torch.randn(p.shape, generator=gen)).to(p.dtype),
            "exp_avg_sq": (1e-6 * torch.rand(p.shape, generator=gen)).to(p.dtype),
        }
    group = {"lr": lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
             "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
             "params": list(state)}
    return {"state": per_param, "param_groups": [group]}


def write_meta_shards(state: dict[str, torch.Tensor], folder: Path, shards: int, *, llama3: bool = False) -> None:
    """Split a state dict into Meta's ``consolidated.NN.pth`` files the way Meta's releases are split."""
    import torch

    from .formats.meta_shards import split_dim
    from .naming import map_keys

    mapping = map_keys(state)
    norm = state.get(mapping.stored_for("norm.weight") or "norm.weight")
    model_dim = int(norm.shape[0]) if norm is not None else None
    for rank in range(shards):
        shard = {}
        for key, t in state.items():
            canonical = mapping.canonical.get(key)
            dim = split_dim(canonical, tuple(t.shape), model_dim, shards)
            if canonical == "tok_embeddings.weight" and dim is not None and not llama3:
                dim = 1  # Llama 1/2 split the embeddings on dim 1
            shard[key] = t.clone() if dim is None else t.chunk(shards, dim=dim)[rank].clone()
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
