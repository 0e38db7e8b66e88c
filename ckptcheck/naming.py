"""Key-naming schemes of the Llama family and the mapping between them.

ckptcheck's canonical naming is Meta/lingua's (``layers.0.attention.wq.weight``).  Each scheme maps its
keys to and from canonical ones by templates; ``{i}`` is a layer index.  Schemes also say how they lay
out q/k rows for rotary embeddings (Meta rotates interleaved pairs, Hugging Face rotates halves), which
the converters need and which shapes cannot reveal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

# Canonical (Meta/lingua) templates, in a stable order used everywhere keys are listed by role.
CANONICAL = (
    "tok_embeddings.weight",
    "layers.{i}.attention.wq.weight",
    "layers.{i}.attention.wk.weight",
    "layers.{i}.attention.wv.weight",
    "layers.{i}.attention.wo.weight",
    "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w2.weight",
    "layers.{i}.feed_forward.w3.weight",
    "layers.{i}.attention_norm.weight",
    "layers.{i}.ffn_norm.weight",
    "norm.weight",
    "output.weight",
    # Biases, present when the config asks for them (HF attention_bias: q/k/v/o; mlp_bias: gate/down/up).
    "layers.{i}.attention.wq.bias",
    "layers.{i}.attention.wk.bias",
    "layers.{i}.attention.wv.bias",
    "layers.{i}.attention.wo.bias",
    "layers.{i}.feed_forward.w1.bias",
    "layers.{i}.feed_forward.w2.bias",
    "layers.{i}.feed_forward.w3.bias",
)


@dataclass(frozen=True)
class Scheme:
    name: str
    title: str
    # "interleaved" (Meta, lingua, torchtitan) or "half" (Hugging Face) rotary layout of wq/wk rows.
    rotary: str
    # Scheme templates, positionally matching CANONICAL; None for a custom (identity) scheme.
    templates: tuple[str, ...] | None
    # Keys that are buffers, not parameters: loaders ignore them (rope.freqs, rotary inv_freq, freqs_cis).
    buffers: tuple[str, ...] = ()

    @property
    def is_custom(self) -> bool:
        return self.templates is None

    @cached_property
    def _to_canonical(self) -> _Table:
        assert self.templates is not None
        return _table(self.templates, CANONICAL)

    @cached_property
    def _from_canonical(self) -> _Table:
        assert self.templates is not None
        return _table(CANONICAL, self.templates)

    @cached_property
    def _buffers(self) -> re.Pattern[str] | None:
        return _table(self.buffers, self.buffers).pattern if self.buffers else None

    def to_canonical(self, key: str) -> str | None:
        if self.templates is None:
            return key
        return self._to_canonical.apply(key)

    def from_canonical(self, key: str) -> str | None:
        if self.templates is None:
            return key
        return self._from_canonical.apply(key)

    def is_buffer(self, key: str) -> bool:
        return self._buffers is not None and self._buffers.fullmatch(key) is not None


@dataclass(frozen=True)
class _Table:
    """Templates compiled into one alternation, so a key is matched once rather than once per template (a
    checkpoint may hold 100,000 keys); the first template that matches wins, as the alternation tries them in
    order.  Alternative ``n`` is the group ``t<n>``, its layer index (if any) the group ``i<n>``."""

    pattern: re.Pattern[str]
    targets: tuple[str, ...]
    indexed: tuple[bool, ...]

    def apply(self, key: str) -> str | None:
        m = self.pattern.fullmatch(key)
        if m is None:
            return None
        n = int(m.lastgroup[1:])  # type: ignore[index]  # the outer group closes last
        return self.targets[n].replace("{i}", m.group(f"i{n}")) if self.indexed[n] else self.targets[n]


def _table(sources: tuple[str, ...], targets: tuple[str, ...]) -> _Table:
    alternatives = "|".join(
        f"(?P<t{n}>{re.escape(s).replace(re.escape('{i}'), f'(?P<i{n}>[0-9]+)')})" for n, s in enumerate(sources)
    )
    return _Table(re.compile(alternatives), tuple(targets), tuple("{i}" in s for s in sources))


_COMMON_BUFFERS = ("rope.freqs", "rope.inv_freq", "freqs_cis", "layers.{i}.attention.inner_attention.rope.freqs")

META = Scheme(
    name="meta",
    title="Meta/lingua (also torchtitan before 0.5)",
    rotary="interleaved",
    templates=CANONICAL,
    buffers=_COMMON_BUFFERS,
)
TITAN = Scheme(
    name="titan",
    title="torchtitan 0.5+ (attention.qkv_linear.*, lm_head)",
    rotary="interleaved",
    templates=tuple(
        t.replace("attention.wq", "attention.qkv_linear.wq")
        .replace("attention.wk", "attention.qkv_linear.wk")
        .replace("attention.wv", "attention.qkv_linear.wv")
        .replace("output.weight", "lm_head.weight")
        for t in CANONICAL
    ),
    buffers=_COMMON_BUFFERS,
)
HF = Scheme(
    name="hf",
    title="Hugging Face transformers",
    rotary="half",
    templates=(
        "model.embed_tokens.weight",
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
        "model.layers.{i}.self_attn.o_proj.weight",
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.down_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
        "model.layers.{i}.input_layernorm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.{i}.self_attn.q_proj.bias",
        "model.layers.{i}.self_attn.k_proj.bias",
        "model.layers.{i}.self_attn.v_proj.bias",
        "model.layers.{i}.self_attn.o_proj.bias",
        "model.layers.{i}.mlp.gate_proj.bias",
        "model.layers.{i}.mlp.down_proj.bias",
        "model.layers.{i}.mlp.up_proj.bias",
    ),
    buffers=("model.layers.{i}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"),
)
CUSTOM = Scheme(name="custom", title="the model factory's own names", rotary="unknown", templates=None)

SCHEMES: dict[str, Scheme] = {s.name: s for s in (META, TITAN, HF)}

# Wrapper path components that frameworks insert and loaders do not expect: DDP's leading "module.",
# torch.compile's "_orig_mod.", FSDP1's "_fsdp_wrapped_module." and activation checkpointing's
# "_checkpoint_wrapped_module." (the last three can appear at any depth).
LEADING_WRAPPERS = ("module.",)
ANYWHERE_WRAPPERS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
WRAPPER_TITLES = {
    "module.": "DistributedDataParallel's 'module.'",
    "_orig_mod.": "torch.compile's '_orig_mod.'",
    "_fsdp_wrapped_module.": "FSDP1's '_fsdp_wrapped_module.'",
    "_checkpoint_wrapped_module.": "activation checkpointing's '_checkpoint_wrapped_module.'",
}


def strip_wrappers(key: str) -> tuple[str, tuple[str, ...]]:
    """The key without wrapper components, and which wrappers were removed."""
    found: list[str] = []
    while key.startswith(LEADING_WRAPPERS):
        for w in LEADING_WRAPPERS:
            if key.startswith(w):
                key = key[len(w):]
                found.append(w)
    for w in ANYWHERE_WRAPPERS:
        if key.startswith(w) or "." + w in key:
            parts = [p for p in key.split(".") if p + "." != w]
            key = ".".join(parts)
            found.append(w)
    return key, tuple(found)


@dataclass(frozen=True)
class KeyMapping:
    """How a checkpoint's stored keys relate to canonical ones."""

    scheme: Scheme
    wrappers: tuple[str, ...]
    # stored key -> canonical key, for every key the scheme recognises.
    canonical: dict[str, str]
    # stored keys that are buffers loaders ignore.
    buffers: tuple[str, ...]
    # stored keys the scheme does not recognise.
    unknown: tuple[str, ...]

    def stored_for(self, canonical_key: str) -> str | None:
        return self._inverse.get(canonical_key)

    @cached_property
    def _inverse(self) -> dict[str, str]:
        return {c: s for s, c in self.canonical.items()}


