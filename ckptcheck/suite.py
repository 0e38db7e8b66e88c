"""Check suites as data: one JSON file per target in the top-level ``suites/`` folder.

The folder is installed as the ``ckptcheck.suites`` package (see pyproject.toml), so a source checkout
and an installed wheel read the same files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources

from .checks.model import CATEGORIES
from .errors import InputError


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    categories: tuple[str, ...]
    naming: str | None = None  # the scheme the framework loads; None: the config's
    formats: tuple[str, ...] | None = None  # formats the framework loads; None: any
    nesting: str | None = None  # with formats: "model" or None (flat)
    repair: tuple[str, ...] = ()  # ckptcheck repair arguments producing the framework's layout
    # Model features the framework's config cannot state ("head_dim", "attention_bias", "mlp_bias"): a model
    # that needs one fails its config check for that feature.
    cannot_express: tuple[str, ...] = ()

    @property
    def is_framework(self) -> bool:
        return self.formats is not None

    def including(self, categories: tuple[str, ...]) -> Suite:
        """This suite plus categories the user asked for explicitly (``--roundtrip``): a request is never
        dropped because a target does not list it."""
        extra = tuple(c for c in categories if c not in self.categories)
        return dataclasses.replace(self, categories=self.categories + extra) if extra else self


def available() -> tuple[str, ...]:
    folder = resources.files("ckptcheck.suites")
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")))


def load_suite(name: str) -> Suite:
    names = available()
    if name not in names:
        raise InputError(None, "--target", f"unknown target {name!r}; known: {', '.join(names)}")
    source = resources.files("ckptcheck.suites") / f"{name}.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    unknown = set(data.get("categories", ())) - set(CATEGORIES)
    if data.get("name") != name or unknown:
        raise InputError(f"suites/{name}.json", None, f"invalid suite (name {data.get('name')!r}, "
                         f"unknown categories {sorted(unknown)})")
    return Suite(name=name, title=data.get("title", ""), categories=tuple(data["categories"]),
                 naming=data.get("naming"), formats=tuple(data["formats"]) if data.get("formats") else None,
                 nesting=data.get("nesting"), repair=tuple(data.get("repair", ())),
                 cannot_express=tuple(data.get("cannot_express", ())))
