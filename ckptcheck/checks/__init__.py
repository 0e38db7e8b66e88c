"""Check planning: each category contributes checks from the session, in a fixed category order."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .integrity import plan_integrity
from .keys import plan_key_checks, plan_layout, plan_naming
from .model import Check
from .optimizer import plan_optimizer, plan_train_state
from .roundtrip import plan_roundtrip
from .shards import plan_replicas
from .state import plan_resume
from .config import plan_config
from .tensors import plan_dtype, plan_finite, plan_shape
from .version import plan_version

if TYPE_CHECKING:
    from ..engine import Session

PLANNERS = (plan_version, plan_naming, plan_layout, plan_config, plan_key_checks, plan_shape, plan_dtype, plan_finite, plan_replicas,
            plan_integrity,
            plan_resume,
            plan_optimizer, plan_train_state, plan_roundtrip)


def plan_checks(session: Session) -> list[Check]:
    wanted = set(session.suite.categories)
    checks: list[Check] = []
    for planner in PLANNERS:
        checks.extend(c for c in planner(session) if c.category in wanted)
    assert _unique_ids(checks), "check ids must be unique"
    return checks


def _unique_ids(checks: list[Check]) -> bool:
    """Whether no two checks share an id, keys compared per category: no id string built per check (a
    checkpoint may hold 100,000 keys)."""
    seen: dict[str, set[str]] = {}
    for c in checks:
        keys = seen.setdefault(c.category, set())
        if c.key in keys:
            return False
        keys.add(c.key)
    return True
