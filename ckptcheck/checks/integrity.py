"""Is the data what was written?  Verified where the format carries checksums, said plainly where it does not.

A torch.save archive keeps a CRC-32 for every storage record, and DCP's default writer stores each chunk as
such an archive; the readers check a record's CRC on every read (rows too).  This check verifies the records
of every tensor the file holds (training state and an EMA copy too, whatever the target) without building
tensors, counts each record once in its own bytes, and skips those an earlier read checked: a ``check`` run
reads each data byte once, whichever other checks ran.  safetensors and legacy torch files (and torch files
saved with ``set_crc32_options(False)``) carry no checksum: there the
check is skipped with that sentence, never passed, and only a comparison with a reference (``ckptcheck diff``)
can find a flipped bit.
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
        records: dict[str, int] = {}
        for key in (*m.tensors, *m.extra_tensors):  # every tensor the file holds (an EMA copy too): a bad
            if not differing_copies(session, key):  # record raises the line naming file, tensor and record
                session.checkpoint.verify(key)  # differing Meta copies: each read to tell (see replicas)
            records.update(session.checkpoint.records(key))
        return Verdict.ok(f"{checksum} verified: {len(records)} records, {sum(records.values())} bytes",
                          expected=f"{checksum} matching", obtained="all match")

    return evaluate
