"""Model configs: lingua ``params.json``, Meta ``params.json`` and Hugging Face ``config.json``.

All three become one ``ModelConfig`` with the dimensions a Llama-family model needs.  The config
remembers which field of its own file each dimension came from, so a mismatch can name that field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bounded_json, dtypes
from .bounded_json import reject_duplicate_keys  # noqa: F401  (formats.safetensors_files imports it here)
from .errors import InputError
from .files import open_binary

MAX_CONFIG_BYTES = 16 << 20
CONFIG_NAMES = ("params.json", "config.json")
HF_LLAMA_TYPES = ("llama", "mistral")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    source: str
    schema: str  # "lingua", "meta" or "hf"
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int | None  # None: the config leaves it to the tokenizer (Meta's -1)
    ffn_dim: int
    tie_embeddings: bool
    # The storage dtype the config states (HF torch_dtype), or None when it states none.
    dtype: str | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Biases (HF attention_bias: q/k/v/o projections; mlp_bias: gate/up/down), absent in Meta's Llama.
    attention_bias: bool = False
    mlp_bias: bool = False
    # HF rotary scaling (rope_type and its parameters, without rope_theta), or None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    # canonical dimension name -> how this file spells it, for messages ("dim" -> "hidden_size").
    fields: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                self._bad(name, f"must be a positive integer, got {value!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size <= 0):
            self._bad("vocab_size", f"must be a positive integer, got {self.vocab_size!r}")
        if self.n_heads % self.n_kv_heads:
            self._bad("n_kv_heads", f"{self.n_kv_heads} does not divide n_heads={self.n_heads}")

    def _bad(self, name: str, why: str) -> None:
        raise InputError(self.source, f"field {self.fields.get(name, name)}", why)

    @property
    def target_scheme(self) -> str:
        return "hf" if self.schema == "hf" else "meta"

    def field_name(self, canonical: str) -> str:
        return self.fields.get(canonical, canonical)

    def states(self, canonical: str) -> bool:
        """Whether the file itself states the field (rather than leaving it to a default): only a stated
        value is evidence of what the training run used."""
        node: Any = self.raw
        for part in self.field_name(canonical).split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return node is not None

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.source, "schema": self.schema, "dim": self.dim, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "ffn_dim": self.ffn_dim, "tie_embeddings": self.tie_embeddings,
            "dtype": self.dtype,
        }


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta/lingua FFN width: 2/3 of 4*dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def find_config(path: str | Path) -> Path:
    """A config file path, or the config inside a folder (params.json, then config.json)."""
    p = Path(path)
    if p.is_dir():
        for name in CONFIG_NAMES:
            if (p / name).is_file():
                return p / name
        raise InputError(p, None, f"no {' or '.join(CONFIG_NAMES)} in this folder")
    if not p.exists():
        raise InputError(p, None, "no such file")
    return p


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file (config, index), bounded in size, nesting and digits (``bounded_json``)."""
    with open_binary(path) as f:  # a FIFO or device is refused, not read forever
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            raise InputError(path, None, f"{size} bytes is too large for a config (limit {MAX_CONFIG_BYTES})")
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise InputError(path, None, f"grew past {MAX_CONFIG_BYTES} bytes while being read (limit for a config)")
    data = bounded_json.loads(raw, path)
    if not isinstance(data, dict):
        raise InputError(path, None, f"expected a JSON object, found {type(data).__name__}")
    return data


def load_config(path: str | Path) -> ModelConfig:
    """Read and validate a model config of any supported schema."""
    p = find_config(path)
    data = read_json(p)
    if isinstance(data.get("model"), dict):
        return _from_meta_like(p, data["model"], schema="lingua", raw=data)
    if "hidden_size" in data or "model_type" in data or "architectures" in data:
        return _from_hf(p, data)
    if "dim" in data and "n_layers" in data:
        return _from_meta_like(p, data, schema="meta", raw=data)
    raise InputError(
        p, None,
        "not a model config ckptcheck knows: expected lingua params.json ({\"model\": {...}}), "
        "Meta params.json (dim, n_layers, ...) or Hugging Face config.json (hidden_size, ...)",
    )


class _Fields:
    """Typed access to a config's fields with errors that name the field."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, data, prefix

    def _err(self, name: str, why: str) -> InputError:
        return InputError(self.path, f"field {self.prefix}{name}", why)

    def int(self, name: str, default: Any = ...) -> Any:
        value = self.data.get(name, default)
        if value is ...:
            raise self._err(name, "missing")
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise self._err(name, f"must be an integer, got {value!r}")

    def float(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name, default)
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None if value is None else float(value)
        raise self._err(name, f"must be a number, got {value!r}")

    def bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if isinstance(value, bool):
            return value
        raise self._err(name, f"must be true or false, got {value!r}")


def _positive(f: _Fields, name: str, value: Any) -> int:
    if not isinstance(value, int) or value <= 0:
        raise f._err(name, f"must be a positive integer, got {value!r}")
    return value


def _heads(f: _Fields, dim: int, dim_field: str, heads_field: str, kv_field: str) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim): KV heads default to the heads, head_dim to dim / heads."""
    n_heads = _positive(f, heads_field, f.int(heads_field))
    n_kv = f.int(kv_field, None)
    n_kv = n_heads if n_kv is None else _positive(f, kv_field, n_kv)
    head_dim = f.int("head_dim", None)
    if head_dim is None:
        if dim % n_heads:
            raise f._err(heads_field, f"{n_heads} does not divide {dim_field}={dim} and no head_dim is given")
        head_dim = dim // n_heads
    return n_heads, n_kv, _positive(f, "head_dim", head_dim)


