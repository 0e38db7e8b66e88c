"""``python -m tests.fuzzing.summary [FOLDER]``: the totals of a fuzzing campaign from the stats files the
structured fuzz tests wrote (inputs and outcomes per format and per command, slowest input, largest memory,
contract breaks by class with their reproducers).  Exit 1 when any input broke the contract."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from .harness import OUT


def _outcomes(counts: Counter) -> str:
    return ", ".join(f"{'exit ' + k if k.isdigit() else k} {v}" for k, v in sorted(counts.items()))


def summarize(folder: Path) -> int:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("stats-*.json"))]
    inputs: Counter = Counter()
    outcomes: Counter = Counter()
    per_family: dict[str, Counter] = {}
    per_command: dict[tuple[str, str], Counter] = {}
    breaks: dict[str, str] = {}
    for run in runs:
        inputs[run["family"]] += run["inputs"]
        outcomes.update(run["outcomes"])
        per_family.setdefault(run["family"], Counter()).update(run["outcomes"])
        for cmd, counts in run.get("by_command", {}).items():
            per_command.setdefault((run["family"], cmd), Counter()).update(counts)
        breaks.update(run["breaks"])
    slowest = max((tuple(r["slowest"]) for r in runs), default=(0.0, ""))
    largest = max((tuple(r["largest"]) for r in runs), default=(0, ""))
    print(f"structured fuzzing: {sum(inputs.values())} inputs ({', '.join(f'{k} {v}' for k, v in sorted(inputs.items()))})")
    print("outcomes: " + _outcomes(outcomes))
    for family, counts in sorted(per_family.items()):
        print(f"  {family}: {inputs[family]} inputs: {_outcomes(counts)}")
        for (fam, cmd), by_cmd in sorted(per_command.items()):
            if fam == family:
                print(f"    {cmd}: {sum(by_cmd.values())}: {_outcomes(by_cmd)}")
    print(f"slowest:  {slowest[0]:.2f} s  {slowest[1]}")
    print(f"largest memory: {largest[0] / 2**20:.1f} MiB beyond the worker's  {largest[1]}")
    print(f"contract breaks: {len(breaks)} classes" + (f" (reproducers under {folder})" if breaks else ""))
    for cls, reproducer in sorted(breaks.items()):
        print(f"  {cls}  ->  {reproducer}")
    return 1 if breaks else 0


if __name__ == "__main__":
    sys.exit(summarize(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
