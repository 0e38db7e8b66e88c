"""The JSON document of ``ckptcheck check --format json`` (schema in docs/json-schema.md)."""

from __future__ import annotations

import json
from typing import Any

from .. import __version__
from ..checks.model import CheckResult

SCHEMA_VERSION = 1


def document(checkpoint: dict[str, Any], config: dict[str, Any], results: list[CheckResult],
             summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "ckptcheck_version": __version__,
        "checkpoint": checkpoint,
        "config": config,
        "checks": [r.to_json() for r in results],
        "summary": summary,
    }


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"
