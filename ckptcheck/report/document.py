"""Everything a report shows, gathered once and sorted the same way whoever ran the checks (one
process, or pytest-xdist workers in any order), so every renderer is a pure function of it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..checks.model import CATEGORIES, CheckResult
from ..manifest import natural_key


def sort_results(results: list[CheckResult]) -> list[CheckResult]:
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(results, key=lambda r: (order.get(r.category, len(order)), r.category, natural_key(r.key)))


@dataclass
class ReportData:
    checkpoint: dict[str, Any]
    config: dict[str, Any]
    target: str
    results: list[CheckResult]
    summary: dict[str, Any]
    matrix: list[Any] | None = None  # matrix.MatrixRow

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status.value in ("fail", "unsafe")]

    @property
    def blocking(self) -> list[str]:
        """Failed checks that ckptcheck repair refuses to work around (it writes nothing while they fail)."""
        from ..checks.repairs import UNREPAIRABLE

        return [r.id for r in self.failures if r.category in UNREPAIRABLE]

    @property
    def repairs(self) -> list[str]:
        """Each distinct repair command, in the order failures name them."""
        seen: list[str] = []
        for r in self.failures:
            if r.repair and r.repair.startswith("ckptcheck ") and (cmd := r.repair.split("  (")[0]) not in seen:
                seen.append(cmd)
        return seen

    @property
    def roundtrips(self) -> list[dict[str, Any]]:
        return [{"check": r.id, **trip} for r in self.results if r.details for trip in r.details.get("trips", [])]


def build(ckpt: str | os.PathLike[str], config: str | os.PathLike[str] | None, options: Any, *,
          matrix: bool = False) -> ReportData:
    """Run the checks (and the matrix) and gather a report's data."""
    from ..engine import plan, run, summarize

    the_plan = plan(ckpt, config, options)
    try:
        results = run(the_plan)
    finally:
        the_plan.close()
    rows = None
    if matrix:
        from ..matrix import compatibility_matrix

        rows = compatibility_matrix(ckpt, config, options)
    results = sort_results(results)
    return ReportData(the_plan.checkpoint_info, the_plan.config_info, options.target, results,
                      summarize(results), rows)


def write(data: ReportData, path: str | os.PathLike[str]) -> str:
    """Render by the file's suffix (.md, .html, .json) and write it atomically."""
    from pathlib import Path

    from ..errors import InputError, printable

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".md", ".markdown"):
        from .markdown import render_markdown as render
    elif suffix in (".html", ".htm"):
        from .html import render_html as render
    elif suffix == ".json":
        from .json_report import render_json as render
    else:
        raise InputError(p, None, "unknown report format: name it .md, .html or .json")
    text = render(data)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(printable(text, lines=True), encoding="utf-8")  # names from the input, shown, never acted on
    os.replace(tmp, p)
    return str(p)
