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
from .bounded_json import shown
from .errors import InputError
from .files import open_binary

CONFIG_NAMES = ("params.json", "config.json")
# Bounds of each kind of JSON file read whole: (bytes, values).  Real configs and training-state files are a
# few KB; a shard index lists every tensor (a few hundred KB for the largest published models).
JSON_LIMITS = {"config": (1 << 20, 1 << 16), "index": (16 << 20, 1 << 22)}
HF_LLAMA_TYPES = ("llama", "mistral")
ROTARY_PAIRS = "rotary embeddings turn pairs of dimensions"
# Meta's vocab_size that leaves the vocabulary to the tokenizer.
META_TOKENIZER_VOCAB = -1
# transformers' default RoPE needs no parameters besides theta.
HF_PLAIN_ROPE = "default"
# Meta's use_scaled_rope: Llama 3.1's frequency scaling, as transformers names it.
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
# Rotary scaling parameters that are numbers (transformers' rope_parameters); lists of numbers are LongRoPE's
# factors; any other parameter is a flag, a name or null.
ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# The key ckptcheck adds to every config it writes, naming the config it was written from: such a file restates
# the config it came from and is never evidence for it (``written_by_ckptcheck``; transformers keeps unknown
# config.json keys as attributes, lingua reads only params.json's "model" section).
PROVENANCE_KEY = "ckptcheck_written_from"

# The largest value of each number a config sets, by canonical name: far above every published model (so only a
# corrupt or hostile config reaches one), and low enough that nothing computed from it is slow or large (the
# rotary table is head_dim / 2 wide).  Every such number must also be positive and finite, and the integers
# JSON integers (4096, not 4096.0, 1e308 or true).  n_layers is bounded by the weights rather than here: the
# spec lists no more layers than the checkpoint holds (``spec.spec_from_config``), so a config asking for far
# more layers than the weights have is a config[n_layers] failure, found in time linear in the checkpoint.
LIMITS: dict[str, int | float] = {
    "dim": 1 << 20, "n_layers": 1 << 31, "n_heads": 1 << 16, "n_kv_heads": 1 << 16, "head_dim": 1 << 16,
    "vocab_size": 1 << 31, "ffn_dim": 1 << 24, "multiple_of": 1 << 24, "max_seq_len": 1 << 31,
    "ffn_dim_multiplier": 1e3, "norm_eps": 1.0, "rope_theta": 1e30, "rope_scaling": 1e30,
}


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
    # The context length the config states (lingua max_seqlen, Meta max_seq_len, HF max_position_embeddings).
    max_seq_len: int | None = None
    # canonical dimension name -> how this file spells it, for messages ("dim" -> "hidden_size").
    fields: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        """Also what the loaders derive (Meta's FFN width, head_dim = dim / n_heads) stays within ``LIMITS``."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if (value is not None or name not in ("vocab_size", "max_seq_len")) and (why := count_error(name, value)):
                self._bad(name, why)
        for name in ("norm_eps", "rope_theta"):
            if why := number_error(name, getattr(self, name)):
                self._bad(name, why)
        if self.n_heads % self.n_kv_heads:
            self._bad("n_kv_heads", f"{self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if why := head_size_error(self.head_dim):  # the field to edit: head_dim where stated, else n_heads
            if self.states("head_dim"):
                self._bad("head_dim", why)
            self._bad("n_heads", f"dim / n_heads = {self.dim} / {self.n_heads} = {self.head_dim}, an odd head size: "
                      + ROTARY_PAIRS)

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


def count_error(name: str, value: Any) -> str | None:
    """Why ``value`` is no valid integer ``name`` (a positive JSON integer up to ``LIMITS[name]``), or None."""
    if not isinstance(value, int) or isinstance(value, bool):
        return f"must be an integer, got {shown(value)}"
    if value <= 0:
        return f"must be a positive integer, got {value}"
    if value > LIMITS[name]:
        return f"{value} is over {LIMITS[name]}, more than any model has"
    return None


def head_size_error(head_dim: int) -> str | None:
    """Why ``head_dim`` is no head size (rotary embeddings turn pairs of dimensions, so it is even), or None:
    the one rule for every head size ckptcheck reads, accepts from a flag, writes or proposes."""
    return f"{head_dim} is odd: {ROTARY_PAIRS}" if head_dim % 2 else None


def number_error(name: str, value: Any) -> str | None:
    """Why ``value`` is no valid number ``name`` (positive, finite, up to ``LIMITS[name]``), or None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"must be a number, got {shown(value)}"
    if not math.isfinite(value) or value <= 0:
        return f"must be a positive finite number, got {value}"
    if value > LIMITS[name]:
        return f"{value} is over {LIMITS[name]:g}, more than any model has"
    return None


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


