"""Does the config describe these weights?  One check per config field.

A field passes only when the checkpoint shows its value.  The weights show dim, layers, vocabulary,
FFN width and tying; they fix n_heads × head_dim but not the split, so head counts pass only when a
witness states head_dim (see ``corroborate``); norm_eps and rope_theta only when a saved config that
states them (or, for theta, a rotary frequency buffer) agrees.  Otherwise the check skips as not
verifiable, naming what conversions will assume; so does n_layers when the top layer is partial.  Every
failure's repair is a config edit that, applied literally, makes its check pass (or the honest skip):
tests/test_config_advice.py; where no edit of this schema can (a Meta head size other than dim / n_heads,
tying), the repair says so.  A target whose framework cannot state a feature the model needs (suites'
cannot_express: Meta's head_dim, lingua's and Meta's biases) fails config[FEATURE].
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..corroborate import Witness, head_dim_witnesses
from ..configs import LIMITS, ffn_hidden, head_size_error
from ..infer import Inferred, ffn_params, infer_dims
from . import repairs
from .model import Check, Verdict
from .shards import differing_copies

if TYPE_CHECKING:
    from ..configs import ModelConfig
    from ..engine import Session

# Fields the weights show directly: config field -> the Inferred attribute and its evidence key.
SHOWN = {"dim": ("dim", "dim"), "n_layers": ("n_layers", "n_layers"), "vocab_size": ("vocab_size", "vocab_size"),
         "ffn_dim": ("ffn_dim", "ffn_dim"), "tie_embeddings": ("tied", None)}
HEADS = ("n_heads", "n_kv_heads", "head_dim")
# head_dim has no check of its own: the n_heads and n_kv_heads checks compare n × head_dim with the rows.
ORDER = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "tie_embeddings", "norm_eps",
         "rope_theta")
# Fields no weight's shape shows: a saved config that states them witnesses them (and rotary frequencies, theta).
UNSHOWN = ("norm_eps", "rope_theta")
# Which configs witness: documented in every message that relies on them or misses them.
WITNESS_RULE = ("a config saved in or up to two folders above the checkpoint, other than the config under test and "
                "copies of it, whose every dimension matches the weights")
# Meta's params.json has no tying field: its loader always builds a separate output layer.
NO_TYING_FIELD = ("meta",)
# Features a framework's config may have no field for (a suite's cannot_express): feature -> why.
CANNOT_EXPRESS = {
    "head_dim": "its config has no head_dim field: the head size is always dim / n_heads",
    "attention_bias": "its Llama has no attention biases and its config no attention_bias field",
    "mlp_bias": "its Llama has no MLP biases and its config no mlp_bias field",
}
# Schemas whose loader has no head_dim field (Meta's ModelArgs), and the advice for a head size a Meta params.json cannot state.
NO_HEAD_DIM_FIELD = ("meta",)
META_CANNOT_HEAD_DIM = ("a Meta params.json cannot state head_dim (Meta's ModelArgs has no such field and derives "
                        "dim / n_heads): check against a lingua params.json or a config.json that states head_dim")
META_CANNOT_TIE = ("a Meta params.json cannot state tied embeddings (Meta's loader always reads a separate "
                   "output.weight): check against a lingua params.json with weight_tying: true, or a config.json "
                   "with tie_word_embeddings: true")

# The repair for weights with a zero-size dimension (a tensor of 0 rows or columns): no model has one, so no
# config edit describes them.
ZERO_SIZE = ("no config describes weights with a zero-size dimension (see the shape checks): the checkpoint is "
             "damaged; use the one the training run saved")


def tie_repair(session: Session) -> str:
    """The repair for a tie the config does not state: a config edit where the schema has the field."""
    cfg = session.config
    assert cfg is not None
    if cfg.schema in NO_TYING_FIELD:
        return META_CANNOT_TIE
    return repairs.fix_config(session, {cfg.field_name("tie_embeddings"): True})


@dataclass(frozen=True)
class Facts:
    """What the checks compare the config with: the weights' dimensions and the head_dim witnesses."""

    cfg: ModelConfig
    inferred: Inferred
    witnesses: tuple[Witness, ...]
    q_name: str
    k_name: str
    # For a tied config with a separate output.weight: whether it is a bit-identical copy of the embeddings
    # (True), differs (False), or was not read (None, --metadata-only).
    tied_copy: Callable[[], bool | None] = lambda: None
    # The values of a rotary frequency buffer the checkpoint keeps (None: none, or --metadata-only; a str:
    # why its values witness nothing).
    frequencies: Callable[[], Any] = lambda: None


