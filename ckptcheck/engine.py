"""The engine's front door: open a checkpoint and a config, plan the checks, run them.

Both the pytest plugin and the CLI go through ``plan``; neither knows about formats or checks.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from . import dtypes
from .checks.model import Check, CheckResult, Status, Verdict
from .configs import CONFIG_NAMES, ModelConfig, load_config
from .errors import InputError, UnsafeInputError
from .files import check_inside
from .formats import Checkpoint, open_checkpoint
from .manifest import Manifest, TensorInfo
from .naming import CUSTOM, KeyMapping, map_keys
from .spec import ModelSpec, spec_from_config, spec_from_factory
from .suite import Suite, load_suite

@dataclass(frozen=True)
class Options:
    target: str = "init"
    dtype: str | None = None
    metadata_only: bool = False
    model_factory: str | None = None
    # world sizes for the FSDP round trip (none: no round trip), and the one to reshard to
    roundtrip: tuple[int, ...] | str | None = ()
    reshard: int | str | None = None

    def __post_init__(self) -> None:
        load_suite(self.target)  # validates the name against suites/
        object.__setattr__(self, "roundtrip", _world_sizes(self.roundtrip, "--roundtrip"))
        if self.reshard is not None:
            (reshard,) = _world_sizes(str(self.reshard), "--reshard")
            if not self.roundtrip:
                raise InputError(None, "--reshard", "needs --roundtrip")
            object.__setattr__(self, "reshard", reshard)
        if self.roundtrip and self.metadata_only:
            raise InputError(None, "--roundtrip", "loads every tensor into the sharded model; it cannot run with "
                             "--metadata-only (drop one of the two)")
        if self.dtype is not None:
            object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))

    @property
    def requested(self) -> tuple[str, ...]:
        """Check categories asked for by an option: they run whatever the target's suite lists."""
        return ("fsdp_roundtrip",) if self.roundtrip else ()


def _world_sizes(value: tuple[int, ...] | str | None, flag: str) -> tuple[int, ...]:
    if not value:
        return ()
    if isinstance(value, tuple):
        return value
    try:
        sizes = tuple(int(v) for v in str(value).split(","))
    except ValueError:
        raise InputError(None, flag, f"expected world sizes such as 2 or 1,2,4, got {value!r}") from None
    if any(n < 1 or n > 64 for n in sizes):
        raise InputError(None, flag, f"world sizes must be between 1 and 64, got {value!r}")
    return sizes


@dataclass
class Session:
    """An opened checkpoint checked against a spec: the context every check reads."""

    checkpoint: Checkpoint
    spec: ModelSpec
    options: Options
    config: ModelConfig | None
    ckpt_arg: str
    config_arg: str | None
    notes: list[str] = field(default_factory=list)

    @cached_property
    def optimizer_view(self) -> Any:
        """The checkpoint's optimizer state, read once for every resume check (training_state.OptimizerView)."""
        from .training_state import optimizer_view

        return optimizer_view(self.checkpoint)

    @cached_property
    def train_state(self) -> Any:
        from .training_state import train_state

        return train_state(self.checkpoint)

    @cached_property
    def suite(self) -> Suite:
        return load_suite(self.options.target).including(self.options.requested)

    @property
    def manifest(self) -> Manifest:
        return self.checkpoint.manifest

    @cached_property
    def mapping(self) -> KeyMapping:
        return map_keys(self.manifest.tensors, CUSTOM if self.spec.scheme.is_custom else None)

    @cached_property
    def by_canonical(self) -> dict[str, TensorInfo]:
        return {c: self.manifest.tensors[s] for s, c in self.mapping.canonical.items()}

    @cached_property
    def expected_dtype(self) -> tuple[str | None, str]:
        """The dtype every tensor should have, and where that expectation comes from."""
        if self.options.dtype:
            return self.options.dtype, "--ckpt-dtype"
        if self.spec.dtype:
            field_name = "torch_dtype" if self.config and self.config.schema == "hf" else "dtype"
            return self.spec.dtype, f"the config's {field_name}"
        counts: Counter[str] = Counter()
        for t in self.manifest.tensors.values():
            counts[t.dtype] += t.numel
        if not counts:
            return None, "no tensors"
        top = max(sorted(counts), key=lambda d: counts[d])
        return top, "the checkpoint's dominant dtype"

    def describe_checkpoint(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": self.ckpt_arg, "format": m.format, "naming": self.mapping.scheme.name,
            "wrappers": list(self.mapping.wrappers), "nesting": m.nesting, "sections": list(m.sections),
            "tensors": len(m.tensors), "bytes": m.total_bytes,
            "dtypes": dict(sorted(Counter(t.dtype for t in m.tensors.values()).items())),
            "facts": dict(m.facts),
        }

    def describe_config(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.config_arg, "naming": self.spec.scheme.name,
                                "expected_tensors": len(self.spec.tensors)}
        if self.config is not None:
            data.update(self.config.describe())
            data["path"] = self.config.source
        if self.options.model_factory:
            data["model_factory"] = self.options.model_factory
        return data


