"""A pickle naming harmless data outside the allowlist (training args, numpy scalars) is not an attack:
torch.load(weights_only=True) refuses it, ckptcheck says so and how to fix it, keeps the objects
unexecuted and still runs every tensor check.  torch itself is the judge of what it refuses."""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
from pathlib import Path

import numpy
import pytest
import torch

from ckptcheck.checks.model import Status
from ckptcheck.cli import main
from ckptcheck.engine import Options, plan, run
from ckptcheck.formats import open_checkpoint
from ckptcheck.safe_pickle import Unknown

from .hostile import Payload, torch_zip
from .test_safe_pickle import sentinel  # noqa: F401  (fixture)
from .writers import CONFIGS, FIXTURES

LINGUA = CONFIGS / "lingua_params.json"


def _training_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "consolidated.pth"
    sd = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "np": numpy.float64(1.0)}, path)
    return path


def test_weights_only_refusal_is_reported_with_every_tensor_check(tmp_path: Path, capsys) -> None:
    path = _training_checkpoint(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    results = run(plan(path, LINGUA, Options()))
    by_id = {r.id: r for r in results}
    finding = by_id["version[weights_only]"]
    assert finding.status is Status.FAIL
    assert "argparse.Namespace" in finding.obtained and "multiarray.scalar" in finding.obtained
    assert "torch.serialization.add_safe_globals" in finding.repair
    assert not [r for r in results if r.status is Status.UNSAFE]
    assert [r.id for r in results if r.status is Status.FAIL] == ["version[weights_only]"]
    for category in ("shape", "dtype", "finite", "key_present"):
        assert sum(r.category == category and r.status is Status.PASS for r in results) == 21
    assert main(["check", str(path), "--model-config", str(LINGUA)]) == 1
    assert "weights_only" in capsys.readouterr().out


def test_stand_ins_record_and_never_call(tmp_path: Path, sentinel) -> None:  # noqa: F811
    """REDUCE, NEWOBJ, BUILD and item opcodes on a stand-in only record their arguments."""
    marker, audit = sentinel
    path = torch_zip(tmp_path, pickle.dumps({"w": argparse.Namespace(a=[1, 2]), "d": Payload(argparse.Namespace,
                                                                                             str(marker))}, 2))
    with audit:
        ckpt = open_checkpoint(path)
    value = ckpt.load_value("w")
    assert isinstance(value, Unknown) and value.global_name == "argparse.Namespace"
    assert value.state == {"a": [1, 2]}
    assert ckpt.manifest.facts["pickle globals weights_only refuses"] == "argparse.Namespace"
    ckpt.close()


def test_dangerous_global_is_still_unsafe_when_unknowns_are_kept(tmp_path: Path, sentinel, capsys) -> None:  # noqa: F811
    marker, audit = sentinel
    path = torch_zip(tmp_path, pickle.dumps({"a": argparse.Namespace(), "p": Payload(os.system, f"touch {marker}")}, 2))
    with audit:
        assert main(["check", str(path), "--model-config", str(LINGUA)]) == 1
    out = capsys.readouterr().out
    assert "UNSAFE" in out and "posix.system" in out


def test_dcp_bytes_entry_with_training_args(tmp_path: Path) -> None:
    """dcp.load unpickles bytes entries with weights_only=False: it reads them, so the check passes, naming them."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    sd = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    dcp.save({"model": sd, "train_state": {"args": argparse.Namespace(lr=1.0)}}, checkpoint_id=str(folder))
    loaded = {"model": {k: torch.empty_like(v) for k, v in sd.items()}, "train_state": {"args": None}}
    dcp.load(loaded, checkpoint_id=str(folder))
    assert loaded["train_state"]["args"] == argparse.Namespace(lr=1.0)
    results = run(plan(folder, LINGUA, Options(metadata_only=True)))
    (finding,) = [r for r in results if r.id == "version[weights_only]"]
    assert finding.status is Status.PASS and finding.obtained == "argparse.Namespace"
    assert not [r for r in results if r.status is Status.UNSAFE]



@pytest.mark.parametrize("to", ["torch", "dcp"])
def test_converting_refuses_to_write_stand_ins(tmp_path: Path, to: str, capsys) -> None:
    """A stand-in is not the object it names: the conversion says so in one line, or leaves it behind."""
    path = _training_checkpoint(tmp_path)
    out = tmp_path / f"out.{to}"
    assert main(["convert", str(path), str(out), "--to", to, "--model-config", str(LINGUA)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kept unexecuted" in err and not out.exists()
    assert main(["convert", str(path), str(out), "--to", to, "--model-config", str(LINGUA), "--weights-only"]) == 0


def test_refused_globals_in_any_meta_shard_are_reported(tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(FIXTURES / "good" / "meta_mp", tmp_path / "mp"))
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    torch.save({**shard, "args": argparse.Namespace(lr=1.0)}, folder / "consolidated.01.pth")
    results = run(plan(folder, LINGUA, Options(metadata_only=True)))
    assert [r.obtained for r in results if r.id == "version[weights_only]"] == ["argparse.Namespace"]


def test_every_global_torch_weights_only_reads_is_in_the_allowlist() -> None:
    """So a global the allowlist lacks is one torch.load(weights_only=True) refuses: the finding is true."""
    from torch._weights_only_unpickler import _get_allowed_globals

    from ckptcheck.formats.torch_pickle import TORCH_ALLOWLIST

    ours = {f"{module}.{name}" for module, name in TORCH_ALLOWLIST}
    assert set(_get_allowed_globals()) <= ours


def test_quantized_tensor_is_bad_input_not_an_attack(tmp_path: Path, capsys) -> None:
    path = tmp_path / "q.pth"
    with warnings.catch_warnings():  # quantized tensors are deprecated, and still in checkpoints
        warnings.simplefilter("ignore")
        torch.save({"w": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)}, path)
        torch.load(path, weights_only=True)  # torch reads it
    assert main(["check", str(path), "--model-config", str(LINGUA)]) == 2
    assert "does not read" in capsys.readouterr().err


def test_legacy_file_with_training_args(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    sd = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    results = run(plan(path, LINGUA, Options(metadata_only=True)))
    assert [(r.status, r.obtained) for r in results if r.id == "version[weights_only]"] == [
        (Status.FAIL, "argparse.Namespace")]
