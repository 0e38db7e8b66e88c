"""Meta model-parallel shards: every copy of a replicated tensor (the norms, anything not split) is the
same, bit for bit.  Meta's code loads each rank its own copy, so copies that differ mean each rank ran
another model, and a merge into one file cannot keep them all.  And every slice of a split tensor is its
own: a slice bit-identical to another shard's is a shard copied under another's name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..formats.meta_shards import MetaShardsCheckpoint
from .model import Check, Verdict

if TYPE_CHECKING:
    from ..engine import Session


def differing_copies(session: Session, stored: str) -> tuple[str, ...]:
    """The shard files whose copy of ``stored`` differs from consolidated.00.pth's; () for other formats."""
    ckpt = session.checkpoint
    return ckpt.differing_copies(stored) if isinstance(ckpt, MetaShardsCheckpoint) else ()


def plan_replicas(session: Session) -> list[Check]:
    ckpt = session.checkpoint
    if not isinstance(ckpt, MetaShardsCheckpoint):
        return []

    def copies(key: str):
        def evaluate() -> Verdict:
            if session.options.metadata_only:
                return Verdict.skip("values not read (--metadata-only)")
            differ = differing_copies(session, key)
            if not differ:
                return Verdict.ok(expected="bit-identical copies", obtained="bit-identical copies")
            return Verdict.fail(
                f"{key}: the copy in {', '.join(differ)} differs from consolidated.00.pth's",
                expected="bit-identical copies", obtained=f"differs in {', '.join(differ)}",
                repair="re-export the model-parallel shards from one trained state; no conversion picks a copy",
            )

        return evaluate

    def slices(key: str):
        def evaluate() -> Verdict:
            if session.options.metadata_only:
                return Verdict.skip("values not read (--metadata-only)")
            dup = ckpt.duplicated_slices(key)
            if not dup:
                return Verdict.ok(expected="a slice of its own in each shard", obtained="distinct slices")
            return Verdict.fail(
                f"{key} is split across the shards, but the slice in {', '.join(dup)} is bit-identical to an earlier "
                "shard's: a shard copied under another's name, so those ranks would load another rank's weights",
                expected="a slice of its own in each shard", obtained=f"duplicated in {', '.join(dup)}",
                repair="re-export the model-parallel shards from one trained state; no conversion restores a slice",
            )

        return evaluate

    return [Check("replicas", key, copies(key), reads_data=True) for key in ckpt.replicated()] + \
        [Check("replicas", key, slices(key), reads_data=True) for key in ckpt.split()]
