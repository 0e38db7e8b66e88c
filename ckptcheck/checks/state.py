"""Training state for ``--target resume``: is there optimizer state at all.

The per-parameter optimizer items (AdamW moments, steps, param groups) build on this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import Check, Verdict
from .repairs import command

if TYPE_CHECKING:
    from ..engine import Session


def plan_resume(session: Session) -> list[Check]:
    def evaluate() -> Verdict:
        m = session.manifest
        section = m.optimizer_section
        if section is not None:
            n = sum(1 for k in m.extra_tensors if k.startswith(section + "."))
            return Verdict.ok(f"optimizer state in section {section!r} ({n} tensors)",
                              expected="optimizer state", obtained=section)
        found = ", ".join(m.sections) or "model weights only"
        return Verdict.fail(
            "no optimizer state: this checkpoint can initialise training but not resume it",
            expected="optimizer state (optim / optimizer section)", obtained=found,
            repair="start from it instead (lingua checkpoint.init_ckpt_path, torchtitan "
            "checkpoint.initial_load_model_only), or give it fresh optimizer state: "
            f"{command(session)} --init-optimizer-state (AdamW at step 0)",
        )

    return [Check("resume", "optimizer", evaluate)]
