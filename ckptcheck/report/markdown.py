"""Markdown reports: GitHub-flavoured tables, one per category, every failure spelled out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .text import human_bytes

if TYPE_CHECKING:
    from .document import ReportData


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    from tabulate import tabulate

    return tabulate([[_cell(c) for c in row] for row in rows], headers=headers, tablefmt="github")


def summary_rows(data: ReportData) -> list[list[Any]]:
    c, g = data.checkpoint, data.config
    rows: list[list[Any]] = [["checkpoint", c.get("path")]]
    if "format" in c:
        rows += [["format", c["format"] + (f", model under '{c['nesting']}'" if c.get("nesting") else "")],
                 ["naming", c["naming"] + (f" (wrappers {', '.join(c['wrappers'])})" if c.get("wrappers") else "")],
                 ["size", f"{human_bytes(c['bytes'])} in {c['tensors']} tensors"],
                 ["dtype mix", ", ".join(f"{k}: {v}" for k, v in c["dtypes"].items())]]
        if c.get("sections"):
            rows.append(["training state", ", ".join(c["sections"])])
    if g.get("schema"):
        rows.append(["config", f"{g['path']} ({g['schema']}: dim {g['dim']}, {g['n_layers']} layers, {g['n_heads']} "
                               f"heads / {g['n_kv_heads']} KV, vocab {g['vocab_size']}, ffn {g['ffn_dim']}"
                               f"{', tied' if g['tie_embeddings'] else ''})"])
    elif g.get("model_factory"):
        rows.append(["model", g["model_factory"]])
    s = data.summary
    rows += [["target", data.target],
             ["verdict", f"{s['verdict'].upper()}: {s['pass']} passed, {s['fail']} failed, {s['skip']} skipped"
                         + (f", {s['unsafe']} unsafe" if s["unsafe"] else "")]]
    return rows


def render_markdown(data: ReportData) -> str:
    s = data.summary
    out = [f"# ckptcheck report: `{data.checkpoint.get('path')}`", "",
           f"**Verdict: {s['verdict'].upper()}** — {s['fail'] + s['unsafe']} of {s['total']} checks failed", "",
           "## Summary", "", _table(["", ""], summary_rows(data)), ""]
    if data.failures:
        out += ["## Failures", ""]
        for r in data.failures:
            out += [f"### {r.status.value.upper()} `{r.id}`", "", r.message, ""]
            for label, value in (("expected", r.expected), ("obtained", r.obtained), ("why", r.why),
                                 ("repair", r.repair)):
                if value:
                    out.append(f"- **{label}**: {f'`{value}`' if label == 'repair' and value.startswith('ckptcheck') else value}")
            out.append("")
        if data.repairs:
            out += ["Repair commands:", "", "```", *data.repairs, "```", ""]
            if data.blocking:
                out += [f"ckptcheck repair refuses to write anything while these fail: {', '.join(data.blocking)}", ""]
    facts = data.checkpoint.get("facts") or {}
    if facts:
        out += ["## Version facts", "", _table(["fact", "value"], [[k, v] for k, v in facts.items()]), ""]
    if data.matrix:
        from ..matrix import columns

        cols = columns(data.matrix)
        rows = [[r.target, *({"pass": "pass", "fail": "**FAIL**", "unsafe": "**UNSAFE**", "skip": "skip"}.get(
            r.cells.get(c), "–") for c in cols)] for r in data.matrix]
        out += ["## Compatibility matrix", "", _table(["target", *cols], rows), ""]
        for r in data.matrix:
            if not r.ok and r.repair:
                out.append(f"- **{r.target}**: `{r.repair}`" if r.repair.startswith("ckptcheck") else
                           f"- **{r.target}**: {r.repair}")
        out.append("")
    if data.roundtrips:
        out += ["## FSDP round trip", "", _table(
            ["check", "world size", "seconds", "peak memory per rank", "ok"],
            [[t["check"], t["world_size"], t["seconds"], ", ".join(human_bytes(b) for b in t["peak_rss_per_rank"]),
              "yes" if t["ok"] else "**no**"] for t in data.roundtrips]), ""]
    out += ["## Checks by category", ""]
    for category, results in _by_category(data).items():
        counts = ", ".join(f"{n} {k}" for k, n in _counts(results).items() if n)
        out += [f"### {category} ({counts})", "",
                _table(["status", "key", "message"], [[r.status.value, r.key, r.message] for r in results]), ""]
    return "\n".join(out)


def _by_category(data: ReportData) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for r in data.results:
        groups.setdefault(r.category, []).append(r)
    return groups


def _counts(results: list[Any]) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "skip": 0, "unsafe": 0}
    for r in results:
        out[r.status.value] += 1
    return out
