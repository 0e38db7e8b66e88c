"""Witnesses of the head split.  Shapes fix n_heads × head_dim and n_kv_heads × head_dim, never the
split itself, so head counts are verified only when something else in or beside the checkpoint
states head_dim: a rotary buffer, a per-head q/k norm, or a config the training run saved there.

A saved config is a witness only when it is another file, with other content, than the config under test
(a copy of the tested config agrees with it by construction), and only when every dimension the weights
show matches it (a stale config of another model two folders up describes something else).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .configs import CONFIG_NAMES, ModelConfig, head_size_error, load_config, written_by_ckptcheck
from .errors import InputError
from .infer import Inferred
from .manifest import TensorInfo

# Stored-key suffix -> (dimension of the shape that holds head_dim / 2, or -1 for a per-head norm, ndim).
# Meta's rope.freqs and HF's rotary inv_freq are [head_dim / 2]; freqs_cis is [seq, head_dim / 2, ...].
_WEIGHT_WITNESSES = (
    ("rope.freqs", 0, 1), ("rotary_emb.inv_freq", 0, 1), ("freqs_cis", 1, 0),
    ("q_norm.weight", -1, 1), ("k_norm.weight", -1, 1),
)
# How far up saved configs are looked for: the checkpoint's folder and two above it (a lingua step folder
# keeps params.json, and so does its consolidated/ subfolder; a DCP folder may sit two levels into a dump).
_CONFIG_LEVELS = 3


@dataclass(frozen=True)
class Witness:
    head_dim: int
    source: str  # "rope.freqs [4]", "the config saved at <path>"
    config: ModelConfig | None = None  # the saved config, when the witness is one
    # The stored key of a rotary frequency buffer (its values also witness rope_theta).
    frequencies: str | None = None


def head_dim_witnesses(tensors: Mapping[str, TensorInfo], inferred: Inferred, ckpt: str | os.PathLike[str],
                       tested: ModelConfig | None) -> list[Witness]:
    """Every witness of head_dim that fits the weights' q/k rows; the tested config (parsed once, by the
    caller) is not its own witness."""
    q, k = inferred.q_rows, inferred.kv_rows
    if q is None or k is None:
        return []
    found = [*_from_weights(tensors, q, k), *_from_saved_configs(ckpt, tested, inferred)]
    return [w for w in found if w.head_dim > 0 and not head_size_error(w.head_dim)
            and q % w.head_dim == 0 and k % w.head_dim == 0]


def _from_weights(tensors: Mapping[str, TensorInfo], q: int, k: int) -> list[Witness]:
    out: list[Witness] = []
    for key, info in tensors.items():
        for suffix, axis, ndim in _WEIGHT_WITNESSES:
            if not key.endswith(suffix) or (ndim and len(info.shape) != ndim) or len(info.shape) <= max(axis, 0):
                continue
            if axis < 0:  # a norm over one head; a norm over the whole projection says nothing
                rows = q if suffix.startswith("q") else k
                if info.shape[0] >= rows:
                    continue
                head_dim = info.shape[0]
            else:
                head_dim = 2 * info.shape[axis]
            frequencies = key if axis == 0 else None  # rope.freqs, inv_freq: [head_dim / 2] values
            out.append(Witness(head_dim, f"{key} {list(info.shape)}", frequencies=frequencies))
            break
    return out


def saved_configs(ckpt: str | os.PathLike[str], tested: str | None) -> list[Path]:
    """Configs in the checkpoint's folder and the two above it, other than the config under test."""
    p = Path(ckpt)
    if p.name == ".metadata":
        p = p.parent
    folder = p if p.is_dir() else p.parent
    out = []
    for level in range(_CONFIG_LEVELS):
        for name in CONFIG_NAMES:
            candidate = folder / name
            if candidate.is_file() and not (tested and _same(candidate, Path(tested))):
                out.append(candidate)
        if folder.parent == folder:
            break
        folder = folder.parent
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _from_saved_configs(ckpt: str | os.PathLike[str], tested: ModelConfig | None,
                        inferred: Inferred) -> list[Witness]:
    # A copy of the tested config beside the checkpoint is the config under test again, not evidence for it.
    copied = tested.raw if tested else None
    out = []
    for path in saved_configs(ckpt, tested.source if tested else None):
        cfg = _describes(path, inferred)
        if cfg is not None and (copied is None or cfg.raw != copied) and not written_by_ckptcheck(cfg):
            out.append(Witness(cfg.head_dim, f"the config saved at {path}", cfg))
    return out


def saved_with(ckpt: Path, cfg: ModelConfig) -> bool:
    """Whether ``cfg`` is the config the training run saved in the checkpoint's own folder (an HF folder's
    config.json, a lingua step folder's params.json): not one ckptcheck wrote, which restates another config."""
    folder = ckpt.parent if ckpt.name == ".metadata" or not ckpt.is_dir() else ckpt
    try:
        beside = Path(cfg.source).resolve().parent == folder.resolve()
    except OSError:
        return False
    return beside and not written_by_ckptcheck(cfg)


def written_with_split(ckpt: Path, cfg: ModelConfig) -> Path | None:
    """A config ckptcheck wrote in the checkpoint's own folder with ``cfg``'s head split: the split ckptcheck
    permuted these weights' q/k rows with, so permuting them back with it restores them exactly.  It confirms
    a conversion's permutation, never a check's verdict (it restates the config it was written from)."""
    folder = ckpt.parent if ckpt.name == ".metadata" or not ckpt.is_dir() else ckpt
    split = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    for name in CONFIG_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            saved = load_config(path)
        except InputError:
            continue
        if written_by_ckptcheck(saved) and (saved.n_heads, saved.n_kv_heads, saved.head_dim) == split:
            return path
    return None


def _describes(path: Path, inferred: Inferred) -> ModelConfig | None:
    """The saved config when it describes these weights: every dimension the weights show must match (a
    config of another model, or of another size of this one, witnesses nothing)."""
    try:
        cfg = load_config(path)
    except InputError:
        return None
    shown = {"dim": cfg.dim, "n_layers": cfg.n_layers, "ffn_dim": cfg.ffn_dim, "tied": cfg.tie_embeddings,
             "q_rows": cfg.n_heads * cfg.head_dim, "kv_rows": cfg.n_kv_heads * cfg.head_dim,
             "vocab_size": cfg.vocab_size}
    fits = all(getattr(inferred, name) in (None, value) for name, value in shown.items()
               if not (name == "vocab_size" and value is None))  # Meta's -1 leaves the vocabulary to the tokenizer
    return cfg if fits else None
