"""The FSDP round trip as checks: one per requested world size (``--roundtrip 1,2,4``), the first one
also resharding when ``--reshard M`` is given.  Planned only on request: they start real processes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import Check, Verdict

if TYPE_CHECKING:
    from ..engine import Session


def plan_roundtrip(session: Session) -> list[Check]:
    options = session.options
    checks = []
    for i, world in enumerate(options.roundtrip):  # type: ignore[union-attr]
        reshard = options.reshard if i == 0 else None
        key = f"world_size={world}" + (f"->{reshard}" if reshard else "")
        checks.append(Check("fsdp_roundtrip", key, _trip(session, world, reshard), reads_data=True))  # type: ignore[arg-type]
    return checks


def _trip(session: Session, world: int, reshard: int | None):
    def evaluate() -> Verdict:
        from ..roundtrip.launch import roundtrip

        result = roundtrip(session.ckpt_arg, config=session.config_arg, world_size=world, reshard_to=reshard,
                           optimizer="optimizer_state" in session.suite.categories, factory=session.options.model_factory)
        lines = [t.summary() for t in result.trips]
        details = {"trips": [{"world_size": t.world_size, "seconds": round(t.seconds, 2),
                              "peak_rss_per_rank": t.peak_rss, "ok": t.ok} for t in result.trips]}
        expected = f"bitwise equal shards at world size {world}" + (f", then {reshard}" if reshard else "")
        if result.ok:
            return Verdict.ok("; ".join(lines), expected=expected, obtained="equal", details=details)
        failed = next(t for t in result.trips if not t.ok)
        obtained = "error" if failed.errors else f"{len(failed.mismatches)} mismatching shards"
        return Verdict.fail("; ".join(lines), expected=expected, obtained=obtained,
                            repair="convert with ckptcheck convert --to dcp and run the round trip again; "
                            "a mismatch that persists is a bug in the loading path, worth reporting", details=details)

    return evaluate
