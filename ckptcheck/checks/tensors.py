"""What the tensors are: shape and dtype per key, the config's dimensions, finite values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import dtypes
from ..infer import infer_dims
from . import repairs
from .model import Check, Verdict

if TYPE_CHECKING:
    from ..configs import ModelConfig
    from ..engine import Session
    from ..manifest import TensorInfo

# Elements checked per step by the finite scan: bounds the temporary boolean mask, not the tensor.
FINITE_CHUNK = 1 << 24


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _missing(session: Session, key: str) -> Verdict:
    return Verdict.skip(f"{session.spec.display(key)} is missing (see key_present)")


def plan_shape(session: Session) -> list[Check]:
    def make(key: str):
        def evaluate() -> Verdict:
            info = session.by_canonical.get(key)
            if info is None:
                return _missing(session, key)
            want = session.spec.tensors[key].shape
            got = info.shape
            if len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got, strict=True)):
                return Verdict.ok(expected=_fmt(want), obtained=_fmt(got))
            hint = ""
            if len(got) == 2 and len(want) == 2 and (got[1], got[0]) == want:
                hint = " (stored transposed)"
            return Verdict.fail(
                f"{session.spec.display(key)} has shape {_fmt(got)}, the config expects {_fmt(want)}{hint}",
                expected=_fmt(want), obtained=_fmt(got),
                repair="see the config items: the config and the weights describe different models"
                if not hint else "transpose the tensor",
            )

        return evaluate

    return [Check("shape", session.spec.display(k), make(k)) for k in session.spec.tensors]


def plan_dtype(session: Session) -> list[Check]:
    def make(key: str):
        def evaluate() -> Verdict:
            info = session.by_canonical.get(key)
            if info is None:
                return _missing(session, key)
            want, source = session.expected_dtype
            if want is None or info.dtype == want:
                return Verdict.ok(expected=want, obtained=info.dtype)
            loss = dtypes.itemsize(info.dtype) > dtypes.itemsize(want)
            return Verdict.fail(
                f"{session.spec.display(key)} is {info.dtype}; {source} is {want}"
                + (" (casting loses precision)" if loss else ""),
                expected=want, obtained=info.dtype, repair=repairs.cast(session, want),
            )

        return evaluate

    return [Check("dtype", session.spec.display(k), make(k)) for k in session.spec.tensors]


def plan_config(session: Session) -> list[Check]:
    cfg = session.config
    if cfg is None or session.spec.scheme.is_custom:
        return []
    display = {c: session.spec.display(c) for c in session.by_canonical}
    inferred = infer_dims(session.by_canonical, display)

    def derived(name: str) -> int | None:
        rows = {"n_heads": inferred.q_rows, "n_kv_heads": inferred.kv_rows}[name]
        if rows is None or rows % cfg.head_dim:
            return None
        return rows // cfg.head_dim

    fields: dict[str, tuple[object, object, str]] = {
        "dim": (cfg.dim, inferred.dim, inferred.evidence.get("dim", "")),
        "n_layers": (cfg.n_layers, inferred.n_layers, inferred.evidence.get("n_layers", "")),
        "n_heads": (cfg.n_heads, derived("n_heads"),
                    f"{inferred.evidence.get('q_rows', '')} / head_dim {cfg.head_dim}"),
        "n_kv_heads": (cfg.n_kv_heads, derived("n_kv_heads"),
                       f"{inferred.evidence.get('kv_rows', '')} / head_dim {cfg.head_dim}"),
        "vocab_size": (cfg.vocab_size, inferred.vocab_size, inferred.evidence.get("vocab_size", "")),
        "ffn_dim": (cfg.ffn_dim, inferred.ffn_dim, inferred.evidence.get("ffn_dim", "")),
        "tie_embeddings": (cfg.tie_embeddings, inferred.tied,
                           "output.weight absent or sharing the embeddings' storage" if inferred.tied
                           else "a separate output.weight"),
    }
    rows_of = {"n_heads": inferred.q_rows, "n_kv_heads": inferred.kv_rows}

    def make(name: str):
        def evaluate() -> Verdict:
            configured, weights, evidence = fields[name]
            field_name = cfg.field_name(name)
            if configured is None:
                return Verdict.skip(f"the config leaves {field_name} to the tokenizer")
            if weights is None:
                rows = rows_of.get(name)
                if rows is not None:
                    return Verdict.fail(
                        f"{field_name}: the weights have {rows} rows, not a multiple of head_dim {cfg.head_dim}",
                        expected=configured, obtained=f"{rows} rows", repair=repairs.fix_config(session, {cfg.field_name("head_dim"): "a divisor of the rows"}),
                    )
                return Verdict.skip(f"the weights do not show {name} (the tensor it is read from is missing)")
            if configured == weights:
                return Verdict.ok(f"{field_name} = {configured}, as the weights show", expected=configured, obtained=weights)
            return Verdict.fail(
                f"config field {field_name} is {_json(configured)} but the weights imply {_json(weights)} ({evidence})",
                expected=_json(configured), obtained=_json(weights),
                repair=repairs.fix_config(session, _config_fix(name, weights, cfg)),
            )

        return evaluate

    return [Check("config", name, make(name)) for name in fields]


def _json(value: object) -> str:
    import json

    return json.dumps(value)


def _config_fix(name: str, value: object, cfg: ModelConfig) -> dict[str, object]:
    """The config assignments that make ``name`` agree with the weights' ``value``."""
    if name == "ffn_dim" and cfg.schema != "hf":
        from ..infer import ffn_params

        prefix = "model." if cfg.schema == "lingua" else ""
        p = ffn_params(cfg.dim, int(value))  # type: ignore[call-overload]
        return {f"{prefix}ffn_dim_multiplier": p["ffn_dim_multiplier"], f"{prefix}multiple_of": p["multiple_of"]}
    return {cfg.field_name(name): value}


def plan_finite(session: Session) -> list[Check]:
    def make(key: str):
        def evaluate() -> Verdict:
            if session.options.metadata_only:
                return Verdict.skip("values not read (--metadata-only)")
            stored = session.mapping.stored_for(key)
            if stored is None:
                return _missing(session, key)
            info = session.manifest.tensors[stored]
            if info.dtype not in dtypes.FLOATING:
                return Verdict.skip(f"{info.dtype} cannot hold NaN or Inf")
            bad = _count_nonfinite(session, stored, info)
            if bad is None:
                return Verdict.ok(expected="finite", obtained="finite")
            nan, inf, first = bad
            return Verdict.fail(
                f"{stored} holds {nan} NaN and {inf} Inf values (first at flat index {first})",
                expected="all finite", obtained=f"{nan} NaN, {inf} Inf", repair=repairs.from_training(),
            )

        return evaluate

    return [Check("finite", session.spec.display(k), make(k), reads_data=True) for k in session.spec.tensors]


def _count_nonfinite(session: Session, stored: str, info: TensorInfo) -> tuple[int, int, int] | None:
    """Scan one tensor in bounded chunks; None when every value is finite."""
    import torch

    flat = session.checkpoint.load(stored).reshape(-1)
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    nan = inf = 0
    first = -1
    for start in range(0, flat.numel(), FINITE_CHUNK):
        part = flat[start:start + FINITE_CHUNK]
        if bool(torch.isfinite(part).all()):
            continue
        if part.dtype.itemsize == 1:  # float8: isnan/isinf are not implemented for it everywhere
            part = part.float()
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
        if first < 0:
            first = start + int((~torch.isfinite(part)).nonzero()[0, 0])
    return None if first < 0 else (nan, inf, first)