def plan_config(session: Session) -> list[Check]:
    cfg = session.config
    if cfg is None or session.spec.scheme.is_custom:
        return []
    display = {c: session.spec.display(c) for c in session.by_canonical}
    inferred = infer_dims(session.by_canonical, display)
    witnesses = head_dim_witnesses(session.manifest.tensors, inferred, session.ckpt_arg, cfg)
    values = not session.options.metadata_only
    copy_read = cfg.tie_embeddings and inferred.tied is False and values
    buffer = next((w.frequencies for w in witnesses if w.frequencies), None) if values else None
    facts = Facts(cfg, inferred, tuple(witnesses), _tensor(inferred, "q_rows", "wq"), _tensor(inferred, "kv_rows", "wk"),
                  (lambda: _is_copy(session)) if copy_read else (lambda: None),
                  (lambda: _frequencies(session, buffer)) if buffer else (lambda: None))
    reads = {"tie_embeddings": copy_read, "rope_theta": buffer is not None}

    def make(name: str):
        return lambda: repair_with(session, evaluate(facts, name))

    checks = [Check("config", name, make(name), reads_data=reads.get(name, False)) for name in ORDER]
    suite = session.suite
    return checks + [Check("config", name, _expressible(session, facts, suite.title.split(":")[0], name))
                     for name in suite.cannot_express]


def _expressible(session: Session, facts: Facts, framework: str, name: str) -> Callable[[], Verdict]:
    """A target whose config cannot state a feature fails a model that needs it, saying why."""
    from ..spec import biases

    def evaluate() -> Verdict:
        cfg, inferred = facts.cfg, facts.inferred
        if name == "head_dim":
            q, dim = inferred.q_rows, inferred.dim
            needs = []
            if q is not None and dim is not None and q != dim:
                needs.append(f"{facts.q_name} has {q} rows, not dim = {dim}")
            if cfg.n_heads * cfg.head_dim != cfg.dim:
                needs.append(f"the config's head_dim {cfg.head_dim} is not dim / n_heads = {cfg.dim} / {cfg.n_heads}")
            found = "; ".join(needs)
        else:
            keys = biases(session.by_canonical).get(name, [])
            shown = sorted(session.spec.display(k) for k in keys)[:2]
            found = (f"the checkpoint holds {len(keys)} such tensors ({', '.join(shown)}, ...)" if keys
                     else f"the config sets {name}" if getattr(cfg, name) else "")
        if not found:
            return Verdict.ok(f"the model needs no {name}, which {framework} cannot state", expected="none",
                              obtained="none")
        return Verdict.fail(f"{framework} cannot load this model: {CANNOT_EXPRESS[name]}, but {found}",
                            expected=f"no {name}", obtained=name,
                            repair=f"no config edit makes {framework} load it: choose a target whose config "
                                   f"states {name} (a Hugging Face config.json, --target hf)")

    return evaluate


def _is_copy(session: Session) -> bool:
    """Whether a separate output.weight holds exactly the embedding's values (the same test a repair uses
    to drop it: bit-identical, or another dtype that round-trips to the embedding's bits)."""
    from ..tying import redundant_copy

    out, emb = (session.mapping.stored_for(k) for k in ("output.weight", "tok_embeddings.weight"))
    return out is not None and emb is not None and redundant_copy(session.checkpoint, out, emb)


