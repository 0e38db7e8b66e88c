"""The JSON document of ``ckptcheck check --format json`` and of JSON reports (docs/json-schema.md)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..checks.model import CheckResult

if TYPE_CHECKING:
    from .document import ReportData

SCHEMA_VERSION = 1


def document(checkpoint: dict[str, Any], config: dict[str, Any], results: list[CheckResult],
             summary: dict[str, Any], matrix: list[Any] | None = None) -> dict[str, Any]:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "ckptcheck_version": __version__,
        "checkpoint": checkpoint,
        "config": config,
        "checks": [r.to_json() for r in results],
        "summary": summary,
    }
    if matrix is not None:
        from ..matrix import to_json

        doc["matrix"] = to_json(matrix)
    return doc


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def render_json(data: ReportData) -> str:
    doc = document(data.checkpoint, data.config, data.results, data.summary, data.matrix)
    doc["target"] = data.target
    return dumps(doc)
