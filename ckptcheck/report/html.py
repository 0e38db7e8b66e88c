"""HTML reports: one self-contained file (inline style, no scripts, no external assets)."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from .markdown import _by_category, _counts, summary_rows
from .text import human_bytes

if TYPE_CHECKING:
    from .document import ReportData

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#1f2328}
h1{font-size:1.5rem}h2{margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}h3{font-size:1.05rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;width:100%}th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;white-space:pre-wrap}
.verdict{display:inline-block;padding:.25rem .7rem;border-radius:.3rem;font-weight:600;color:#fff}
.pass{color:#1a7f37}.fail,.unsafe{color:#cf222e;font-weight:600}.skip{color:#6e7781}
.verdict.pass{background:#1a7f37;color:#fff}.verdict.fail,.verdict.unsafe{background:#cf222e;color:#fff}
.failure{border-left:4px solid #cf222e;padding:.2rem .8rem;margin:.8rem 0;background:#fff8f8}
dl{display:grid;grid-template-columns:7rem 1fr;gap:.2rem .6rem;margin:.4rem 0}dt{font-weight:600}dd{margin:0}
details{margin:.4rem 0}summary{cursor:pointer;font-weight:600}
"""


def _table(headers: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else escape(str(c if c is not None else ''))}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _status(value: str) -> str:
    return f'<span class="{escape(value)}">{escape(value.upper() if value in ("fail", "unsafe") else value)}</span>'


def render_html(data: ReportData) -> str:
    s = data.summary
    title = f"ckptcheck report: {data.checkpoint.get('path')}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style></head><body>",
             f"<h1>{escape(title)}</h1>",
             f'<p><span class="verdict {escape(s["verdict"])}">{escape(s["verdict"].upper())}</span> '
             f"{s['fail'] + s['unsafe']} of {s['total']} checks failed</p>",
             "<h2>Summary</h2>", _table(["", ""], summary_rows(data))]
    if data.failures:
        parts.append("<h2>Failures</h2>")
        for r in data.failures:
            items = "".join(f"<dt>{label}</dt><dd>{'<code>' + escape(v) + '</code>' if label == 'repair' else escape(v)}</dd>"
                            for label, v in (("expected", r.expected), ("obtained", r.obtained), ("why", r.why),
                                             ("repair", r.repair)) if v)
            parts.append(f'<div class="failure"><h3>{_status(r.status.value)} <code>{escape(r.id)}</code></h3>'
                         f"<p>{escape(r.message)}</p><dl>{items}</dl></div>")
        if data.repairs:
            parts.append("<p>Repair commands:</p><pre>" + escape("\n".join(data.repairs)) + "</pre>")
            if data.blocking:
                parts.append("<p>ckptcheck repair refuses to write anything while these fail: "
                             + escape(", ".join(data.blocking)) + "</p>")
    facts = data.checkpoint.get("facts") or {}
    if facts:
        parts += ["<h2>Version facts</h2>", _table(["fact", "value"], [[k, v] for k, v in facts.items()])]
    if data.matrix:
        from ..matrix import columns

        cols = columns(data.matrix)
        rows = [[escape(r.target), *(_status(r.cells[c]) if c in r.cells else "–" for c in cols)] for r in data.matrix]
        parts += ["<h2>Compatibility matrix</h2>", _table(["target", *cols], rows, raw=True)]
        fixes = [f"<li><b>{escape(r.target)}</b>: <code>{escape(r.repair)}</code></li>"
                 for r in data.matrix if not r.ok and r.repair]
        if fixes:
            parts.append("<ul>" + "".join(fixes) + "</ul>")
    if data.roundtrips:
        parts += ["<h2>FSDP round trip</h2>", _table(
            ["check", "world size", "seconds", "peak memory per rank", "ok"],
            [[t["check"], t["world_size"], t["seconds"], ", ".join(human_bytes(b) for b in t["peak_rss_per_rank"]),
              "yes" if t["ok"] else "no"] for t in data.roundtrips])]
    parts.append("<h2>Checks by category</h2>")
    for category, results in _by_category(data).items():
        counts = ", ".join(f"{n} {k}" for k, n in _counts(results).items() if n)
        open_attr = " open" if any(r.status.value in ("fail", "unsafe") for r in results) else ""
        rows = [[_status(r.status.value), f"<code>{escape(r.key)}</code>", escape(r.message)] for r in results]
        parts.append(f"<details{open_attr}><summary>{escape(category)} ({escape(counts)})</summary>"
                     + _table(["status", "key", "message"], rows, raw=True) + "</details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
