"""The training state beside the weights, read into one shape whatever the framework saved.

Optimizer state comes keyed by parameter name (``get_state_dict``: lingua, torchtitan) or by position
(a plain ``optimizer.state_dict()``); param groups as a list with ``params`` (the usual form), one list
in one entry (DCP before torch 2.4), or per parameter (torchtitan's flattened form).  Scheduler and
data-loader state live in sections (torchtitan, Lightning, plain files) or, for lingua step folders, in
``train_state_<rank>.json`` files beside the DCP files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bounded_json import shown
from .files import check_inside
from .formats import Checkpoint
from .manifest import TensorInfo

SCHEDULER_SECTIONS = ("lr_scheduler", "lr_schedulers", "scheduler")
DATALOADER_SECTIONS = ("dataloader", "data_loader")
TRAIN_STATE_RE = re.compile(r"^train_state_([0-9]+)\.json$")
DISTCP_RE = re.compile(r"^__([0-9]+)_.*\.distcp$")


def is_position(key: str) -> bool:
    """A list index or a plain optimizer's parameter position as a flattened key spells it: ASCII digits
    only, short enough to be an index (str.isdigit also takes '²' and '١', which int() refuses or misreads)."""
    return key.isascii() and key.isdigit() and len(key) <= MAX_POSITION_DIGITS


MAX_POSITION_DIGITS = 18


@dataclass
class FieldValue:
    """One field of one parameter's state: a tensor (by manifest key) or a plain value."""

    key: str
    tensor: TensorInfo | None = None
    value: Any = None


@dataclass
class OptimizerView:
    section: str
    keyed_by: str  # "name" or "index"
    params: dict[str, dict[str, FieldValue]] = field(default_factory=dict)
    # param -> number of groups listing it; None when the groups cannot be read
    group_membership: dict[str, int] | None = None
    groups_form: str = ""

    @property
    def fields(self) -> set[str]:
        return {f for entries in self.params.values() for f in entries}


def optimizer_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """Paths of optimizer entries as (section, "state"|"param_groups", parameter, field).

    torchtitan saves the optimizer already flattened by get_optimizer_state_dict, so its DCP paths are
    ("optimizer", "state.<fqn>.<field>"): parameter names have dots, the field never does.
    """
    if len(path) == 2 and path[1].startswith(("state.", "param_groups.")) and path[1].count(".") >= 2:
        kind, _, rest = path[1].partition(".")
        param, _, field_name = rest.rpartition(".")
        return path[0], kind, param, field_name
    return path


def optimizer_view(ckpt: Checkpoint) -> OptimizerView | None:
    m = ckpt.manifest
    section = m.optimizer_section
    if section is None:
        return None
    view = OptimizerView(section, "name")
    for key, raw in m.extra_paths.items():
        path = optimizer_path(raw)
        if len(path) == 4 and path[0] == section and path[1] == "state":
            entry = view.params.setdefault(path[2], {})
            entry[path[3]] = FieldValue(key, m.extra_tensors.get(key))
    if view.params and all(is_position(p) for p in view.params):
        view.keyed_by = "index"
    view.group_membership, view.groups_form = _groups(ckpt, section)
    return view


def _groups(ckpt: Checkpoint, section: str) -> tuple[dict[str, int] | None, str]:
    m = ckpt.manifest
    paths = {k: p for k, raw in m.extra_paths.items()
             if len(p := optimizer_path(raw)) >= 2 and p[0] == section and p[1] == "param_groups"}
    if not paths:
        return None, "absent"
    membership: dict[str, int] = {}
    whole = [k for k, p in paths.items() if len(p) == 2]
    if whole:  # DCP before torch 2.4 kept the whole list as one entry
        groups = ckpt.load_value(whole[0])
        for group in groups if isinstance(groups, list) else []:
            for name in group.get("params", []) if isinstance(group, dict) else []:
                membership[str(name)] = membership.get(str(name), 0) + 1
        return membership, "one entry (DCP before torch 2.4)"
    listed = [k for k, p in paths.items() if len(p) == 4 and is_position(p[2]) and p[3] == "params"]
    if listed:
        for key in listed:
            names = ckpt.load_value(key)
            for name in names if isinstance(names, (list, tuple)) else []:
                membership[str(name)] = membership.get(str(name), 0) + 1
        return membership, "list of groups"
    for p in paths.values():  # torchtitan's flattened form: param_groups.<fqn>.<hyperparameter>
        if len(p) == 4:
            membership[p[2]] = 1
    return membership, "one entry per parameter"