def map_keys(keys: Iterable[str], scheme: Scheme | None = None) -> KeyMapping:
    """Map stored keys to canonical ones, detecting the scheme unless one is given.

    Detection picks the scheme that recognises most keys; Meta wins ties, being canonical.  When no
    Llama scheme recognises any key, the custom (identity) scheme is used.
    """
    stripped: dict[str, str] = {}
    wrappers: set[str] = set()
    for key in sorted(keys):
        bare, found = strip_wrappers(key)
        stripped[key] = bare
        wrappers.update(found)
    mapped: dict[str, str] | None = None  # the detected scheme's canonical names, kept: each key maps once
    if scheme is None:
        scheme = CUSTOM
        for candidate in SCHEMES.values():
            names = {key: c for key, bare in stripped.items() if (c := candidate.to_canonical(bare)) is not None}
            if len(names) > len(mapped or ()):
                scheme, mapped = candidate, names
    canonical: dict[str, str] = {}
    buffers: list[str] = []
    unknown: list[str] = []
    seen: dict[str, str] = {}
    for key, bare in stripped.items():
        if scheme.is_buffer(bare):
            buffers.append(key)
            continue
        c = mapped.get(key) if mapped is not None else scheme.to_canonical(bare)
        if c is None or c in seen:  # a second key mapping to the same canonical name is an extra
            unknown.append(key)
            continue
        seen[c] = key
        canonical[key] = c
    return KeyMapping(
        scheme=scheme,
        wrappers=tuple(w for w in (*LEADING_WRAPPERS, *ANYWHERE_WRAPPERS) if w in wrappers),
        canonical=canonical,
        buffers=tuple(buffers),
        unknown=tuple(unknown),
    )


LAYER_RE = re.compile(r"^layers\.([0-9]{1,9})\.")  # a key is input: no int() of thousands of digits


def layer_of(canonical_key: str) -> int | None:
    m = LAYER_RE.match(canonical_key)
    return int(m.group(1)) if m else None


def role_of(canonical_key: str) -> str:
    """The key with its layer index replaced by {i}: the role shared by every layer's copy."""
    return LAYER_RE.sub("layers.{i}.", canonical_key)
