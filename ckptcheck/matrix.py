"""The compatibility matrix: every framework target (suites with ``formats``) against one checkpoint.

Rows are targets, columns check categories, each cell pass or fail, each failing row with the repair
command that produces that framework's layout.  Checks shared by several targets (the same id) run once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .checks.model import CATEGORIES, CheckResult, Status
from .checks.repairs import UNREPAIRABLE, command
from .engine import Options, plan
from .suite import available, load_suite


@dataclass
class MatrixRow:
    target: str
    title: str
    cells: dict[str, str]  # category -> "pass", "fail", "unsafe" or "skip"
    repair: str | None
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v in ("pass", "skip") for v in self.cells.values())


def framework_targets() -> list[str]:
    return [name for name in available() if load_suite(name).is_framework]


def compatibility_matrix(ckpt: str | os.PathLike[str], config: str | os.PathLike[str] | None,
                         options: Options) -> list[MatrixRow]:
    done: dict[str, CheckResult] = {}
    rows = []
    for target in framework_targets():
        suite = load_suite(target)
        # Which frameworks load this layout: the round trip, asked for the run's own target, is not rerun per row.
        the_plan = plan(ckpt, config, dataclasses.replace(options, target=target, roundtrip=(), reshard=None))
        try:
            results = []
            for check in the_plan.checks:
                if check.id not in done:
                    done[check.id] = check.run()
                results.append(done[check.id])
            failed = [r for r in results if r.status in (Status.FAIL, Status.UNSAFE)]
            repair = None
            blocked = [UNREPAIRABLE[r.category] for r in failed if r.category in UNREPAIRABLE]
            if blocked:
                repair = f"no conversion repairs this: {blocked[0]}"
            elif any(r.repair and r.repair.startswith("ckptcheck repair") for r in failed) and the_plan.session:
                # Shared checks carry another target's command: build this target's own.
                repair = command(the_plan.session, *suite.repair)
            elif failed:
                repair = failed[0].repair
        finally:
            the_plan.close()
        cells: dict[str, str] = {}
        for r in results:
            worst = cells.get(r.category, "skip")
            cells[r.category] = max(worst, r.status.value, key=_severity)
        rows.append(MatrixRow(target, suite.title, cells, repair, [r.id for r in failed]))
    return rows


def _severity(status: str) -> int:
    return {"skip": 0, "pass": 1, "fail": 2, "unsafe": 3}[status]


def columns(rows: list[MatrixRow]) -> list[str]:
    present = {c for r in rows for c in r.cells}
    return [c for c in CATEGORIES if c in present]


def render_text(rows: list[MatrixRow]) -> str:
    from tabulate import tabulate

    cols = columns(rows)
    table = [[r.target, *(_mark(r.cells.get(c)) for c in cols)] for r in rows]
    lines = [tabulate(table, headers=["target", *cols], tablefmt="simple"), ""]
    for r in rows:
        lines.append(f"{r.target:14} {'ok' if r.ok else 'FAIL'}  {r.title}")
        if not r.ok and r.repair:
            lines.append(f"{'':14}       repair: {r.repair}")
    return "\n".join(lines) + "\n"


def _mark(status: str | None) -> str:
    return {"pass": "pass", "fail": "FAIL", "unsafe": "UNSAFE", "skip": "skip", None: "-"}[status]


def to_json(rows: list[MatrixRow]) -> dict[str, Any]:
    return {r.target: {"title": r.title, "ok": r.ok, "categories": r.cells, "failed": r.failed, "repair": r.repair}
            for r in rows}
