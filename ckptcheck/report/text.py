"""Plain-text rendering for terminals: failure blocks, the category table, the closing line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from ..checks.model import CATEGORIES, CheckResult, Status


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def failure_lines(r: CheckResult) -> list[str]:
    """A failed check the way a good assertion reads: what, expected, obtained, why, repair."""
    lines = [r.message]
    if r.expected is not None:
        lines.append(f"expected: {r.expected}")
    if r.obtained is not None:
        lines.append(f"obtained: {r.obtained}")
    if r.why:
        lines.append(f"why:      {r.why}")
    if r.repair:
        lines.append(f"repair:   {r.repair}")
    return lines


def header_lines(checkpoint: dict[str, Any], config: dict[str, Any]) -> list[str]:
    lines = []
    if "format" in checkpoint:
        extras = [checkpoint["format"], f"{checkpoint['naming']} naming", f"{checkpoint['tensors']} tensors",
                  human_bytes(checkpoint["bytes"])]
        if checkpoint.get("nesting"):
            extras.append(f"model under {checkpoint['nesting']!r}")
        if checkpoint.get("sections"):
            extras.append("sections: " + ", ".join(checkpoint["sections"]))
        lines.append(f"checkpoint  {checkpoint['path']}  ({', '.join(extras)})")
    else:
        lines.append(f"checkpoint  {checkpoint['path']}")
    if config.get("schema"):
        lines.append(
            f"config      {config['path']}  ({config['schema']}, dim {config['dim']}, {config['n_layers']} layers, "
            f"{config['n_heads']} heads / {config['n_kv_heads']} KV, vocab {config['vocab_size'] or '?'}, "
            f"ffn {config['ffn_dim']}{', tied' if config['tie_embeddings'] else ''})"
        )
    elif config.get("model_factory"):
        lines.append(f"model       {config['model_factory']}  ({config['expected_tensors']} tensors)")
    return lines


def category_table(by_category: dict[str, dict[str, int]]) -> str:
    """The counts per category and status (a summary's ``by_category``), categories in report order."""
    from tabulate import tabulate

    order = [c for c in CATEGORIES if c in by_category] + sorted(c for c in by_category if c not in CATEGORIES)
    rows = [[c, *(by_category[c].get(s.value, 0) for s in Status)] for c in order]
    return tabulate(rows, headers=["category", *(s.value for s in Status)], tablefmt="simple")


def closing_line(summary: dict[str, Any]) -> str:
    verdict = summary["verdict"].upper()
    parts = [f"{summary['pass']} passed", f"{summary['fail']} failed", f"{summary['skip']} skipped"]
    if summary["unsafe"]:
        parts.append(f"{summary['unsafe']} unsafe")
    return f"{verdict}: {summary['total']} checks, " + ", ".join(parts)


# The check report is written in three parts so that results stream through it: a checkpoint with 100,000
# extra keys fails 100,000 checks, and holding every result and its text took ten times the file's size.

def opening(checkpoint: dict[str, Any], config: dict[str, Any], notes: Iterable[str] = ()) -> str:
    """What was checked against what: the lines before the results."""
    out = header_lines(checkpoint, config)
    out += [f"note        {n}" for n in notes]
    return "\n".join(out) + "\n\n"


def written(out: TextIO, results: Iterable[CheckResult], *, verbose: bool = False) -> Iterator[CheckResult]:
    """Each result passed on once its lines are written to ``out`` (failures in full, the rest when verbose)."""
    for r in results:
        if r.status in (Status.FAIL, Status.UNSAFE):
            out.write(f"{r.status.value.upper():6} {r.id}\n" + "".join(f"       {line}\n" for line in failure_lines(r))
                      + "\n")
        elif verbose:
            detail = f"  {r.message}" if r.message else ""
            out.write(f"{r.status.value.upper():6} {r.id}{detail}\n")
        yield r


def closing(summary: dict[str, Any], *, verbose: bool = False) -> str:
    """The lines after the results: the category table and the verdict."""
    out = [""] if verbose else []
    out += [category_table(summary["by_category"]), "", closing_line(summary)]
    return "\n".join(out) + "\n"