def _from_meta_like(path: Path, model: dict[str, Any], *, schema: str, raw: dict[str, Any]) -> ModelConfig:
    prefix = "model." if schema == "lingua" else ""
    f = _Fields(path, model, prefix)
    dim = _positive(f, "dim", f.int("dim"))
    n_heads, n_kv, head_dim = _heads(f, dim, "dim", "n_heads", "n_kv_heads")
    vocab = f.int("vocab_size", None)
    if vocab is not None and vocab < 0:
        vocab = None  # Meta's -1: set from the tokenizer at load time
    multiple_of = _positive(f, "multiple_of", f.int("multiple_of", 256))
    multiplier = f.float("ffn_dim_multiplier", None)
    if multiplier is not None and multiplier <= 0:
        raise f._err("ffn_dim_multiplier", f"must be positive, got {multiplier}")
    ffn_dim = ffn_hidden(dim, multiple_of, multiplier)
    # Neither schema states a storage dtype: Meta's has none, and lingua's distributed.model_dtype is the
    # mixed-precision compute dtype (lingua keeps fp32 master weights), not what the checkpoint holds.
    return ModelConfig(
        source=str(path), schema=schema, dim=dim,
        n_layers=_positive(f, "n_layers", f.int("n_layers")),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, vocab_size=vocab, ffn_dim=ffn_dim,
        tie_embeddings=f.bool("weight_tying", False) if schema == "lingua" else False,
        norm_eps=f.float("norm_eps", 1e-5) or 1e-5,
        rope_theta=f.float("rope_theta", 10000.0) or 10000.0,
        attention_bias=f.bool("attention_bias", False), mlp_bias=f.bool("mlp_bias", False),
        rope_scaling=dict(LLAMA3_ROPE_SCALING) if model.get("use_scaled_rope") else None,
        fields={
            "dim": prefix + "dim", "n_layers": prefix + "n_layers", "n_heads": prefix + "n_heads",
            "n_kv_heads": prefix + "n_kv_heads", "head_dim": prefix + "head_dim",
            "vocab_size": prefix + "vocab_size",
            "ffn_dim": f"{prefix}ffn_dim_multiplier/{prefix}multiple_of",
            "tie_embeddings": prefix + "weight_tying", "norm_eps": prefix + "norm_eps",
            "rope_theta": prefix + "rope_theta",
        },
        raw=raw,
    )


