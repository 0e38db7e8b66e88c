"""``repair``: run the checks, plan the conversion that fixes what failed, apply it, check the output.

A repair is a conversion with decided parameters: the config's naming and rotary layout, the expected
dtype, wrappers stripped, shards merged, nesting as the output format expects.  It drops a tensor only
when the tensor is provably redundant (a tied copy holding exactly the embedding's values, a buffer
loaders recompute) or the user names it (``--drop KEY``, never a tensor the config needs): a tensor the
config does not know may be one the real model has.
What a conversion cannot fix (another architecture, NaN weights, missing tensors, unsafe input, tensors
it would have to drop) is refused with the reason before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks.model import CheckResult, Status
from .convert.api import ConversionReport, convert, infer_output_format, refuse_lost_state, train_state_files
from .checks.repairs import UNREPAIRABLE, cast_loss
from .convert.heads import confirm_head_split
from .engine import Options, Plan, Session, plan, run
from .errors import InputError

# The output format a repair writes by default, from the input's format.
DEFAULT_OUTPUT = {"torch": "torch", "torch-legacy": "torch", "meta-shards": "torch", "safetensors": "safetensors",
                  "safetensors-sharded": "hf", "hf-bin-sharded": "hf", "dcp": "dcp"}
# Failures --init-optimizer-state repairs (by replacing the optimizer state altogether).
OPTIMIZER_CATEGORIES = ("resume", "optimizer_state", "optimizer_groups", "optimizer_step")
# Failures no conversion can repair, which do not stop the others from being repaired.
LEFT_AS_IS = {"train_state": "scheduler and data-loader state cannot be made up; the output will still fail "
                             "these checks"}


@dataclass
class RepairPlan:
    steps: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    to: str = "torch"
    naming: str | None = None
    dtype: str | None = None
    drop: dict[str, str] = field(default_factory=dict)
    init_optimizer_state: bool = False
    weights_only: bool = False
    left_as_is: list[str] = field(default_factory=list)

    @property
    def possible(self) -> bool:
        return not self.refusals


@dataclass
class RepairOutcome:
    plan: RepairPlan
    before: list[CheckResult]
    conversion: ConversionReport | None = None
    after: list[CheckResult] = field(default_factory=list)

    @property
    def repaired(self) -> bool:
        return self.conversion is not None and all(r.status not in (Status.FAIL, Status.UNSAFE) for r in self.after)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.plan.steps, "refusals": self.plan.refusals, "to": self.plan.to,
            "drop": self.plan.drop,
            "left_as_is": self.plan.left_as_is,
            "conversion": None if self.conversion is None else self.conversion.to_json(),
            "failed_before": [r.id for r in self.before if r.status in (Status.FAIL, Status.UNSAFE)],
            "failed_after": [r.id for r in self.after if r.status in (Status.FAIL, Status.UNSAFE)],
            "not_verifiable_after": [r.id for r in self.after if r.status is Status.SKIP],
            "repaired": self.repaired,
        }


def _ids(results: list[CheckResult], category: str) -> str:
    ids = [r.id for r in results if r.category == category]
    return f"{', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''}"


def plan_repair(the_plan: Plan, results: list[CheckResult], dst: str | os.PathLike[str], to: str | None,
                init_optimizer_state: bool = False, drop: tuple[str, ...] = (),
                weights_only: bool = False, head_dim: int | None = None) -> RepairPlan:
    """What to do, writing ``dst`` (its suffix names the format unless ``to`` does); ``drop`` names tensors (stored or target names) the user wants left out, and
    ``weights_only`` leaves the training state behind (never done unasked); ``head_dim`` confirms the
    head split a q/k permutation assumes."""
    session = the_plan.session
    failed = [r for r in results if r.status in (Status.FAIL, Status.UNSAFE)]
    rp = RepairPlan(init_optimizer_state=init_optimizer_state, weights_only=weights_only)
    named = _named_drops(session, drop) if session is not None else {}
    _plan_extras(rp, [r for r in failed if r.category == "unexpected_key"], named)
    if session is not None and _drop_restores_tie(session, rp):
        failed = [r for r in failed if (r.category, r.key) != ("config", "tie_embeddings")]
    for category, why in UNREPAIRABLE.items():
        if any(r.category == category for r in failed):
            rp.refusals.append(f"{why}: {_ids(failed, category)}")
    optimizer_fails = [r for r in failed if r.category in OPTIMIZER_CATEGORIES]
    if optimizer_fails and not init_optimizer_state:
        rp.refusals.append(f"the optimizer state is missing or does not fit: {', '.join(r.id for r in optimizer_fails[:4])}"
                           " (pass --init-optimizer-state to start it afresh, or resume from a checkpoint that has it)")
    for category, why in LEFT_AS_IS.items():
        if any(r.category == category for r in failed):
            rp.left_as_is.append(f"{why}: {_ids(failed, category)}")
    if session is None:
        return rp
    from .naming import SCHEMES

    manifest = session.manifest
    suite = session.suite
    suite_to = suite.repair[suite.repair.index("--to") + 1] if "--to" in suite.repair else None
    rp.to = infer_output_format(Path(dst), to or suite_to, DEFAULT_OUTPUT.get(manifest.format, "torch"))
    # The naming the target loads: the framework's, else the config's.
    spec_scheme = SCHEMES[suite.naming] if suite.naming else session.spec.scheme
    rp.naming = None if spec_scheme.is_custom else ("hf" if rp.to == "hf" else spec_scheme.name)
    if rp.to == "hf" and spec_scheme.name != "hf":
        rp.refusals.append("--to hf writes Hugging Face names, but the config loads "
                           f"{spec_scheme.title} names; use --to torch, safetensors or dcp")
    from .migrations import applicable

    for migration in applicable(manifest):
        if migration.to is None or rp.to in migration.to:
            rp.steps.append(f"migrate ({migration.name}): {migration.title}")
    mapping = session.mapping
    if mapping.scheme.name != spec_scheme.name and not spec_scheme.is_custom:
        permute = mapping.scheme.rotary != spec_scheme.rotary
        if permute and session.config is not None:
            confirm_head_split(manifest, session.config, Path(session.ckpt_arg), head_dim)
        rp.steps.append(f"rename keys from {mapping.scheme.title} to {spec_scheme.title} naming"
                        + (" and permute wq/wk rows to the config's rotary layout" if permute else ""))
    if mapping.wrappers:
        rp.steps.append("strip wrapper prefixes " + ", ".join(repr(w) for w in mapping.wrappers))
    if manifest.format == "meta-shards":
        rp.steps.append(f"merge {len(manifest.files)} model-parallel shards")
    dtype_fails = [r for r in failed if r.category == "dtype"]
    if dtype_fails:
        want, source = session.expected_dtype
        lossy = cast_loss(session, want)
        if lossy:
            rp.refusals.append(f"{lossy} (a repair casts only what the cast merely rounds)")
        else:
            rp.dtype = want
            rp.steps.append(f"cast {len(dtype_fails)} tensors to {want} ({source})")
    for key, why in rp.drop.items():
        rp.steps.append(f"drop {key}: {why}")
    if manifest.nesting and rp.to == "safetensors":
        rp.steps.append(f"unwrap the model tensors from {manifest.nesting!r}")
    if rp.to == "dcp":
        rp.steps.append("nest the model tensors under 'model' (lingua's init_ckpt_path layout)")
    if rp.to in ("dcp", "hf") and session.config is not None:
        written = "config.json" if rp.to == "hf" or rp.naming == "hf" else "params.json"
        rp.steps.append(f"write {written} beside the weights, and check the output with it")
    if init_optimizer_state:
        if rp.to not in ("torch", "dcp"):
            rp.refusals.append(f"--to {rp.to} holds no optimizer state; use --to torch or --to dcp")
        rp.steps.append("INITIALISE optimizer state: AdamW at step 0 with zero moments for every parameter, "
                        "replacing whatever optimizer state the input has")
    state_files = [f.name for f in train_state_files(manifest)]
    if init_optimizer_state and state_files:
        # The fresh optimizer is at step 0, so a train state saying step N cannot travel with it (the output
        # would fail optimizer_step); without it the output's train_state checks fail where the input's passed.
        rp.steps.append(f"leave the train state behind ({', '.join(state_files)}: its step disagrees with the "
                        "fresh optimizer's step 0), so the output has no scheduler or data-loader state: a run "
                        "resumed from it restarts its schedule and its data")
    if weights_only and (manifest.sections or state_files):
        rp.steps.append(f"leave the training state behind ({', '.join([*manifest.sections, *state_files])}; "
                        "--weights-only)")
    elif not init_optimizer_state:
        refuse_lost_state(manifest, train_state_files(manifest), rp.to, Path(session.ckpt_arg))
        if manifest.sections or state_files:
            rp.steps.append(f"carry the training state over ({', '.join([*manifest.sections, *state_files])})")
    if not rp.steps and not rp.refusals:
        rp.steps.append("nothing to repair: every check passes (the output is a verified copy)")
    return rp


def _named_drops(session: Session, names: tuple[str, ...]) -> dict[str, str]:
    """Stored keys for the names given to --drop, as stored or as the config's naming spells them; never a
    tensor the configured model needs."""
    by_display = {session.spec.display(c): s for s, c in session.mapping.canonical.items()}
    out: dict[str, str] = {}
    for name in names:
        stored = name if name in session.manifest.tensors else by_display.get(name)
        if stored is None:
            raise InputError(session.ckpt_arg, "--drop", f"{name!r} is not a tensor of this checkpoint")
        canonical = session.mapping.canonical.get(stored)
        if canonical in session.spec.tensors:
            raise InputError(session.ckpt_arg, "--drop", f"{name!r} is {session.spec.display(canonical)}, a tensor "
                             "the configured model needs: without it the output would fail key_present")
        out[stored] = "named with --drop"
    return out


def _plan_extras(rp: RepairPlan, extras: list[CheckResult], named: dict[str, str]) -> None:
    """Drop what the user named and tied copies holding exactly the embedding's values; refuse every other
    extra tensor."""
    kept: list[str] = []
    for r in extras:
        details = r.details or {}
        if r.key in named:
            continue
        if details.get("redundant"):
            rp.drop[r.key] = f"{details['redundant']} (the tie the config asks for)"
        elif details.get("tied_copy_of"):
            rp.refusals.append(f"{r.message}: dropping it would lose trained values (set the config's tie flag "
                               f"to false if the model is untied, or --drop {r.key} to discard it)")
        else:
            kept.append(r.key)
    if kept:
        rp.refusals.append(f"tensors the configured model does not have, which a repair drops only when named: "
                           f"{', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''} (use the config of the model "
                           "that has them, or name each with --drop KEY to discard it)")
    rp.drop.update(named)


def _drop_restores_tie(session: Session, rp: RepairPlan) -> bool:
    """The config ties the embeddings and the separate output copy is dropped: the tie holds after."""
    copy = session.mapping.stored_for("output.weight")
    return session.config is not None and session.config.tie_embeddings and copy is not None and copy in rp.drop


def repair(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, config: str | os.PathLike[str] | None,
           options: Options, to: str | None = None, dry_run: bool = False, force: bool = False,
           progress: bool = False, init_optimizer_state: bool = False, drop: tuple[str, ...] = (),
           head_dim: int | None = None, weights_only: bool = False) -> RepairOutcome:
    the_plan = plan(src, config, options)
    try:
        before = run(the_plan)
        rp = plan_repair(the_plan, before, dst, to, init_optimizer_state, drop, weights_only, head_dim)
    finally:
        the_plan.close()
    outcome = RepairOutcome(rp, before)
    if dry_run or not rp.possible:
        return outcome
    session = the_plan.session
    assert session is not None
    cfg_for_convert = session.config
    outcome.conversion = convert(src, dst, to=rp.to, naming=rp.naming, config=cfg_for_convert, dtype=rp.dtype,
                                 force=force, progress=progress, drop=rp.drop,
                                 init_optimizer_state=rp.init_optimizer_state, recheck=False,
                                 head_dim=head_dim, weights_only=rp.weights_only)
    # Judge the output as written: with the config the conversion wrote beside it, if it wrote one.
    after_config = outcome.conversion.config_written or session.config_arg
    after_plan = plan(Path(dst), after_config, options)
    try:
        outcome.after = run(after_plan)
    finally:
        after_plan.close()
    return outcome
