"""Is the data what was written?  Verified where the format carries checksums, said plainly where it does not.

A torch.save archive keeps a CRC-32 for every storage record, and DCP's default writer stores each chunk as
such an archive; the readers check a record's CRC on every read (rows too).  This check verifies every tensor's
records (the training state's too, for a resume) without building tensors, and skips those an earlier read
checked: a ``check`` run reads each data byte once, whichever other checks ran.  safetensors and legacy torch files (and DCP
chunks stored as raw bytes) carry no checksum: there the check is skipped with that sentence, never passed,
and only a comparison with a reference (``ckptcheck diff``) can find a flipped bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import Check, Verdict
from .shards import differing_copies

if TYPE_CHECKING:
    from ..engine import Session

# manifest fact "serialization" -> the checksum such a file keeps for its data
CHECKSUMS = {"torch zip": "a CRC-32 per storage record"}


def checksum_of(facts: dict[str, str]) -> str | None:
    """The checksum the format keeps for the tensor data (a reader's "checksums" fact first), or None, also
    when the file was saved without one (the reader's "no checksums" fact says how)."""
    if "no checksums" in facts:
        return None
    return facts.get("checksums") or CHECKSUMS.get(facts.get("serialization", ""))


def plan_integrity(session: Session) -> list[Check]:
    return [Check("integrity", "data", _integrity(session), reads_data=True)]


def _integrity(session: Session):
    def evaluate() -> Verdict:
        m = session.manifest
        checksum = checksum_of(m.facts)
        if checksum is None:
            why = m.facts.get("no checksums", f"{m.format} data carries no checksum")
            return Verdict.skip(f"{why}, so a corrupted byte cannot be detected "
                                f"from the file alone: compare it with a reference (ckptcheck diff {m.path} REFERENCE)")
        if session.options.metadata_only:
            return Verdict.skip(f"data not read (--metadata-only): {checksum} not verified")
        resume = "optimizer_state" in session.suite.categories  # training state matters to a resume only
        stored = (*m.tensors.values(), *(m.extra_tensors.values() if resume else ()))
        tensors = [info for info in stored if info.alias_of is None]
        for info in tensors:  # a bad record raises the one-line error naming file, tensor and record
            if not differing_copies(session, info.key):  # differing Meta copies: each read to tell (see replicas)
                session.checkpoint.verify(info.key)
        total = sum(info.nbytes for info in tensors)
        return Verdict.ok(f"{checksum} verified: {len(tensors)} tensors, {total} bytes",
                          expected=f"{checksum} matching", obtained="all match")

    return evaluate