def _from_hf(path: Path, data: dict[str, Any]) -> ModelConfig:
    f = _Fields(path, data)
    model_type = data.get("model_type")
    if model_type is not None and model_type not in HF_LLAMA_TYPES:
        raise InputError(
            path, "field model_type",
            f"{model_type!r} is not a Llama-family architecture ({', '.join(HF_LLAMA_TYPES)}); "
            "describe other models with --model-factory",
        )
    dim = _positive(f, "hidden_size", f.int("hidden_size"))
    n_heads, n_kv, head_dim = _heads(f, dim, "hidden_size", "num_attention_heads", "num_key_value_heads")
    dtype_name = data.get("torch_dtype", data.get("dtype"))
    rope_field, rope_theta, scaling = _hf_rope(f, data)
    dtype = None
    if dtype_name is not None:
        try:
            dtype = dtypes.canonical(str(dtype_name))
        except InputError:
            raise f._err("torch_dtype", f"unknown dtype {dtype_name!r}") from None
    return ModelConfig(
        source=str(path), schema="hf", dim=dim,
        n_layers=_positive(f, "num_hidden_layers", f.int("num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab_size=_positive(f, "vocab_size", f.int("vocab_size")),
        ffn_dim=_positive(f, "intermediate_size", f.int("intermediate_size")),
        tie_embeddings=f.bool("tie_word_embeddings", False),
        dtype=dtype,
        norm_eps=f.float("rms_norm_eps", 1e-6) or 1e-6,
        rope_theta=rope_theta, rope_scaling=scaling,
        attention_bias=f.bool("attention_bias", False), mlp_bias=f.bool("mlp_bias", False),
        fields={
            "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
            "ffn_dim": "intermediate_size", "tie_embeddings": "tie_word_embeddings", "norm_eps": "rms_norm_eps",
            "rope_theta": rope_field,
        },
        raw=data,
    )


# transformers' default RoPE needs no parameters besides theta.
HF_PLAIN_ROPE = "default"


def _hf_rope(f: _Fields, data: dict[str, Any]) -> tuple[str, float, dict[str, Any] | None]:
    """(the field theta is read from, rope_theta, scaling or None), as transformers reads them: 4.x wrote
    top-level rope_theta and rope_scaling, 5.x writes one rope_parameters {rope_theta, rope_type, ...}.
    Like transformers, rope_scaling wins over rope_parameters, and theta in the dict over the top level."""
    name = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
    params = data.get(name) or {}
    if not isinstance(params, dict):
        raise f._err(name, f"must be an object, got {params!r}")
    sub = _Fields(f.path, params, name + ".")
    theta_field = name + ".rope_theta" if params.get("rope_theta") is not None else "rope_theta"
    theta = (sub.float("rope_theta") if theta_field != "rope_theta" else f.float("rope_theta")) or 10000.0
    if theta <= 0:
        raise f._err(theta_field, f"must be positive, got {theta}")
    kind = params.get("rope_type", params.get("type", HF_PLAIN_ROPE))
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")} | {"rope_type": kind}
    return theta_field, theta, (None if kind == HF_PLAIN_ROPE else scaling)


def to_lingua_params(cfg: ModelConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """The config as a lingua params.json (the raw file when it already is one); ``vocab_size``, the
    rows of the embedding written, fills in a vocabulary the config left to the tokenizer."""
    if cfg.schema == "lingua":
        if cfg.vocab_size is not None or vocab_size is None:
            return cfg.raw
        return {**cfg.raw, "model": {**cfg.raw["model"], "vocab_size": vocab_size}}
    return {"model": _meta_model_fields(cfg, vocab_size)}


def _meta_model_fields(cfg: ModelConfig, vocab_size: int | None) -> dict[str, Any]:
    from .infer import ffn_params

    out: dict[str, Any] = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                           "n_kv_heads": cfg.n_kv_heads}
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        out["head_dim"] = cfg.head_dim
    vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    out["vocab_size"] = vocab if vocab is not None else -1
    out.update(ffn_params(cfg.dim, cfg.ffn_dim))
    out.update({"norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "weight_tying": cfg.tie_embeddings})
    out.update({name: True for name in ("attention_bias", "mlp_bias") if getattr(cfg, name)})
    if cfg.schema == "hf":
        out.update(_hf_positions_as_meta(cfg))
    return out


def _hf_positions_as_meta(cfg: ModelConfig) -> dict[str, Any]:
    """max_position_embeddings and rope_scaling as lingua/Meta spell them."""
    out: dict[str, Any] = {}
    if isinstance(cfg.raw.get("max_position_embeddings"), int):
        out["max_seqlen"] = cfg.raw["max_position_embeddings"]
    return out | scaling_as_meta(cfg)


def scaling_as_meta(cfg: ModelConfig) -> dict[str, Any]:
    """An HF rope scaling as lingua/Meta spell it; a scaling Meta's use_scaled_rope (Llama 3.1's fixed
    constants) cannot express is refused rather than silently dropped."""
    out: dict[str, Any] = {}
    scaling = cfg.rope_scaling
    if scaling is not None:
        if scaling != LLAMA3_ROPE_SCALING:
            field = "rope_scaling" if cfg.raw.get("rope_scaling") else "rope_parameters"
            raise InputError(cfg.source, f"field {field}", f"{scaling!r} has no params.json equivalent "
                             "(Meta's use_scaled_rope is Llama 3.1's scaling only); write --to hf or safetensors")
        out["use_scaled_rope"] = True
    return out


# Meta's use_scaled_rope: Llama 3.1's frequency scaling, as transformers names it.
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}


def to_hf_config(cfg: ModelConfig, dtype: str, vocab_size: int | None = None) -> dict[str, Any]:
    """The config as a transformers LlamaConfig config.json for weights stored as ``dtype`` (transformers
    loads them as the config's torch_dtype says); ``vocab_size``, the embedding's rows, fills in a
    vocabulary the config left to the tokenizer (Meta's -1)."""
    if cfg.schema == "hf":
        data = dict(cfg.raw)
        data["torch_dtype"] = dtype
        if "dtype" in data:
            data["dtype"] = dtype
        return data
    model = cfg.raw.get("model", cfg.raw) if isinstance(cfg.raw.get("model"), dict) else cfg.raw
    vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if vocab is None:
        raise InputError(cfg.source, "field vocab_size", "is left to the tokenizer and no embedding gives it: "
                         "a config.json needs a vocab_size")
    max_positions = model.get("max_seqlen", model.get("max_seq_len"))
    data: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": vocab, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "max_position_embeddings": int(max_positions or 8192),
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling is not None:
        data["rope_scaling"] = dict(cfg.rope_scaling)
    return data
