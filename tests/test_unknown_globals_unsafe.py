"""Only known inert data may hide outside the allowlist: any other global, whatever module it comes from,
is unsafe in every format.  Old code kept a denylist, so ``pydoc.pipepager``, ``codecs.open`` or
``zipfile.ZipFile`` were "harmless unknown data", and the printed ``add_safe_globals`` advice ran them."""

from __future__ import annotations

import codecs
import pickle
import pydoc
import zipfile
from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main
from ckptcheck.safe_pickle import is_inert_data

from .hostile import LINGUA, GOOD, Payload, _dcp_bytes
from .test_safe_pickle import sentinel  # noqa: F401  (fixture)

# Calls that act on the system from modules no denylist names; each creates the sentinel when run.
ACTORS = {
    "pydoc.pipepager": lambda s: Payload(pydoc.pipepager, "x", f"touch {s}"),
    "codecs.open": lambda s: Payload(codecs.open, str(s), "w"),
    "zipfile.ZipFile": lambda s: Payload(zipfile.ZipFile, str(s), "w"),
}


def _consolidated(tmp: Path, payload: object) -> Path:
    path = tmp / "consolidated.pth"
    torch.save({"model": torch.load(GOOD / "consolidated.pth", weights_only=True), "args": payload}, path)
    return path


def _bare(protocol: int):
    def build(tmp: Path, payload: object) -> Path:
        path = tmp / "model.pt"
        path.write_bytes(pickle.dumps({"w": payload}, protocol))
        return path

    return build


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> None:
    """Every module the CLI imports is imported before the audit starts (class definitions raise "exec")."""
    main(["check", str(GOOD / "consolidated.pth"), "--model-config", str(LINGUA)])
    main(["report", str(GOOD / "consolidated.pth"), "--model-config", str(LINGUA),
          "-o", str(tmp_path_factory.mktemp("warm") / "r.html")])


FORMATS = {"torch_zip": _consolidated, "bare_p2": _bare(2), "bare_p0": _bare(0), "dcp_bytes": _dcp_bytes}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("actor", ACTORS)
def test_a_global_outside_the_inert_table_is_unsafe(tmp_path: Path, sentinel, fmt: str, actor: str,  # noqa: F811
                                                   capsys, warm) -> None:
    marker, audit = sentinel
    path = FORMATS[fmt](tmp_path, ACTORS[actor](marker))
    with audit:
        code = main(["check", str(path), "--model-config", str(LINGUA)])
    out = capsys.readouterr().out
    assert code == 1 and "UNSAFE" in out and actor in out
    assert "add_safe_globals" not in out


def test_a_resume_target_on_dcp_is_refused(tmp_path: Path, warm, sentinel, capsys) -> None:  # noqa: F811
    """Old code: ``--target lingua_resume`` passed while dcp.load (weights_only=False) would run the entry."""
    marker, audit = sentinel
    folder = _dcp_bytes(tmp_path, {"lr": ACTORS["pydoc.pipepager"](marker)})
    with audit:
        assert main(["check", str(folder), "--target", "lingua_resume"]) == 1
    assert "pydoc.pipepager" in capsys.readouterr().out


@pytest.mark.parametrize(("module", "name", "inert"), [
    ("argparse", "Namespace", True), ("numpy.dtypes", "Float32DType", True), ("numpy._core.multiarray", "scalar", True),
    ("pathlib", "PosixPath", True), ("collections", "defaultdict", True),
    ("numpy.dtypes", "__getattr__", False), ("numpy.dtypes", "np.DType", False), ("argparse", "ArgumentParser", False),
    ("numpy.lib._npyio_impl", "load", False), ("weakref", "finalize", False), ("torch", "set_default_device", False),
    ("ckptcheck.cli", "main", False), ("copy_reg", "_reconstructor", False),
])
def test_inert_table(module: str, name: str, inert: bool) -> None:
    assert is_inert_data(module, name) is inert


@pytest.mark.parametrize("command", ["check", "report"])
def test_the_safety_verdict_comes_before_the_config(tmp_path: Path, warm, sentinel, command: str,  # noqa: F811
                                                    capsys) -> None:
    """Old code: no config beside an unsafe checkpoint was "no model config", exit 2."""
    marker, audit = sentinel
    path = _consolidated(tmp_path, ACTORS["pydoc.pipepager"](marker))
    extra = ["-o", str(tmp_path / "r.html")] if command == "report" else []
    with audit:
        assert main([command, str(path), *extra]) == 1
    assert "no model config" not in capsys.readouterr().err