def _frequencies(session: Session, key: str) -> Any:
    """The rotary buffer's values, or why they witness nothing: Meta shards whose copies differ hold no one
    value (the replicas check fails them; reading them as one would stop the run)."""
    differ = differing_copies(session, key)
    if differ:
        return (f"the copies of {key} differ between shards ({', '.join(differ)} vs consolidated.00.pth), "
                "so they witness no one theta (see the replicas check)")
    return session.checkpoint.load(key)


def _tensor(inferred: Inferred, dim: str, fallback: str) -> str:
    """The tensor a dimension was read from ("layers.0.attention.wq.weight")."""
    return inferred.evidence.get(dim, fallback).split(" [")[0]


def repair_with(session: Session, verdict: tuple[Verdict, dict[str, object] | str | None]) -> Verdict:
    """Word the verdict's config edit as ``repairs.fix_config`` does (or keep a non-edit repair)."""
    v, fix = verdict
    if isinstance(fix, dict):
        fix = repairs.fix_config(session, fix)
    return Verdict.fail(v.message, expected=v.expected, obtained=v.obtained, repair=fix) if fix else v


def evaluate(facts: Facts, name: str) -> tuple[Verdict, dict[str, object] | str | None]:
    """The verdict for one field, with the config edit that fixes a failure."""
    if name in ("n_heads", "n_kv_heads"):
        return _heads(facts, name)
    if name in UNSHOWN:
        return _unshown(facts, name)
    return _shown(facts, name)


def _unshown(facts: Facts, name: str) -> tuple[Verdict, dict[str, object] | str | None]:
    cfg = facts.cfg
    field = cfg.field_name(name)
    configured = getattr(cfg, name)
    saved = [w for w in facts.witnesses if w.config is not None and w.config.states(name)]
    for w in saved:
        value = getattr(w.config, name)
        if not math.isclose(value, configured, rel_tol=1e-6):
            return (Verdict.fail(f"config field {field} is {configured} but {w.source} says {value}",
                                 expected=configured, obtained=value), {field: value})
    if saved:
        return Verdict.ok(f"{field} = {configured}, as {saved[0].source} says", expected=configured,
                          obtained=configured), None
    stored = facts.frequencies() if name == "rope_theta" else None
    if isinstance(stored, str):
        return Verdict.skip(f"{field} = {configured} cannot be verified: {stored}"), None
    if stored is not None:
        return _theta_from_frequencies(facts, field, stored)
    return Verdict.skip(f"{field} = {configured} cannot be verified: the weights do not show it and no witness "
                        f"({WITNESS_RULE}) states it; conversions will assume {configured}"), None


def _shown(facts: Facts, name: str) -> tuple[Verdict, dict[str, object] | str | None]:
    cfg, inferred = facts.cfg, facts.inferred
    attr, ev_key = SHOWN[name]
    configured, weights = getattr(cfg, name), getattr(inferred, attr)
    field = cfg.field_name(name)
    if configured is None:
        return Verdict.skip(f"the config leaves {field} to the tokenizer"), None
    if weights is None:
        return Verdict.skip(f"the weights do not show {name} (the tensor it is read from is missing)"), None
    if name == "n_layers" and inferred.partial_top:
        return _partial_layers(facts, field, configured)
    evidence = inferred.evidence.get(ev_key, "") if ev_key else (
        "output.weight absent or sharing the embeddings' storage" if weights else "a separate output.weight")
    if configured == weights:
        return Verdict.ok(f"{field} = {_json(configured)}, as the weights show ({evidence})",
                          expected=_json(configured), obtained=_json(weights)), None
    if name == "tie_embeddings" and configured:  # a separate output.weight: a tie saved as a copy, or no tie
        copy = facts.tied_copy()
        if copy:
            return Verdict.ok(f"{field} = true: output.weight is stored separately but bit-identical to the "
                              "embeddings, a tie saved as a copy (see unexpected_key)",
                              expected="true", obtained="a bit-identical copy"), None
        if copy is None:
            return Verdict.skip(f"{field} = true cannot be verified without reading values: output.weight is stored "
                                "separately, a tie saved as a copy or an untied model (--metadata-only)"), None
    verdict = Verdict.fail(f"config field {field} is {_json(configured)} but the weights imply {_json(weights)} "
                           f"({evidence})", expected=_json(configured), obtained=_json(weights))
    if name == "tie_embeddings" and cfg.schema in NO_TYING_FIELD:
        return verdict, META_CANNOT_TIE
    if name != "tie_embeddings" and 0 in (weights, inferred.dim):
        return verdict, ZERO_SIZE
    fix: dict[str, object] = {name: weights}
    if name == "ffn_dim" and cfg.schema != "hf" and inferred.dim not in (None, cfg.dim):
        fix["dim"] = inferred.dim  # a Meta/lingua FFN width is computed from dim: fix both or neither holds
    return verdict, _fields(facts, fix)


