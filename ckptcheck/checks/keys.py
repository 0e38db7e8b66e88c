"""Which tensors are there: naming scheme, expected keys present, no unexpected keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..naming import WRAPPER_TITLES, layer_of
from ..tying import redundant_copy
from . import repairs
from .config import tie_repair
from .model import Check, Verdict

if TYPE_CHECKING:
    from ..engine import Session


def plan_naming(session: Session) -> list[Check]:
    from ..naming import SCHEMES

    target = SCHEMES[session.suite.naming] if session.suite.naming else session.spec.scheme
    if target.is_custom:
        return []

    def evaluate() -> Verdict:
        found = session.mapping.scheme
        problems = []
        if found.name != target.name:
            if found.is_custom:
                problems.append("no key follows a Llama-family naming scheme")
            else:
                problems.append(f"keys use {found.title} naming; the config loads {target.title} names")
        if session.mapping.wrappers:
            titles = ", ".join(WRAPPER_TITLES[w] for w in session.mapping.wrappers)
            problems.append(f"keys carry wrapper prefixes: {titles}")
        if not problems:
            return Verdict.ok(f"keys use {target.title} naming", expected=target.name, obtained=found.name)
        fix = None if found.is_custom else repairs.naming(session, target)
        obtained = found.name + "".join(f" + {w!r}" for w in session.mapping.wrappers)
        return Verdict.fail("; ".join(problems), expected=target.name, obtained=obtained, repair=fix)

    return [Check("naming", target.name, evaluate)]


def plan_layout(session: Session) -> list[Check]:
    suite = session.suite
    if not suite.is_framework:
        return []

    def evaluate() -> Verdict:
        m = session.manifest
        want = " or ".join(suite.formats or ()) + (f", model under {suite.nesting!r}" if suite.nesting else ", flat")
        got = m.format + (f", model under {m.nesting!r}" if m.nesting else ", flat")
        if m.format in (suite.formats or ()) and m.nesting == suite.nesting:
            return Verdict.ok(f"{got}, as {suite.name} loads it", expected=want, obtained=got)
        return Verdict.fail(f"{suite.title.split(':')[0]} loads {want}; this is {got}", expected=want, obtained=got,
                            repair=repairs.command(session, *suite.repair))

    return [Check("layout", suite.name, evaluate)]


def plan_key_checks(session: Session) -> list[Check]:
    spec, mapping = session.spec, session.mapping
    checks: list[Check] = []
    for key in spec.tensors:
        checks.append(Check("key_present", spec.display(key), _present, args=(session, key)))
    expected = set(spec.tensors)
    extras: dict[str, str | None] = {s: c for s, c in mapping.canonical.items() if c not in expected}  # stored: canonical
    extras.update(dict.fromkeys(mapping.unknown))
    for stored in mapping.buffers:
        checks.append(Check("unexpected_key", stored, lambda: Verdict.skip(
            "a buffer (rotary frequencies) that loaders recompute and ignore")))
    for stored in sorted(extras):
        checks.append(Check("unexpected_key", stored, _unexpected, args=(session, stored, extras[stored])))
    return checks


def _present(session: Session, key: str) -> Verdict:
    stored = session.mapping.stored_for(key)
    shown = session.spec.display(key)
    if stored is not None:
        note = "" if stored == shown else f" (stored as {stored})"
        return Verdict.ok(f"{shown} is present{note}", expected="present", obtained="present")
    cfg = session.config
    why = f"{shown} is missing"
    embedding = session.by_canonical.get("tok_embeddings.weight")
    if key == "output.weight" and cfg is not None and embedding is not None:
        # An unrecognised tensor shaped like the embedding is most likely the output projection under
        # another name: tying would throw its trained values away.
        lookalikes = [k for k in session.mapping.unknown if session.manifest.tensors[k].shape == embedding.shape]
        if lookalikes:
            why += (f"; the checkpoint holds {', '.join(lookalikes[:3])}, shaped like the output projection: "
                    f"probably {shown} under another name")
            fix = (f"rename {lookalikes[0]} to {shown} (it is not dropped or tied away: its values are "
                   "trained), or use the config of the model that names it so")
        else:
            why += (f"; the config does not tie embeddings ({cfg.field_name('tie_embeddings')} is false) "
                    "but the checkpoint looks like it came from a tied model")
            fix = tie_repair(session)
    else:
        layer = layer_of(key)
        layers = {n for k in session.by_canonical if (n := layer_of(k)) is not None}
        if layer is not None and layer not in layers:
            why += f"; the checkpoint has no layer {layer} at all ({len(layers)} layers present)"
        fix = "use the checkpoint this config describes, or the config that describes this checkpoint"
    return Verdict.fail(why, expected="present", obtained="missing", repair=fix)


def _unexpected(session: Session, stored: str, canonical: str | None) -> Verdict:
    spec = session.spec
    if canonical is not None and canonical in spec.tied:
        primary = spec.tied[canonical]
        info = session.manifest.tensors[stored]
        primary_stored = session.mapping.stored_for(primary)
        if info.alias_of is not None and info.alias_of == primary_stored:
            return Verdict.skip(f"shares its storage with {primary_stored}: the tie the config asks for")
        field = session.config.field_name("tie_embeddings") if session.config else "weight tying"
        message = (f"the config ties {spec.display(canonical)} to {spec.display(primary)} ({field}), "
                   f"but the checkpoint stores a separate {stored}")
        expected = f"absent (tied to {spec.display(primary)})"
        if primary_stored is not None and not session.options.metadata_only \
                and redundant_copy(session.checkpoint, stored, primary_stored):
            theirs = session.manifest.tensors[primary_stored].dtype
            same = f"bit-identical to {primary_stored}" if info.dtype == theirs else (
                f"holding exactly the values of {primary_stored} ({info.dtype}, each value exactly "
                f"representable in {theirs})")
            return Verdict.fail(
                f"{message}, {same}", expected=expected, obtained="a redundant copy",
                repair=repairs.drop_key(session, stored), details={"tied_copy_of": primary_stored, "redundant": same})
        differs = "" if session.options.metadata_only else f" whose values differ from {primary_stored}"
        return Verdict.fail(
            message + differs, expected=expected, obtained="a separate tensor",
            repair=f"set {field} = false if the model is untied (ckptcheck repair refuses to drop {stored}: "
            "its values would be lost)",
            details={"tied_copy_of": primary_stored, "redundant": None if differs == "" else False},
        )
    message = f"{stored} is not a tensor of the configured model"
    layer = layer_of(canonical) if canonical else None
    if layer is not None and session.config is not None and layer >= session.config.n_layers:
        message += f" (layer {layer}, but the config has {session.config.n_layers} layers)"
    elif canonical is None:
        message += f" (not a {session.mapping.scheme.title} key)" if not session.mapping.scheme.is_custom else ""
    return Verdict.fail(message, expected="absent", obtained="present", repair=repairs.drop_key(session, stored))
