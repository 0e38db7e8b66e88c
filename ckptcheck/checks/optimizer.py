"""Can training resume from this: per-parameter optimizer state, param groups, step, scheduler and
data-loader state.  Planned by the resume suite; each failure names the parameter and the field."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import dtypes
from ..bounded_json import shown
from ..naming import map_keys
from ..training_state import group_hyperparameters, is_position
from .model import Check, Verdict

if TYPE_CHECKING:
    from ..engine import Session
    from ..training_state import OptimizerView, TrainState

ADAMW_FIELDS = ("step", "exp_avg", "exp_avg_sq")
SHAPED_FIELDS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq")
SQUARED_FIELDS = ("exp_avg_sq", "max_exp_avg_sq")  # running means of squares: never negative
NO_OPTIMIZER = "no optimizer state at all (see resume[optimizer])"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What a param group's hyperparameter must be for the optimizer to step sanely: name -> (test, wanted).
# A NaN lr or eps <= 0 trains nothing but NaN from the first step on; betas outside [0, 1) diverge.
HYPERPARAMETERS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "eps": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1)"),
    "momentum": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
}


def _view(session: Session) -> OptimizerView | None:
    return session.optimizer_view


def _train(session: Session) -> TrainState:
    return session.train_state


def _trainable(session: Session) -> list[str]:
    """Canonical keys of the parameters an optimizer holds state for, in module registration order."""
    return [k for k in session.spec.tensors if k not in session.spec.tied]


def _state_by_canonical(session: Session, view: OptimizerView) -> dict[str, dict[str, Any]]:
    if view.keyed_by == "index":
        order = _trainable(session)
        return {order[int(i)]: entries for i, entries in view.params.items() if int(i) < len(order)}
    mapping = map_keys(view.params, None if not session.spec.scheme.is_custom else session.spec.scheme)
    return {c: view.params[s] for s, c in mapping.canonical.items()}


def plan_optimizer(session: Session) -> list[Check]:
    checks = [Check("optimizer_state", session.spec.display(k), _param_state(session, k), reads_data=True)
              for k in _trainable(session)]
    checks.append(Check("optimizer_groups", "all", _groups(session)))
    checks.append(Check("optimizer_step", "all", _step(session), reads_data=True))
    return checks


def _param_state(session: Session, key: str):
    def evaluate() -> Verdict:
        view = _view(session)
        if view is None:
            return Verdict.skip(NO_OPTIMIZER)
        shown = session.spec.display(key)
        entries = _state_by_canonical(session, view).get(key)
        if entries is None:
            how = f"position {_trainable(session).index(key)}" if view.keyed_by == "index" else "name"
            return Verdict.fail(f"{shown} has no optimizer state (looked up by {how} in {view.section}.state)",
                                expected="state for every trainable parameter", obtained="missing",
                                repair=_init_repair(session))
        wanted = ADAMW_FIELDS if view.fields & {"exp_avg", "exp_avg_sq"} else tuple(sorted(view.fields))
        missing = [f for f in wanted if f not in entries]
        if missing:
            return Verdict.fail(f"{shown}: optimizer state lacks {', '.join(missing)}",
                                expected=", ".join(wanted), obtained=", ".join(sorted(entries)) or "nothing",
                                repair=_init_repair(session))
        shape = session.spec.tensors[key].shape
        for name in SHAPED_FIELDS:
            fv = entries.get(name)
            if fv is not None and fv.tensor is not None and not _fits(fv.tensor.shape, shape):
                return Verdict.fail(
                    f"{shown}: {name} has shape {list(fv.tensor.shape)}, the parameter {_shape(shape)}",
                    expected=_shape(shape), obtained=str(list(fv.tensor.shape)),
                    repair="this optimizer state belongs to another model; "
                    + (_init_repair(session) or "start it afresh"))
        if session.options.metadata_only:
            return Verdict.ok(f"{', '.join(sorted(entries))} present with the parameter's shape (values not read: "
                              "--metadata-only)", expected=", ".join(wanted), obtained=", ".join(sorted(entries)))
        bad = _bad_moment(session, entries)
        if bad is not None:
            return Verdict.fail(f"{shown}: {bad}", expected="finite moments, second moments >= 0", obtained=bad,
                                repair=_init_repair(session))
        return Verdict.ok(f"{', '.join(sorted(entries))} present with the parameter's shape, values finite",
                          expected=", ".join(wanted), obtained=", ".join(sorted(entries)))

    return evaluate


def _bad_moment(session: Session, entries: dict[str, Any]) -> str | None:
    """What is wrong with a parameter's moment values (NaN/Inf anywhere, a negative second moment), or None;
    each tensor scanned in bounded chunks, one at a time."""
    from .tensors import _count_nonfinite

    for name in SHAPED_FIELDS:
        fv = entries.get(name)
        if fv is None or fv.tensor is None or fv.tensor.dtype not in dtypes.FLOATING:
            continue
        counts = _count_nonfinite(session, fv.key, fv.tensor)
        if counts is not None:
            return f"{name} holds {counts[0]} NaN and {counts[1]} Inf values ({counts[2]})"
        if name in SQUARED_FIELDS:
            negative = int((session.checkpoint.load(fv.key) < 0).sum())
            if negative:
                return f"{name} holds {negative} negative values (a running mean of squares)"
    return None


def _fits(got: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    return len(got) == len(want) and all(w is None or w == g for g, w in zip(got, want, strict=True))


def _shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _groups(session: Session):
    def evaluate() -> Verdict:
        view = _view(session)
        if view is None:
            return Verdict.skip(NO_OPTIMIZER)
        if view.group_membership is None:
            return Verdict.fail(f"{view.section} has no param_groups", expected="param groups listing every parameter",
                                obtained="absent", repair=_init_repair(session))
        order = _trainable(session)
        if view.keyed_by == "index" or all(is_position(str(k)) for k in view.group_membership):
            counts = {order[int(k)]: n for k, n in view.group_membership.items()
                      if is_position(str(k)) and int(k) < len(order)}
        else:
            mapping = map_keys(view.group_membership)
            counts = {c: view.group_membership[s] for s, c in mapping.canonical.items()}
        bad = [f"group {group} {name} is {_shown(value)}, not {HYPERPARAMETERS[name][1]}"
               for group, name, value in group_hyperparameters(session.checkpoint, view.section)
               if name in HYPERPARAMETERS and not HYPERPARAMETERS[name][0](value)]
        if bad:
            return Verdict.fail(f"{view.section}.param_groups: {'; '.join(bad[:3])}", expected="sane hyperparameters",
                                obtained=bad[0], repair=_init_repair(session))
        missing = [session.spec.display(k) for k in order if counts.get(k, 0) == 0]
        twice = [session.spec.display(k) for k in order if counts.get(k, 0) > 1]
        if missing or twice:
            parts = []
            if missing:
                parts.append(f"in no param group: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            if twice:
                parts.append(f"in several param groups: {', '.join(twice[:5])}")
            return Verdict.fail("; ".join(parts), expected="every parameter in exactly one group",
                                obtained=f"{len(missing)} in none, {len(twice)} in several", repair=_init_repair(session))
        return Verdict.ok(f"{len(order)} parameters, each in exactly one group ({view.groups_form})")

    return evaluate


def _shown(value: Any) -> str:
    """A plain value quoted as every input value is (bounded_json.shown); any other object by its type only."""
    return shown(value) if isinstance(value, (int, float, str, list, tuple, type(None))) else f"a {type(value).__name__}"


def _step(session: Session):
    def evaluate() -> Verdict:
        if session.options.metadata_only:
            return Verdict.skip("step values not read (--metadata-only)")
        view = _view(session)
        if view is None:
            return Verdict.skip(NO_OPTIMIZER)
        steps: dict[str, float] = {}
        for name, entries in view.params.items():
            fv = entries.get("step")
            if fv is None:
                continue
            value = session.checkpoint.load(fv.key) if fv.tensor is not None else session.checkpoint.load_value(fv.key)
            if fv.tensor is not None and fv.tensor.numel == 1:
                value = value.item()
            if not _number(value) or value < 0 or value != int(value):
                return Verdict.fail(f"{name}: optimizer step is {_shown(value)}, not a whole number >= 0",
                                    expected="a whole number >= 0", obtained=_shown(value),
                                    repair=_init_repair(session))
            steps[name] = float(value)
        if not steps:
            return Verdict.skip("this optimizer keeps no step")
        distinct = sorted(set(steps.values()))
        if len(distinct) > 1:
            odd = [n for n, v in steps.items() if v != distinct[-1]][:4]
            return Verdict.fail(f"parameters disagree on the optimizer step: {distinct[:5]} (e.g. {', '.join(odd)})",
                                expected="one step for all", obtained=str(distinct[:5]), repair=_init_repair(session))
        step = distinct[0]
        ts = _train(session)
        if ts.bad_step is not None:
            return Verdict.fail(f"the train state's step is not a whole number >= 0: {ts.bad_step}",
                                expected="a whole number >= 0", obtained=ts.bad_step,
                                repair="resume from a checkpoint whose train state is intact")
        if ts.step is not None and ts.step != step:
            return Verdict.fail(f"optimizer step {step:g} but the train state says step {ts.step}",
                                expected=str(ts.step), obtained=f"{step:g}",
                                repair="resume from a checkpoint whose parts were saved together")
        return Verdict.ok(f"every parameter at step {step:g}" + (", as the train state says" if ts.step else ""),
                          expected="one step", obtained=f"{step:g}")

    return evaluate


def plan_train_state(session: Session) -> list[Check]:
    return [Check("train_state", "scheduler", _has(session, "scheduler")),
            Check("train_state", "data_loader", _has(session, "data_loader")),
            Check("train_state", "ranks", _ranks(session))]


WAYS_OUT = ("resume from the framework's step folder, which keeps it (lingua: checkpoint dump_dir step "
            "folders with train_state_*.json; torchtitan: the step-N DCP folder)")


def _has(session: Session, what: str):
    def evaluate() -> Verdict:
        ts = _train(session)
        where = getattr(ts, what)
        label = {"scheduler": "learning-rate scheduler state", "data_loader": "data-loader state"}[what]
        if where is None:
            return Verdict.fail(f"no {label}: a resumed run would restart the "
                                + ("schedule (warm-up again)" if what == "scheduler" else "data from the start"),
                                expected=label, obtained="absent", repair=WAYS_OUT)
        return Verdict.ok(f"{label} in {where}", expected=label, obtained=where)

    return evaluate


def _ranks(session: Session):
    def evaluate() -> Verdict:
        ts = _train(session)
        if ts.state_ranks is None or ts.saved_ranks is None:
            return Verdict.skip("the checkpoint does not say which ranks saved it")
        want = ts.dp_ranks or ts.saved_ranks
        if ts.state_ranks != want:
            return Verdict.fail(f"{ts.state_ranks} per-rank train states for {want} data-parallel ranks "
                                f"({ts.saved_ranks} ranks saved the checkpoint)",
                                expected=f"one per data-parallel rank: {want}", obtained=str(ts.state_ranks),
                                repair=WAYS_OUT)
        return Verdict.ok(f"{ts.state_ranks} train states for {want} data-parallel ranks"
                          + (f" ({'; '.join(ts.notes)})" if ts.notes else ""))

    return evaluate


def _init_repair(session: Session) -> str | None:
    from .repairs import command

    return (f"{command(session)} --init-optimizer-state  (writes fresh AdamW state at step 0 and leaves the train "
            "state behind: a run resumed from it restarts its schedule and its data)")