def _partial_layers(facts: Facts, field: str, configured: int) -> tuple[Verdict, str | None]:
    """Top layers holding only some tensors: the model has the complete layers (the rest are strays) or all
    of them (the rest were lost).  The weights cannot say which, so no single n_layers edit is advised."""
    inferred = facts.inferred
    complete, present = inferred.complete_layers, inferred.n_layers
    parts = ", ".join(f"layer {n} holds {held} of {full} tensors" for n, held, full in inferred.partial_top)
    why = (f"the weights hold {complete} complete layers and a partial top ({parts}): n_layers is {complete} if "
           f"those are stray tensors, {present} if the rest were lost")
    if configured in (complete, present):
        return Verdict.skip(f"{field} = {configured} cannot be verified: {why}; the key checks list the stray or "
                            "missing tensors"), None
    return (Verdict.fail(f"config field {field} is {configured} but {why}", expected=configured,
                         obtained=f"{complete} or {present}"),
            f"set {field} = {complete} and drop the partial layers' tensors, or set {field} = {present} and restore "
            "their missing tensors from the training run")


# Relative error of rotary frequencies computed in float32 (theta ** x with x rounded), at most a few ulps.
FREQ_COMPUTE_RTOL = 1e-5


def _theta_from_frequencies(facts: Facts, field: str, stored: Any) -> tuple[Verdict, dict[str, object] | str | None]:
    """rope.freqs / inv_freq hold 1 / theta^(2i / head_dim): compare them with the config's theta at the
    precision they are stored in; on a mismatch, fit theta and propose the roundest value that matches."""
    import torch

    cfg = facts.cfg
    source = next(w.source for w in facts.witnesses if w.frequencies)
    freqs = stored.double().reshape(-1)
    hd = 2 * freqs.numel()
    exponents = torch.arange(0, hd, 2, dtype=torch.float64) / hd
    info = torch.finfo(stored.dtype if stored.dtype.is_floating_point else torch.float64)
    # One unit in the last place of the stored dtype (subnormals have a fixed one: the smallest step), or the
    # float32 arithmetic of the code that computed them (a pow in float32 is off by ~1e-6 of the value).
    rtol, smallest_step = max(info.eps, FREQ_COMPUTE_RTOL), info.smallest_normal * info.eps

    def matches(theta: float) -> bool:
        expected = (1.0 / theta ** exponents).to(stored.dtype).double()  # rounded as the stored values were
        step = torch.clamp(expected.abs() * rtol, min=smallest_step)
        return bool(((freqs - expected).abs() <= step).all())

    if matches(cfg.rope_theta):
        return Verdict.ok(f"{field} = {cfg.rope_theta}, as the values of {source} show",
                          expected=cfg.rope_theta, obtained=cfg.rope_theta), None
    # least squares on log f = -exponent * log theta
    fit = float(torch.exp(-(torch.log(freqs) * exponents).sum() / (exponents ** 2).sum())) if hd > 2 else 0.0
    theta = next((v for d in range(1, 8) if (v := float(f"{fit:.{d}g}")) > 0 and matches(v)), None)
    verdict = Verdict.fail(f"config field {field} is {cfg.rope_theta} but the values of {source} are not those "
                           f"of that theta" + (f"; they are those of {theta}" if theta else ""),
                           expected=cfg.rope_theta, obtained=theta or "another theta")
    return verdict, ({field: theta} if theta else f"set {field} to the training run's value: {source} was "
                     "computed with another theta")