def group_hyperparameters(ckpt: Checkpoint, section: str) -> list[tuple[str, str, Any]]:
    """(group, name, value) for every hyperparameter of every param group (lr, betas, eps...), whichever
    form the groups take: one whole list (DCP before torch 2.4), a list of groups, or one entry per
    parameter (torchtitan).  A tensor value (a capturable optimizer's lr) is read as its number."""
    m = ckpt.manifest
    found: list[tuple[str, str, Any]] = []
    for key, raw in m.extra_paths.items():
        path = optimizer_path(raw)
        if len(path) < 2 or path[0] != section or path[1] != "param_groups":
            continue
        if len(path) == 2:
            groups = ckpt.load_value(key)
            for i, group in enumerate(groups if isinstance(groups, list) else []):
                for name, value in group.items() if isinstance(group, dict) else ():
                    if name != "params":
                        found.append((str(i), str(name), value))
        elif len(path) == 4 and path[3] != "params":
            info = m.extra_tensors.get(key)
            value = ckpt.load(key) if info is not None else ckpt.load_value(key)
            found.append((path[2], path[3], value.item() if info is not None and info.numel == 1 else value))
    return found


@dataclass
class TrainState:
    """What besides the optimizer a resume needs, and where it was found."""

    scheduler: str | None = None  # where, or None
    data_loader: str | None = None
    step: int | None = None
    bad_step: str | None = None  # a recorded step that is no whole number >= 0 (NaN, Inf, negative, a bool), shown
    saved_ranks: int | None = None  # world size that wrote the checkpoint, when known
    dp_ranks: int | None = None  # data-parallel ranks among them, when the config says
    state_ranks: int | None = None  # how many per-rank train states there are
    notes: list[str] = field(default_factory=list)


def train_state(ckpt: Checkpoint) -> TrainState:
    from .configs import read_json
    from .errors import InputError

    m = ckpt.manifest
    ts = TrainState()
    for name in SCHEDULER_SECTIONS:
        if name in m.sections:
            ts.scheduler = f"section {name!r}"
    for name in DATALOADER_SECTIONS:
        if name in m.sections:
            ts.data_loader = f"section {name!r}"
            ranks = {p[1] for p in m.extra_paths.values() if len(p) > 1 and p[0] == name and p[1].startswith("dp_rank_")}
            if ranks:
                ts.state_ranks = len(ranks)
    for key in m.extra_entries:
        if key in ("train_state.step", "step", "global_step"):
            try:
                _record_step(ts, ckpt.load_value(key), key)
            except InputError:
                pass
    folder = Path(m.path)
    if m.format == "dcp" and folder.is_dir():
        writers = {int(mt.group(1)) for f in folder.iterdir() if (mt := DISTCP_RE.match(f.name))}
        ts.saved_ranks = len(writers) or None
        files = sorted(f for f in folder.iterdir() if TRAIN_STATE_RE.match(f.name))
        params = folder / "params.json"
        for found in (*files, *([params] if params.is_file() else [])):  # found, not named: must not lead out
            check_inside(found, folder)
        if params.is_file() and ts.saved_ranks:
            dist = read_json(params).get("distributed", {})
            tp = dist.get("tp_size", 1) if isinstance(dist, dict) else 1
            if isinstance(tp, int) and tp > 1 and ts.saved_ranks % tp == 0:
                ts.dp_ranks = ts.saved_ranks // tp
                ts.notes.append(f"tensor parallel size {tp} (params.json)")
        if files:
            ts.state_ranks = len(files)
            first = read_json(files[0])
            if "scheduler" in first:
                ts.scheduler = f"{files[0].name} (and {len(files) - 1} more)" if len(files) > 1 else files[0].name
            if "data_loader_state" in first:
                ts.data_loader = ts.scheduler if "scheduler" in first else files[0].name
            if "step" in first:
                _record_step(ts, first["step"], files[0].name)
    return ts


def _record_step(ts: TrainState, value: Any, where: str) -> None:
    """The train state's step when it is a whole number >= 0; anything else is kept, shown, as bad_step."""
    whole = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if whole and value >= 0:
        ts.step = int(value)
    else:
        ts.bad_step = f"{where} = {shown(value) if isinstance(value, (int, float, str, bool)) else type(value).__name__}"