def read_json(path: Path, kind: str = "config") -> dict[str, Any]:
    """A JSON object file of ``kind`` (a key of ``JSON_LIMITS``), bounded in size and number of values by that
    kind, and in nesting and digits (``bounded_json``)."""
    max_bytes, max_values = JSON_LIMITS[kind]
    with open_binary(path) as f:  # a FIFO or device is refused, not read forever
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise InputError(path, None, f"{size} bytes is too large for {kind} JSON (limit {max_bytes})")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise InputError(path, None, f"grew past {max_bytes} bytes while being read (limit for {kind} JSON)")
    data = bounded_json.loads(raw, path, max_values=max_values)
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

    def count(self, name: str, canonical: str, default: Any = ...) -> Any:
        """The integer field ``name`` (``canonical`` names its limit), or ``default`` when absent or null."""
        value = self.data.get(name)
        if value is None:
            if default is ...:
                raise self._err(name, "missing")
            return default
        if why := count_error(canonical, value):
            raise self._err(name, why)
        return value

    def number(self, name: str, canonical: str, default: Any = None) -> Any:
        """The number field ``name`` as a float, or ``default`` when absent or null."""
        value = self.data.get(name)
        if value is None:
            return default
        if why := number_error(canonical, value):
            raise self._err(name, why)
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if isinstance(value, bool):
            return value
        raise self._err(name, f"must be true or false, got {shown(value)}")