def _heads(facts: Facts, name: str) -> tuple[Verdict, dict[str, object] | str | None]:
    cfg, q, k = facts.cfg, facts.inferred.q_rows, facts.inferred.kv_rows
    field = cfg.field_name(name)
    if q is None or k is None:
        return Verdict.skip(f"the weights do not show {name} ({facts.q_name} or {facts.k_name} is missing)"), None
    hd = cfg.head_dim
    configured = getattr(cfg, name)
    rows_of = {"n_heads": (q, facts.q_name), "n_kv_heads": (k, facts.k_name)}
    rows, tensor = rows_of[name]
    mismatch = configured * hd != rows
    why = (f"{field} × head_dim = {configured} × {hd} = {configured * hd}, but {tensor} has {rows} rows"
           + _implicit_note(cfg))
    if mismatch:
        return (Verdict.fail(why, expected=_json(configured), obtained=f"{q} / {k} rows"),
                ZERO_SIZE if 0 in (q, k, facts.inferred.dim) else _head_fix(facts))
    for w in facts.witnesses:
        shown = rows // w.head_dim
        if shown != configured:
            return (Verdict.fail(f"config field {field} is {configured} but {w.source} shows head_dim "
                                 f"{w.head_dim}, so {name} = {shown}", expected=configured, obtained=shown),
                    _head_fix(facts))
    if facts.witnesses:
        sources = " and ".join(w.source for w in facts.witnesses)
        return Verdict.ok(f"{field} = {configured}, as {sources} shows with the q/k rows",
                          expected=configured, obtained=configured), None
    return Verdict.skip(_unverifiable(facts, name)), None


def _implicit_note(cfg: ModelConfig) -> str:
    stated = cfg.states("head_dim")
    return "" if stated else f" (the config states no head_dim, so it is dim / n_heads = {cfg.head_dim})"


def _unverifiable(facts: Facts, name: str) -> str:
    cfg, q, k = facts.cfg, facts.inferred.q_rows, facts.inferred.kv_rows
    assert q is not None and k is not None
    splits = [f"{q // hd} × {hd}" for hd in _fitting_head_dims(q, k, cfg.head_dim)]
    return (f"{cfg.field_name(name)} = {getattr(cfg, name)} cannot be verified: the weights fix only heads × head_dim "
            f"({facts.q_name} has {q} rows: {' or '.join(splits)}), and nothing in or beside the checkpoint states "
            f"head_dim (rope.freqs, q/k norms, {WITNESS_RULE}); conversions will assume "
            f"head_dim = {cfg.head_dim}")


