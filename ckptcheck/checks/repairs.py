"""The repair each failure names, in one place so every check words it the same way.

Failures a conversion can fix name the exact ``ckptcheck repair`` command; the others say what a
person has to change.
"""

from __future__ import annotations

import shlex
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine import Session
    from ..formats import Checkpoint
    from ..naming import Scheme


# Failures no conversion can repair: ``ckptcheck repair`` refuses (writes nothing) while any of them fails,
# and reports and the matrix say so instead of offering a command.
UNREPAIRABLE = {
    "safety": "the input is unsafe to load",
    "config": "the config and the weights describe different models",
    "key_present": "tensors are missing and cannot be made up",
    "shape": "tensors have shapes the config does not allow",
    "finite": "weights hold NaN or Inf; restore them from an earlier checkpoint",
    "replicas": "model-parallel shards hold different copies of a replicated tensor; no conversion picks one",
}


def repaired_path(ckpt: str) -> str:
    """Where a repair writes by default: beside the input, marked as repaired."""
    p = Path(ckpt)
    if p.name == ".metadata":
        p = p.parent
    if p.is_dir() or not p.suffix:
        return str(p.parent / f"{p.name}.repaired")
    return str(p.with_name(f"{p.stem}.repaired{p.suffix}"))


def command(session: Session, *extra: str) -> str:
    """The ``ckptcheck repair`` command line for this session's checkpoint and config."""
    dst = repaired_path(session.ckpt_arg)
    to = extra[extra.index("--to") + 1] if "--to" in extra else None
    if to is not None:  # name the output as that format names its files or folders
        stem = str(Path(dst).with_suffix("")) if Path(dst).suffix in (".pth", ".pt", ".bin", ".safetensors") else dst
        dst = stem + {"torch": ".pth", "safetensors": ".safetensors"}.get(to, "")
    parts = ["ckptcheck", "repair", session.ckpt_arg, dst]
    if session.config_arg:
        parts += ["--model-config", session.config_arg]
    if session.options.target != "init":
        parts += ["--target", session.options.target]
    if session.options.dtype:
        parts += ["--dtype", session.options.dtype]
    parts += _output_flags(session, to)
    return shlex.join([*parts, *extra])


# The flags a repair command adds for an output format, per opened checkpoint: every failing check names a
# command, and working them out reads every key (once per check made the run quadratic in the keys).
_OUTPUT_FLAGS: weakref.WeakKeyDictionary[Checkpoint, dict[str | None, list[str]]] = weakref.WeakKeyDictionary()


def _output_flags(session: Session, to: str | None) -> list[str]:
    """--head-dim where the split is unconfirmed, --weights-only where the output cannot hold the state."""
    known = _OUTPUT_FLAGS.setdefault(session.checkpoint, {})
    if to not in known:
        head_dim = unconfirmed_head_dim(session, to)
        known[to] = ["--head-dim", str(head_dim)] if head_dim is not None else []
        if to is not None and not holds_training_state(session, to):  # the target loads weights only
            known[to].append("--weights-only")
    return known[to]


def holds_training_state(session: Session, to: str) -> bool:
    """Whether a ``to`` output can hold all of this checkpoint's training state (else the repair refuses
    without --weights-only)."""
    from ..convert.api import refuse_lost_state, train_state_files
    from ..errors import InputError

    try:
        refuse_lost_state(session.manifest, train_state_files(session.manifest), to, Path(session.ckpt_arg))
    except InputError:
        return False
    return True


def unconfirmed_head_dim(session: Session, to: str | None) -> int | None:
    """The config's head_dim when the repair permutes q/k rows and nothing in the checkpoint confirms the
    split: the command then states it (--head-dim), for the user to check against the training run."""
    from ..convert.heads import confirm_head_split
    from ..errors import InputError
    from ..naming import HF, SCHEMES

    cfg = session.config
    target = HF if to == "hf" else SCHEMES[session.suite.naming] if session.suite.naming else session.spec.scheme
    if cfg is None or target.is_custom or session.mapping.scheme.rotary == target.rotary:
        return None
    try:
        confirm_head_split(session.manifest, cfg, Path(session.ckpt_arg), None)
    except InputError:
        return cfg.head_dim
    return None


def naming(session: Session, scheme: Scheme) -> str:
    """Rename to ``scheme`` (permuting q/k across rotary layouts) and strip wrappers."""
    found = session.mapping.scheme
    what = []
    if found.name != scheme.name:
        what.append(f"renames the keys to {scheme.title} naming"
                    + (" and permutes wq/wk rows" if found.rotary != scheme.rotary else ""))
    to = session.suite.repair[session.suite.repair.index("--to") + 1] if "--to" in session.suite.repair else None
    head_dim = unconfirmed_head_dim(session, to)
    if head_dim is not None:
        what.append(f"--head-dim {head_dim} states the head size nothing in the checkpoint shows: check it against "
                    "the training run's config first")
    if session.mapping.wrappers:
        what.append("strips " + ", ".join(repr(w) for w in session.mapping.wrappers))
    return f"{command(session, *session.suite.repair)}  ({'; '.join(what)})"


def cast(session: Session, dtype: str) -> str:
    """The cast, unless it would overflow or flush values (then what to keep instead)."""
    lossy = None if session.options.metadata_only else cast_loss(session, dtype)
    if lossy:
        return f"no cast can repair this: {lossy}"
    return f"{command(session)}  (casts to {dtype})"


_CAST_LOSS: weakref.WeakKeyDictionary[Checkpoint, dict[str, str | None]] = weakref.WeakKeyDictionary()


def cast_loss(session: Session, dtype: str) -> str | None:
    """Why casting this checkpoint's floating tensors to ``dtype`` would change values beyond rounding
    (one line), or None; read once per opened checkpoint and dtype, however many dtype checks ask."""
    from .. import dtypes
    from ..convert.stream import lossy_cast

    known = _CAST_LOSS.setdefault(session.checkpoint, {})
    if dtype not in known:
        keys = [k for k, i in session.manifest.tensors.items() if i.dtype in dtypes.FLOATING and i.dtype != dtype]
        known[dtype] = lossy_cast(session.checkpoint, keys, dtype)
    return known[dtype]


# The plain repair command, per opened checkpoint: every unexpected key names it with its own --drop, and
# building it (paths, flags, quoting) once per key made 100,000 extra keys take seconds.
_PLAIN: weakref.WeakKeyDictionary[Checkpoint, str] = weakref.WeakKeyDictionary()


def drop_key(session: Session, key: str) -> str:
    """Named explicitly: a repair drops an extra tensor only when told to (it may be one the model has).
    The same line as ``command(session, '--drop', key)``."""
    plain = _PLAIN.get(session.checkpoint)
    if plain is None:
        plain = _PLAIN[session.checkpoint] = command(session)
    return f"{plain} --drop {shlex.quote(key)}  (drops {key})"


def fix_config(session: Session, assignments: dict[str, object]) -> str:
    """Set config fields (named as the config file spells them) to values shown as JSON."""
    import json

    where = session.config.source if session.config else "the config"
    sets = " and ".join(f"{field} = {json.dumps(value)}" for field, value in assignments.items())
    return f"set {sets} in {where}, if the weights are the model you meant"


def from_training() -> str:
    return "restore this tensor from an earlier checkpoint: NaN/Inf weights cannot be repaired"
