"""What a conversion does to each tensor, decided before a byte is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import dtypes
from ..configs import ModelConfig
from ..errors import InputError
from ..manifest import OPTIMIZER_SECTIONS, Manifest
from ..layouts import ROTARY_ROLES
from ..naming import CUSTOM, KeyMapping, Scheme, map_keys, role_of, strip_wrappers
from ..training_state import is_position


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
    # made, not read: every element this value (fresh optimizer state); src_key is then empty
    fill: float | None = None

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
    # Sections beside the model ("optim": {...}) as nested dicts and lists whose leaves are TensorMoves
    # (dst_key: the dotted path) or plain values; None when only the model is written.
    state: dict[str, Any] | None = None

    @property
    def state_moves(self) -> tuple[TensorMove, ...]:
        return tuple(leaf for _, leaf in flatten_state(self.state or {}) if isinstance(leaf, TensorMove))

    @property
    def written(self) -> tuple[TensorMove, ...]:
        return tuple(m for m in self.moves if m.alias_of is None) + self.state_moves

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.written)

    def summary(self) -> dict[str, int]:
        return {
            "tensors": len(self.moves), "renamed": sum(m.src_key != m.dst_key for m in self.moves),
            "permuted": sum(m.permute is not None for m in self.moves),
            "cast": sum(m.src_dtype != m.dst_dtype for m in self.moves), "dropped": len(self.dropped),
            "aliases": sum(m.alias_of is not None for m in self.moves),
            "state_tensors": len(self.state_moves),
        }


RECOMPUTED = "buffer that loaders recompute (rotary frequencies)"


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
        dropped.setdefault(key, RECOMPUTED)
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


def flatten_state(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs, flattened as DCP flattens: into dicts, and into lists that hold containers."""
    if isinstance(obj, dict) and obj:
        return [pair for k, v in obj.items() for pair in flatten_state(v, (*prefix, str(k)))]
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple, TensorMove)) for v in obj):
        return [pair for i, v in enumerate(obj) for pair in flatten_state(v, (*prefix, str(i)))]
    return [(prefix, obj)]


def carry_state(plan: ConversionPlan, checkpoint: Any, *, config: ModelConfig | None = None) -> ConversionPlan:
    """The plan plus every section beside the model (optimizer, scheduler, data loader, train state),
    rebuilt as nested dicts and lists: tensors as moves, values read through the allowlist.  Optimizer
    state follows its parameters: keys and param-group names are renamed as the weights are, and
    exp_avg/exp_avg_sq rows of wq/wk are permuted with them."""
    import dataclasses

    manifest = checkpoint.manifest
    if not manifest.extra_paths:
        return plan
    by_src = {m.src_key: m for m in plan.moves}
    bare = {strip_wrappers(m.src_key)[0]: m for m in plan.moves}

    def param_move(name: str) -> TensorMove | None:
        return by_src.get(name) or bare.get(strip_wrappers(name)[0])

    def renamed(name: Any) -> Any:
        move = param_move(name) if isinstance(name, str) else None
        return move.dst_key if move is not None else name

    from ..safe_pickle import refuse_stand_ins
    from ..training_state import optimizer_path

    root: dict[str, Any] = {}
    for key, raw in manifest.extra_paths.items():
        path = optimizer_path(raw)
        dst_path = list(path)
        owner = None
        if len(path) >= 3 and path[0] in OPTIMIZER_SECTIONS and path[1] in ("state", "param_groups"):
            owner = param_move(path[2])
            if owner is not None:
                dst_path[2] = owner.dst_key
        if len(raw) == 2 and len(path) == 4:  # keep torchtitan's own flattened form
            dst_path = [path[0], ".".join(dst_path[1:])]
        dotted = ".".join(dst_path)
        info = manifest.extra_tensors.get(key)
        if info is not None:
            permute = owner.permute if owner is not None and info.shape == owner.shape else None
            leaf: Any = TensorMove(key, dotted, None, info.shape, info.dtype, info.dtype, permute)
        else:
            leaf = checkpoint.load_value(key)
            if path[-1] == "params" and isinstance(leaf, list):
                leaf = [renamed(n) for n in leaf]
            elif path[-1] == "param_groups" and isinstance(leaf, list):  # DCP before 2.4: the whole list
                leaf = [{**g, "params": [renamed(n) for n in g.get("params", [])]} if isinstance(g, dict) else g
                        for g in leaf]
        _insert(root, dst_path, leaf)
    refuse_stand_ins(root, path=manifest.path, item=None)
    return dataclasses.replace(plan, state=_listify(root))


def _insert(root: dict[str, Any], path: list[str], leaf: Any) -> None:
    node = root
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = leaf


def _listify(obj: Any, parent: str = "") -> Any:
    """Undo flattening where it lost a type: param_groups was a list (its keys are 0..n-1), and a plain
    optimizer.state_dict() keys its state by position (ints, matching the ints in its param groups)."""
    if not isinstance(obj, dict):
        return obj
    items = {k: _listify(v, k) for k, v in obj.items()}
    digits = bool(items) and all(is_position(k) for k in items)
    if parent == "param_groups" and digits and sorted(int(k) for k in items) == list(range(len(items))):
        return [items[str(i)] for i in range(len(items))]
    if parent == "state" and digits:
        return {int(k): v for k, v in items.items()}
    return items


def fresh_adamw_state(plan: ConversionPlan, section: str = "optim") -> ConversionPlan:
    """The plan plus AdamW state at step 0 for every trainable parameter, keyed by name as lingua's and
    torchtitan's get_state_dict key it; the param group has this torch's AdamW defaults."""
    import dataclasses

    import torch

    state: dict[str, Any] = {}
    names = []
    for m in plan.moves:
        if m.alias_of is not None or m.dst_dtype not in dtypes.FLOATING:
            continue
        names.append(m.dst_key)
        prefix = f"{section}.state.{m.dst_key}."
        state[m.dst_key] = {
            "step": TensorMove("", prefix + "step", None, (), "float32", "float32", fill=0.0),
            "exp_avg": TensorMove("", prefix + "exp_avg", None, m.shape, m.dst_dtype, m.dst_dtype, fill=0.0),
            "exp_avg_sq": TensorMove("", prefix + "exp_avg_sq", None, m.shape, m.dst_dtype, m.dst_dtype, fill=0.0),
        }
    defaults = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).state_dict()["param_groups"][0]
    group = {k: v for k, v in defaults.items() if k != "params"} | {"params": names}
    return dataclasses.replace(plan, state={section: {"state": state, "param_groups": [group]}})


def _realias(move: TensorMove, dst_of: dict[str, str]) -> TensorMove:
    from dataclasses import replace

    return replace(move, alias_of=dst_of.get(move.alias_of or ""))


def _permutation(manifest: Manifest, key: str, canonical: str | None, shape: tuple[int, ...], src: Scheme,
                 dst: Scheme, config: ModelConfig | None) -> tuple[int, int, str] | None:
    if canonical is None or src.rotary == dst.rotary or src.is_custom or dst.is_custom:
        return None
    heads_field = ROTARY_ROLES.get(role_of(canonical))
    if heads_field is None:
        return None
    if config is None:
        raise InputError(
            manifest.path, key,
            f"moving between {src.title} and {dst.title} permutes q/k rows per head; pass --model-config "
            "so the head counts are known",
        )
    heads = getattr(config, heads_field)
    if len(shape) not in (1, 2) or shape[0] != heads * config.head_dim or config.head_dim % 2:
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