def _fitting_head_dims(q: int, k: int, first: int, most: int = 3) -> list[int]:
    """The config's head_dim, then other (even) head sizes that split both q and k rows into whole heads: the
    largest first, from the largest head size any model has (the rows come from the file's shapes, which can
    declare 2**40 rows of a zero-element tensor)."""
    largest = min(math.gcd(q, k), int(LIMITS["head_dim"]))
    others = (h for h in range(largest, 0, -1)
              if h != first and h % 2 == 0 and q % h == 0 and k % h == 0 and (q // h) % (k // h) == 0)
    return [first, *itertools.islice(others, most - 1)]


def target_split(facts: Facts) -> tuple[int, int, int] | None:
    """(n_heads, n_kv_heads, head_dim) a fix should state: a witness's head_dim, else the config's own
    statements in order of how explicit they are (a stated head_dim, n_heads, n_kv_heads); None when no even
    head size splits the rows."""
    cfg, q, k = facts.cfg, facts.inferred.q_rows, facts.inferred.kv_rows
    assert q is not None and k is not None
    candidates = [w.head_dim for w in facts.witnesses]
    if cfg.states("head_dim"):
        candidates.append(cfg.head_dim)
    candidates += [q // cfg.n_heads if q % cfg.n_heads == 0 else 0,
                   k // cfg.n_kv_heads if k % cfg.n_kv_heads == 0 else 0, cfg.head_dim]
    # Only an even head size is a fix (configs.head_size_error); the largest even one that divides both, else none.
    candidates.append(math.gcd(q, k))
    hd = next((h for h in candidates if h and not head_size_error(h) and q % h == 0 and k % h == 0), None)
    return None if hd is None else (q // hd, k // hd, hd)


def _head_fix(facts: Facts) -> dict[str, object] | str:
    """The head fields that change, as assignments to the config's fields (``_fields``), or why none can."""
    cfg, split = facts.cfg, target_split(facts)
    if split is None:
        return (f"no even head size splits {facts.q_name}'s {facts.inferred.q_rows} rows and {facts.k_name}'s "
                f"{facts.inferred.kv_rows} rows into heads: the weights are no rotary attention a config can describe")
    target = dict(zip(HEADS, split, strict=True))
    return _fields(facts, {name: value for name, value in target.items() if value != getattr(cfg, name)})


def _fields(facts: Facts, fix: dict[str, object]) -> dict[str, object] | str:
    """A fix as assignments to the config file's own fields, with every implicit field it would move pinned:
    n_kv_heads defaults to n_heads, head_dim to dim / n_heads, and a Meta/lingua FFN width is computed from
    dim.  Each fix then holds alone and together with the other checks' fixes.  A Meta params.json has no
    head_dim: the fix pins dim and the head counts whose dim / n_heads gives the head size (a stated
    head_dim becomes null), and a head size no dim / n_heads gives is no config edit at all."""
    cfg, inferred = facts.cfg, facts.inferred
    out = dict(fix)
    heads_known = inferred.q_rows is not None and inferred.kv_rows is not None
    nq, kv, hd = (heads_known and target_split(facts)) or (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    new_heads = int(out.get("n_heads", cfg.n_heads))  # type: ignore[call-overload]
    if "n_heads" in out and "n_kv_heads" not in out and not cfg.states("n_kv_heads"):
        out["n_kv_heads"] = kv
    # head_dim must hold with this fix alone and with the dim check's fix too.
    dims = {int(out.get("dim", cfg.dim)), inferred.dim or cfg.dim}  # type: ignore[call-overload]
    implicit_holds = all(d % new_heads == 0 and d // new_heads == hd for d in dims)
    if not cfg.states("head_dim") and ("dim" in out or "n_heads" in out or "head_dim" in out):
        if implicit_holds:
            out.pop("head_dim", None)  # dim / n_heads already gives it
        else:
            out["head_dim"] = hd
    if cfg.schema in NO_HEAD_DIM_FIELD and "head_dim" in out:
        weights_dim = inferred.dim or cfg.dim
        if nq * hd != weights_dim:
            return META_CANNOT_HEAD_DIM
        # Meta derives head_dim = dim / n_heads: pin the dim and the split that give it.
        target = {"dim": weights_dim, "n_heads": nq, "n_kv_heads": kv}
        out.update({k: v for k, v in target.items() if k in out or v != getattr(cfg, k)})
        if "n_heads" in out and not cfg.states("n_kv_heads"):
            out["n_kv_heads"] = kv
        if cfg.states("head_dim"):
            out["head_dim"] = None
        else:
            out.pop("head_dim")
    if cfg.schema != "hf":
        section = cfg.raw.get("model", {}) if cfg.schema == "lingua" else cfg.raw
        ffn = int(out.pop("ffn_dim", inferred.ffn_dim or cfg.ffn_dim))  # type: ignore[call-overload]
        new_dim = int(out.get("dim", cfg.dim))  # type: ignore[call-overload]
        if "ffn_dim" in fix or ("dim" in out and ffn_hidden(
                new_dim, section.get("multiple_of", 256), section.get("ffn_dim_multiplier")) != ffn):
            out.update(ffn_params(new_dim, ffn))
    prefix = "model." if cfg.schema == "lingua" else ""
    return {cfg.field_name(k) if k in cfg.fields else prefix + k: v for k, v in out.items()}


def _json(value: object) -> str:
    return json.dumps(value)
