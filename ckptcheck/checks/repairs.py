"""The repair each failure names, in one place so every check words it the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine import Session


def rename_keys(session: Session) -> str:
    scheme = session.spec.scheme
    return (
        f"rename the keys to {scheme.title} naming"
        + (" and permute wq/wk rows between the interleaved and half rotary layouts"
           if session.mapping.scheme.rotary != scheme.rotary and not scheme.is_custom else "")
    )


def strip_wrappers(session: Session) -> str:
    return "remove the wrapper prefixes " + ", ".join(repr(w) for w in session.mapping.wrappers) + " from every key"


def cast(dtype: str) -> str:
    return f"cast the tensor to {dtype}"


def fix_config(session: Session, assignments: dict[str, object]) -> str:
    """Set config fields (named as the config file spells them) to values shown as JSON."""
    import json

    where = session.config.source if session.config else "the config"
    sets = " and ".join(f"{field} = {json.dumps(value)}" for field, value in assignments.items())
    return f"set {sets} in {where}, if the weights are the model you meant"


def drop_key(key: str) -> str:
    return f"drop {key} from the checkpoint"


def from_training() -> str:
    return "restore this tensor from an earlier checkpoint: NaN/Inf weights cannot be repaired"
