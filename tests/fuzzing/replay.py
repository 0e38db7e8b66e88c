"""``python -m tests.fuzzing.replay REPRODUCER``: run a saved contract break again through the harness and
print its outcome (a reproducer folder holds case.json and the case's files under case/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .harness import Harness
from .strategies import Case


def load(folder: Path) -> Case:
    meta = json.loads((folder / "case.json").read_text())
    files = [(str(p.relative_to(folder / "case")), p.read_bytes()) for p in sorted((folder / "case").rglob("*"))
             if p.is_file()]
    files += list(meta["special_files"].items())
    return Case(meta["family"], meta["mutation"], meta["detail"], tuple(files), tuple(meta["argv"]),
                tuple(tuple(o) for o in meta["oracle"]), meta["must_refuse"])


def main(folder: Path) -> int:
    case = load(folder)
    harness = Harness()
    try:
        outcome = harness.check(case)
    finally:
        harness.close()
    print(f"{case.family} {case.mutation}: {case.detail}")
    print(f"exit {outcome.rc} in {outcome.seconds:.2f} s, {outcome.memory / 2**20:.1f} MiB")
    print(outcome.stderr.strip()[-2000:])
    print(f"contract: {outcome.symptom or 'kept'}")
    return 1 if outcome.symptom else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
