"""Model dimensions read off the weights' shapes, for config consistency and ``inspect``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .configs import ffn_hidden, head_size_error
from .manifest import TensorInfo
from .naming import layer_of

@dataclass(frozen=True)
class Inferred:
    dim: int | None = None
    n_layers: int | None = None
    vocab_size: int | None = None
    ffn_dim: int | None = None
    q_rows: int | None = None  # n_heads * head_dim
    kv_rows: int | None = None  # n_kv_heads * head_dim
    tied: bool | None = None
    # dimension -> the tensor and shape it was read from, for messages.
    evidence: dict[str, str] = field(default_factory=dict)
    # The top layers that hold only some of the tensors the fullest layer holds: (layer, held, of), highest
    # last.  With them the weights show n_layers only as "between the complete layers and all layers".
    partial_top: tuple[tuple[int, int, int], ...] = ()

    @property
    def complete_layers(self) -> int | None:
        """Layers up to the last complete one (n_layers when no top layer is partial)."""
        return self.partial_top[0][0] if self.partial_top else self.n_layers


def _shape(t: TensorInfo | None, ndim: int) -> tuple[int, ...] | None:
    return t.shape if t is not None and len(t.shape) == ndim else None


def infer_dims(tensors: Mapping[str, TensorInfo], display: Mapping[str, str] | None = None) -> Inferred:
    """Dimensions from canonical-keyed tensors; ``display`` maps canonical keys to names for evidence."""
    show = (lambda k: display.get(k, k)) if display else (lambda k: k)
    ev: dict[str, str] = {}

    def seen(name: str, key: str) -> None:
        ev[name] = f"{show(key)} {list(tensors[key].shape)}"

    dim = vocab = ffn = q = kv = None
    if (s := _shape(tensors.get("tok_embeddings.weight"), 2)) is not None:
        vocab, dim = s
        seen("dim", "tok_embeddings.weight")
        seen("vocab_size", "tok_embeddings.weight")
    elif (s := _shape(tensors.get("norm.weight"), 1)) is not None:
        dim = s[0]
        seen("dim", "norm.weight")
    if vocab is None and (s := _shape(tensors.get("output.weight"), 2)) is not None:
        vocab = s[0]
        seen("vocab_size", "output.weight")
    layers = {n for k in tensors if (n := layer_of(k)) is not None}
    n_layers = max(layers) + 1 if layers else None
    if n_layers is not None:
        ev["n_layers"] = f"layer indices {min(layers)}..{max(layers)} ({len(layers)} present)"
    partial = _partial_top(tensors)
    first = min(layers) if layers else 0
    for name, role, idx in (("ffn_dim", "feed_forward.w1.weight", 0), ("q_rows", "attention.wq.weight", 0),
                            ("kv_rows", "attention.wk.weight", 0)):
        key = f"layers.{first}.{role}"
        if (s := _shape(tensors.get(key), 2)) is not None:
            value = s[idx]
            seen(name, key)
            if name == "ffn_dim":
                ffn = value
            elif name == "q_rows":
                q = value
            else:
                kv = value
    out = tensors.get("output.weight")
    tied = None
    if "tok_embeddings.weight" in tensors:
        tied = out is None or out.alias_of is not None
    return Inferred(dim, n_layers, vocab, ffn, q, kv, tied, ev, partial)


def _partial_top(tensors: Mapping[str, TensorInfo]) -> tuple[tuple[int, int, int], ...]:
    """(layer, tensors held, tensors of the fullest layer) for the top layers that are not complete."""
    held: dict[int, int] = {}
    for key in tensors:
        if (n := layer_of(key)) is not None:
            held[n] = held.get(n, 0) + 1
    if not held:
        return ()
    full = max(held.values())
    out = []
    for n in sorted(held, reverse=True):
        if held[n] == full:
            break
        out.append((n, held[n], full))
    return tuple(reversed(out))


@dataclass(frozen=True)
class HeadSplit:
    n_heads: int
    n_kv_heads: int
    head_dim: int


def split_heads(q_rows: int, kv_rows: int, stated: Iterable[tuple[str, str, int]]) -> HeadSplit:
    """The split fixed by ``stated`` (who says it, "n_heads"/"n_kv_heads"/"head_dim", value): every
    statement must fit the rows and agree with the others, or ValueError says which does not."""
    sizes: dict[str, int] = {}
    for source, field_name, value in stated:
        rows = kv_rows if field_name == "n_kv_heads" else q_rows
        if value <= 0 or (field_name != "head_dim" and rows % value):
            raise ValueError(f"{source} = {value} does not divide the {rows} rows of "
                             f"{'wk' if field_name == 'n_kv_heads' else 'wq'}")
        sizes[source] = value if field_name == "head_dim" else rows // value
    if not sizes:
        raise ValueError("no head count or head size is given")
    if len(set(sizes.values())) > 1:
        raise ValueError("they disagree: " + ", ".join(f"{s} means head_dim {h}" for s, h in sizes.items()))
    head_dim = next(iter(sizes.values()))
    if why := head_size_error(head_dim):
        raise ValueError(f"head_dim {why}")
    if q_rows % head_dim or kv_rows % head_dim or (q_rows // head_dim) % (kv_rows // head_dim):
        raise ValueError(f"head_dim {head_dim} does not split wq's {q_rows} rows and wk's {kv_rows} rows into "
                         "whole heads, n_kv_heads dividing n_heads")
    return HeadSplit(q_rows // head_dim, kv_rows // head_dim, head_dim)


def weights_params(inf: Inferred, heads: HeadSplit | None) -> dict[str, Any]:
    """A Meta-style params dict with what the weights show, and the head split a witness or the user gave
    (left out when None: the weights alone never decide it)."""
    params: dict[str, Any] = {}
    if inf.dim is not None:
        params["dim"] = inf.dim
    if inf.n_layers is not None and not inf.partial_top:  # a partial top layer leaves n_layers open
        params["n_layers"] = inf.n_layers
    if heads is not None:
        params["n_heads"], params["n_kv_heads"] = heads.n_heads, heads.n_kv_heads
        if inf.dim is None or heads.head_dim * heads.n_heads != inf.dim:
            params["head_dim"] = heads.head_dim
    if inf.vocab_size is not None:
        params["vocab_size"] = inf.vocab_size
    if inf.dim and inf.ffn_dim is not None:  # no FFN parameters give a width for dim 0
        params.update(ffn_params(inf.dim, inf.ffn_dim))
    if inf.tied is not None:
        params["weight_tying"] = inf.tied
    return params


def ffn_params(dim: int, ffn_dim: int) -> dict[str, Any]:
    """multiple_of / ffn_dim_multiplier that make the Meta formula give ``ffn_dim`` (``dim`` positive)."""
    for multiple_of in (256, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_dim % multiple_of:
            continue
        if ffn_hidden(dim, multiple_of, None) == ffn_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": None}
        base = int(2 * (4 * dim) / 3)
        for digits in (1, 2, 3, 4):
            mult = round(ffn_dim / base, digits)
            if mult > 0 and ffn_hidden(dim, multiple_of, mult) == ffn_dim:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    # Halfway into the integer: int(multiplier * base) lands on ffn_dim despite float rounding.
    return {"multiple_of": 1, "ffn_dim_multiplier": (ffn_dim + 0.5) / int(2 * (4 * dim) / 3)}