@dataclass
class Plan:
    """The checks for one run, plus the session they read (None when the input was refused as unsafe)."""

    checks: list[Check]
    session: Session | None
    checkpoint_info: dict[str, Any]
    config_info: dict[str, Any]

    def close(self) -> None:
        if self.session is not None:
            self.session.checkpoint.close()


def resolve_config_path(ckpt: str | os.PathLike[str], config: str | os.PathLike[str] | None) -> str | None:
    """The config to use: the one given, else a params.json/config.json beside or inside the checkpoint."""
    if config is not None:
        return str(config)
    p = Path(ckpt)
    for folder in (p, p.parent) if p.is_dir() else (p.parent,):
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                check_inside(folder / name, folder)  # found, not named: it must not lead out, as a shard must not
                return str(folder / name)
    return None


def open_session(ckpt: str | os.PathLike[str], config: str | os.PathLike[str] | None, options: Options) -> Session:
    """Open both inputs; raises ``InputError`` or ``UnsafeInputError``.  The checkpoint is opened first: an
    unsafe one is reported as unsafe whatever is wrong with the config, or when there is none."""
    checkpoint = open_checkpoint(ckpt)
    try:
        config_arg = resolve_config_path(ckpt, config)
        cfg = load_config(config_arg) if config_arg is not None else None
        if options.model_factory:
            spec = spec_from_factory(options.model_factory, cfg)
        elif cfg is not None:
            spec = spec_from_config(cfg, len(checkpoint.manifest.tensors))
        else:
            raise InputError(ckpt, None, "no model config: pass --model-config (params.json or config.json) or "
                             "--model-factory")
    except BaseException:
        checkpoint.close()
        raise
    session = Session(checkpoint, spec, options, cfg, str(ckpt), config_arg)
    if config is None and config_arg is not None:
        session.notes.append(f"using the config found beside the checkpoint: {config_arg}")
    return session


def plan(ckpt: str | os.PathLike[str], config: str | os.PathLike[str] | None, options: Options) -> Plan:
    """Every check for this checkpoint and config, in a stable order.  Raises ``InputError``.

    Input that tries to execute code is not an error to the caller but a plan of one ``unsafe`` check,
    so it shows up as a failed item or a failed check like any other finding.
    """
    from .checks import plan_checks

    try:
        session = open_session(ckpt, config, options)
    except UnsafeInputError as exc:
        verdict = Verdict(Status.UNSAFE, exc.line(), expected="only allowlisted pickle globals and paths",
                          obtained=exc.culprit, repair="do not load this file; obtain the checkpoint from a trusted source")
        check = Check("safety", exc.path or str(ckpt), lambda: verdict)
        return Plan([check], None, {"path": str(ckpt)}, {"path": None if config is None else str(config)})
    return Plan(plan_checks(session), session, session.describe_checkpoint(), session.describe_config())


def run(plan_: Plan) -> list[CheckResult]:
    return [check.run() for check in plan_.checks]


def summarize(results: Iterable[CheckResult]) -> dict[str, Any]:
    """Counts by status and category, in one pass: ``results`` may stream (the CLI keeps none of them)."""
    counts: Counter[str] = Counter()
    by_category: dict[str, dict[str, int]] = {}
    for r in results:
        status = r.status.value
        counts[status] += 1
        by_category.setdefault(r.category, Counter())[status] += 1  # type: ignore[index]
    verdict = "unsafe" if counts["unsafe"] else "fail" if counts["fail"] else "pass"
    return {
        "verdict": verdict, "total": counts.total(),
        **{s.value: counts[s.value] for s in Status},
        "by_category": {k: dict(v) for k, v in by_category.items()},
    }
