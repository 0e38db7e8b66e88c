"""Will the installed torch read this checkpoint, the way training reads it?

Version facts come from the manifest (what wrote the file); the verdict compares them with the
installed torch, the one ckptcheck runs in (and, in a CI gate, the one training uses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..formats.torch_pickle import opcodes_refused_in, refused_in
from .model import Check, Verdict

if TYPE_CHECKING:
    from ..engine import Session


def installed_torch() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("torch")
    except PackageNotFoundError:
        return ()
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


def installed_dcp_version() -> str | None:
    """The DCP metadata version the installed torch writes, read from its source rather than imported:
    metadata checks stay free of the second it takes to import torch."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "distributed" / "checkpoint" / "filesystem.py"
    try:
        found = re.search(r'^CURRENT_DCP_VERSION\s*(?::[^=\n]+)?\s*=\s*"([\d.]+)"', source.read_text(), re.M)
    except OSError:
        found = None
    if found:
        return found.group(1)
    try:
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION  # type: ignore[attr-defined]
    except ImportError:
        return None
    return str(CURRENT_DCP_VERSION)


def plan_version(session: Session) -> list[Check]:
    m = session.manifest
    checks = [Check("version", "serialization", _serialization(session))]
    if m.format == "dcp":
        checks.append(Check("version", "dcp_layout", _dcp_layout(session)))
    if refused_in(m.facts):
        checks.append(Check("version", "weights_only", _weights_only(refused_in(m.facts), m.format)))
    if opcodes_refused_in(m.facts):
        checks.append(Check("version", "weights_only_opcodes", _weights_only_opcodes(opcodes_refused_in(m.facts))))
    return checks


def _weights_only_opcodes(opcodes: list[str]):
    """torch.load(weights_only=True) implements only the opcodes torch.save's pickle protocol 2 writes: a
    file pickled with another protocol (``torch.save(..., pickle_protocol=4)``) is refused as a whole."""
    def evaluate() -> Verdict:
        return Verdict.fail(
            f"torch.load(weights_only=True) refuses the file: its pickle uses the opcodes {', '.join(opcodes)}, "
            "which torch's weights_only unpickler does not read (it reads what pickle protocol 2 writes)",
            expected="pickle protocol 2 opcodes", obtained=", ".join(opcodes),
            repair="re-save it with torch.save's default pickle_protocol (2), or ckptcheck convert it",
        )

    return evaluate


# Formats whose loader reads pickle globals outside torch's weights_only allowlist: DCP's load planner
# unpickles bytes entries with torch.load(weights_only=False).
_UNRESTRICTED_LOADER = {"dcp": "dcp.load unpickles bytes entries with weights_only=False"}


def _weights_only(refused: list[str], fmt: str):
    """torch.load(weights_only=True), torch's default since 2.6, refuses a pickle naming a global outside
    its allowlist: ``argparse.Namespace`` for the training args, numpy scalars for a logged loss.  That is
    no attack: only globals in ``safe_pickle.INERT_DATA`` get here (any other is a ``safety`` finding), and
    ckptcheck kept each as an inert record."""
    def evaluate() -> Verdict:
        if fmt in _UNRESTRICTED_LOADER:
            return Verdict.ok(f"pickle globals {', '.join(refused)}: {_UNRESTRICTED_LOADER[fmt]} and "
                              "reads them; torch.load(weights_only=True) would refuse them; ckptcheck kept them "
                              "unexecuted", obtained=", ".join(refused))
        return Verdict.fail(
            f"torch.load(weights_only=True) refuses the pickle globals {', '.join(refused)}; "
            "ckptcheck kept them unexecuted",
            expected="tensors and torch's safe globals only", obtained=", ".join(refused),
            repair=f"in the loading code, before torch.load: torch.serialization.add_safe_globals([{', '.join(refused)}]); "
                   "or re-save the checkpoint without them (vars(args) instead of an argparse.Namespace, "
                   "float(x) instead of a numpy scalar)",
        )

    return evaluate


def _migration_repair(session: Session, name: str) -> str:
    from .repairs import command

    return f"{command(session)}  (migration {name})"


def _serialization(session: Session):
    def evaluate() -> Verdict:
        m = session.manifest
        kind = m.facts.get("serialization", m.format)
        if "misnamed" in m.facts:  # the loaders that go by the name cannot open it
            return Verdict.fail(f"{m.facts['misnamed']}: tools that open files by name (safetensors, transformers) "
                                "cannot read it", expected="a name that says what the file holds", obtained=kind,
                                repair="rename it for its format, or ckptcheck convert it to the format its name says")
        if m.format == "torch-legacy":
            return Verdict.fail(
                "legacy torch serialization (a pickle stream, not a zip archive): torch.load(mmap=True) refuses "
                "it, so torch reads all of it into memory on every load",
                expected="torch zip archive (torch >= 1.6)", obtained=kind,
                repair=_migration_repair(session, "legacy_torch_to_zip"))
        return Verdict.ok(f"{kind}", obtained=kind)

    return evaluate


def _dcp_layout(session: Session):
    def evaluate() -> Verdict:
        m = session.manifest
        layout = m.facts.get("dcp layout", "")
        theirs = m.facts.get("dcp metadata version", "none")
        ours = installed_dcp_version()
        torch_version = installed_torch()
        if theirs != "none" and ours is not None and int(theirs.split(".")[0]) > int(ours.split(".")[0]):
            return Verdict.fail(f"DCP metadata version {theirs} is newer than the installed torch's {ours}",
                                expected=f"<= {ours}", obtained=theirs,
                                repair="ckptcheck reads it with its own parser: " + _migration_repair(
                                    session, "dcp rewrite with the installed torch"))
        if theirs == "none" and torch_version[:3] == (2, 4, 0):
            return Verdict.fail("a DCP checkpoint from before torch 2.4: torch 2.4.0 cannot load it "
                                "(pytorch #133923)", expected="torch 2.4+ layout", obtained=layout,
                                repair=_migration_repair(session, "dcp_pre_2_4_to_flattened"))
        note = "" if theirs != "none" else "; torch 2.4.0 could not read this layout (pytorch #133923), later ones can"
        return Verdict.ok(f"{layout}; the installed torch reads DCP up to {ours}{note}", obtained=layout)

    return evaluate

