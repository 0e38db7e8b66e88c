"""What a conversion does to each tensor, decided before a byte is read."""

from __future__ import annotations

from dataclasses import dataclass

from .. import dtypes
from ..configs import ModelConfig
from ..errors import InputError
from ..manifest import Manifest
from ..naming import CUSTOM, KeyMapping, Scheme, map_keys, role_of, strip_wrappers

ROTARY_HEADS = {"layers.{i}.attention.wq.weight": "n_heads", "layers.{i}.attention.wk.weight": "n_kv_heads"}


@dataclass(frozen=True, slots=True)
class TensorMove:
    src_key: str
    dst_key: str
    canonical: str | None
    shape: tuple[int, ...]
    src_dtype: str
    dst_dtype: str
    # (heads, head_dim, "interleaved->half" or "half->interleaved") when wq/wk change rotary layout
    permute: tuple[int, int, str] | None = None
    # the destination key this one shares storage with (a tied weight), written once
    alias_of: str | None = None

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        n = dtypes.itemsize(self.dst_dtype)
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes if self.shape else dtypes.itemsize(self.dst_dtype)


@dataclass(frozen=True)
class ConversionPlan:
    moves: tuple[TensorMove, ...]
    src_scheme: Scheme
    dst_scheme: Scheme
    wrappers: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]  # (stored key, why)

    @property
    def written(self) -> tuple[TensorMove, ...]:
        return tuple(m for m in self.moves if m.alias_of is None)

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.written)

    def summary(self) -> dict[str, int]:
        return {
            "tensors": len(self.moves), "renamed": sum(m.src_key != m.dst_key for m in self.moves),
            "permuted": sum(m.permute is not None for m in self.moves),
            "cast": sum(m.src_dtype != m.dst_dtype for m in self.moves), "dropped": len(self.dropped),
            "aliases": sum(m.alias_of is not None for m in self.moves),
        }


def build_plan(
    manifest: Manifest,
    *,
    naming: Scheme | None = None,
    dtype: str | None = None,
    config: ModelConfig | None = None,
    drop: dict[str, str] | None = None,
    aliases: str = "keep",
) -> ConversionPlan:
    """Moves for every model tensor of ``manifest`` into ``naming`` (default: the source's scheme).

    ``drop`` maps stored keys to the reason they are left out.  Aliases (tied weights saved as shared
    storage) are kept as aliases ("keep", torch files), written as a copy under their own name ("copy":
    DCP, where get_model_state_dict expects both names), or left out ("drop": safetensors, as Hugging
    Face does for tied embeddings).
    """
    mapping: KeyMapping = map_keys(manifest.tensors)
    src = mapping.scheme
    dst = naming or src
    if dst.is_custom != src.is_custom and not dst.is_custom:
        raise InputError(manifest.path, None, f"keys follow no Llama-family scheme; cannot rename them to {dst.name}")
    dropped = dict(drop or {})
    for key in mapping.buffers:
        dropped.setdefault(key, "buffer that loaders recompute (rotary frequencies)")
    moves: list[TensorMove] = []
    dst_of: dict[str, str] = {}
    for key, info in manifest.tensors.items():
        if key in dropped:
            continue
        canonical = mapping.canonical.get(key)
        if canonical is not None and not dst.is_custom:
            dst_key = dst.from_canonical(canonical)
            assert dst_key is not None
        else:
            dst_key = strip_wrappers(key)[0]
        cast = dtype if dtype is not None and info.dtype in dtypes.FLOATING else info.dtype
        permute = _permutation(manifest, key, canonical, info.shape, src, dst, config)
        alias = None
        if info.alias_of is not None and info.alias_of not in dropped and aliases != "copy":
            if aliases == "drop":
                dropped[key] = f"shares storage with {info.alias_of} (tied); the output format stores it once"
                continue
            alias = info.alias_of
        dst_of[key] = dst_key
        moves.append(TensorMove(key, dst_key, canonical, info.shape, info.dtype, cast, permute, alias))
    seen: dict[str, str] = {}
    for m in moves:
        if m.dst_key in seen:
            raise InputError(manifest.path, m.src_key, f"maps to {m.dst_key}, as {seen[m.dst_key]} does")
        seen[m.dst_key] = m.src_key
    moves = [m if m.alias_of is None else _realias(m, dst_of) for m in moves]
    return ConversionPlan(tuple(moves), src, dst, mapping.wrappers, tuple(sorted(dropped.items())))


def _realias(move: TensorMove, dst_of: dict[str, str]) -> TensorMove:
    from dataclasses import replace

    return replace(move, alias_of=dst_of.get(move.alias_of or ""))


def _permutation(manifest: Manifest, key: str, canonical: str | None, shape: tuple[int, ...], src: Scheme,
                 dst: Scheme, config: ModelConfig | None) -> tuple[int, int, str] | None:
    if canonical is None or src.rotary == dst.rotary or src.is_custom or dst.is_custom:
        return None
    heads_field = ROTARY_HEADS.get(role_of(canonical))
    if heads_field is None:
        return None
    if config is None:
        raise InputError(
            manifest.path, key,
            f"moving between {src.title} and {dst.title} permutes q/k rows per head; pass --model-config "
            "so the head counts are known",
        )
    heads = getattr(config, heads_field)
    if len(shape) != 2 or shape[0] != heads * config.head_dim or config.head_dim % 2:
        raise InputError(manifest.path, key, f"shape {list(shape)} does not split into {heads} heads of "
                         f"{config.head_dim} rows: is --model-config the config of this checkpoint?")
    return heads, config.head_dim, f"{src.rotary}->{dst.rotary}"


def scheme_named(name: str) -> Scheme:
    """--naming: meta and lingua share Meta's names (lingua adds the "model" nesting), titan, hf."""
    from ..naming import SCHEMES

    key = {"lingua": "meta"}.get(name, name)
    if key == "custom":
        return CUSTOM
    if key not in SCHEMES:
        raise InputError(None, "--naming", f"unknown naming {name!r}; use meta, lingua, titan or hf")
    return SCHEMES[key]