def _heads(f: _Fields, dim: int, dim_field: str, heads_field: str, kv_field: str) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim): KV heads default to the heads, head_dim to dim / heads."""
    n_heads = f.count(heads_field, "n_heads")
    n_kv = f.count(kv_field, "n_kv_heads", n_heads)
    head_dim = f.count("head_dim", "head_dim", None)
    if head_dim is None:
        if dim % n_heads:
            raise f._err(heads_field, f"{n_heads} does not divide {dim_field}={dim} and no head_dim is given")
        head_dim = dim // n_heads
    return n_heads, n_kv, head_dim


def _from_meta_like(path: Path, model: dict[str, Any], *, schema: str, raw: dict[str, Any]) -> ModelConfig:
    prefix = "model." if schema == "lingua" else ""
    f = _Fields(path, model, prefix)
    dim = f.count("dim", "dim")
    n_heads, n_kv, head_dim = _heads(f, dim, "dim", "n_heads", "n_kv_heads")
    # Meta's -1: set from the tokenizer at load time.
    stated_vocab = model.get("vocab_size")
    tokenizer_vocab = type(stated_vocab) is int and stated_vocab == META_TOKENIZER_VOCAB
    vocab = None if tokenizer_vocab else f.count("vocab_size", "vocab_size", None)
    multiple_of = f.count("multiple_of", "multiple_of", 256)
    multiplier = f.number("ffn_dim_multiplier", "ffn_dim_multiplier")
    ffn_dim = ffn_hidden(dim, multiple_of, multiplier)
    seq_field = "max_seqlen" if "max_seqlen" in model else "max_seq_len"
    # Neither schema states a storage dtype: Meta's has none, and lingua's distributed.model_dtype is the
    # mixed-precision compute dtype (lingua keeps fp32 master weights), not what the checkpoint holds.
    return ModelConfig(
        source=str(path), schema=schema, dim=dim,
        n_layers=f.count("n_layers", "n_layers"),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, vocab_size=vocab, ffn_dim=ffn_dim,
        tie_embeddings=f.bool("weight_tying", False) if schema == "lingua" else False,
        norm_eps=f.number("norm_eps", "norm_eps", 1e-5),
        rope_theta=f.number("rope_theta", "rope_theta", 10000.0),
        attention_bias=f.bool("attention_bias", False), mlp_bias=f.bool("mlp_bias", False),
        rope_scaling=dict(LLAMA3_ROPE_SCALING) if f.bool("use_scaled_rope", False) else None,
        max_seq_len=f.count(seq_field, "max_seq_len", None),
        fields={
            "dim": prefix + "dim", "n_layers": prefix + "n_layers", "n_heads": prefix + "n_heads",
            "n_kv_heads": prefix + "n_kv_heads", "head_dim": prefix + "head_dim",
            "vocab_size": prefix + "vocab_size",
            "ffn_dim": f"{prefix}ffn_dim_multiplier/{prefix}multiple_of",
            "tie_embeddings": prefix + "weight_tying", "norm_eps": prefix + "norm_eps",
            "rope_theta": prefix + "rope_theta", "max_seq_len": prefix + seq_field,
        },
        raw=raw,
    )


def _from_hf(path: Path, data: dict[str, Any]) -> ModelConfig:
    f = _Fields(path, data)
    model_type = data.get("model_type")
    if model_type is not None and model_type not in HF_LLAMA_TYPES:
        raise InputError(
            path, "field model_type",
            f"{shown(model_type)} is not a Llama-family architecture ({', '.join(HF_LLAMA_TYPES)}); "
            "describe other models with --model-factory",
        )
    dim = f.count("hidden_size", "dim")
    n_heads, n_kv, head_dim = _heads(f, dim, "hidden_size", "num_attention_heads", "num_key_value_heads")
    # transformers 4 writes torch_dtype, 5 writes dtype: the first one stated (a null states nothing).
    dtype_field = next((name for name in ("torch_dtype", "dtype") if data.get(name) is not None), "torch_dtype")
    dtype_name = data.get(dtype_field)
    rope_field, rope_theta, scaling = _hf_rope(f, data)
    dtype = None
    if dtype_name is not None:
        try:
            dtype = dtypes.canonical(str(dtype_name))
        except InputError:
            raise f._err(dtype_field, f"unknown dtype {shown(dtype_name)}") from None
    return ModelConfig(
        source=str(path), schema="hf", dim=dim,
        n_layers=f.count("num_hidden_layers", "n_layers"),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab_size=f.count("vocab_size", "vocab_size"),
        ffn_dim=f.count("intermediate_size", "ffn_dim"),
        tie_embeddings=f.bool("tie_word_embeddings", False),
        dtype=dtype,
        norm_eps=f.number("rms_norm_eps", "norm_eps", 1e-6),
        max_seq_len=f.count("max_position_embeddings", "max_seq_len", None),
        rope_theta=rope_theta, rope_scaling=scaling,
        attention_bias=f.bool("attention_bias", False), mlp_bias=f.bool("mlp_bias", False),
        fields={
            "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
            "ffn_dim": "intermediate_size", "tie_embeddings": "tie_word_embeddings", "norm_eps": "rms_norm_eps",
            "rope_theta": rope_field, "max_seq_len": "max_position_embeddings",
        },
        raw=data,
    )


def _hf_rope(f: _Fields, data: dict[str, Any]) -> tuple[str, float, dict[str, Any] | None]:
    """(the field theta is read from, rope_theta, scaling or None), as transformers reads them: 4.x wrote
    top-level rope_theta and rope_scaling, 5.x writes one rope_parameters {rope_theta, rope_type, ...}.
    Like transformers, rope_scaling wins over rope_parameters, and theta in the dict over the top level."""
    name = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
    params = data.get(name) or {}
    if not isinstance(params, dict):
        raise f._err(name, f"must be an object, got {shown(params)}")
    sub = _Fields(f.path, params, name + ".")
    theta_field = name + ".rope_theta" if params.get("rope_theta") is not None else "rope_theta"
    theta = (sub if theta_field != "rope_theta" else f).number(theta_field.split(".")[-1], "rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", HF_PLAIN_ROPE))
    if not isinstance(kind, str):
        raise sub._err("rope_type", f"must be a string, got {shown(kind)}")
    for key, value in params.items():
        _scaling_value(sub, key, value)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")} | {"rope_type": kind}
    return theta_field, theta, (None if kind == HF_PLAIN_ROPE else scaling)


def _scaling_value(f: _Fields, key: str, value: Any) -> None:
    """A rotary scaling parameter is a positive finite number (``ROPE_NUMBERS``: factor, low_freq_factor, ...,
    a boolean is none), a list of them (LongRoPE's factors: no nulls), or else a flag, a name or null."""
    if value is None or isinstance(value, (bool, str)) and key not in ROPE_NUMBERS:
        return
    for number in value if isinstance(value, list) else [value]:
        if why := number_error("rope_scaling", number):
            raise f._err(key, why)


def to_lingua_params(cfg: ModelConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """The config as a lingua params.json (the raw file when it already is one); ``vocab_size``, the
    rows of the embedding written, fills in a vocabulary the config left to the tokenizer."""
    if cfg.schema == "lingua":
        if cfg.vocab_size is not None or vocab_size is None:
            return _marked(cfg, cfg.raw)
        return _marked(cfg, {**cfg.raw, "model": {**cfg.raw["model"], "vocab_size": vocab_size}})
    return _marked(cfg, {"model": _meta_model_fields(cfg, vocab_size)})


def _marked(cfg: ModelConfig, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the provenance mark: the config it was written from (the first one, when that one was
    itself written by ckptcheck)."""
    return {**data, PROVENANCE_KEY: cfg.raw.get(PROVENANCE_KEY, cfg.source)}


def written_by_ckptcheck(cfg: ModelConfig) -> bool:
    """Whether ckptcheck wrote this config (from another one): it restates that config, so it witnesses nothing."""
    return PROVENANCE_KEY in cfg.raw


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
    if cfg.max_seq_len is not None:
        out["max_seqlen"] = cfg.max_seq_len
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


def to_hf_config(cfg: ModelConfig, dtype: str, vocab_size: int | None = None) -> dict[str, Any]:
    """The config as a transformers LlamaConfig config.json for weights stored as ``dtype`` (transformers
    loads them as the config's torch_dtype says); ``vocab_size``, the embedding's rows, fills in a
    vocabulary the config left to the tokenizer (Meta's -1)."""
    if cfg.schema == "hf":
        data = dict(cfg.raw)
        data["torch_dtype"] = dtype
        if "dtype" in data:
            data["dtype"] = dtype
        return _marked(cfg, data)
    vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if vocab is None:
        raise InputError(cfg.source, "field vocab_size", "is left to the tokenizer and no embedding gives it: "
                         "a config.json needs a vocab_size")
    data: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": vocab, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "max_position_embeddings": cfg.max_seq_len or 8192,
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling is not None:
        data["rope_scaling"] = dict(cfg.rope_scaling)
    return _marked(cfg, data)
