"""Version compatibility: what wrote the checkpoint, whether the installed torch reads it, and the
migrations that fix it.  Fixtures in fixtures/old were written as older torch releases wrote them."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ckptcheck.checks import version as version_checks
from ckptcheck.checks.model import Status
from ckptcheck.cli import main
from ckptcheck.engine import Options, plan, run
from ckptcheck.formats import open_checkpoint
from ckptcheck.migrations import applicable

from .writers import CONFIGS, FIXTURES

OLD = FIXTURES / "old"
LINGUA = str(CONFIGS / "lingua_params.json")


def results_of(path: Path, **options) -> dict:
    the_plan = plan(path, LINGUA, Options(**options))
    try:
        return {r.id: r for r in run(the_plan)}
    finally:
        the_plan.close()


def test_legacy_serialization_is_read_detected_and_migrated(tmp_path: Path, tiny_state) -> None:
    with open_checkpoint(OLD / "legacy.pt") as ckpt:
        assert ckpt.manifest.format == "torch-legacy" and ckpt.manifest.nesting == "model"
        assert all(torch.equal(ckpt.load(k), v) for k, v in tiny_state.items())
        assert [m.name for m in applicable(ckpt.manifest)] == ["legacy_torch_to_zip"]
    r = results_of(OLD / "legacy.pt")["version[serialization]"]
    assert r.status is Status.FAIL and "mmap" in r.message and "legacy_torch_to_zip" in r.repair
    assert main(["repair", str(OLD / "legacy.pt"), str(tmp_path / "fixed.pt"), "--model-config", LINGUA]) == 0
    assert results_of(tmp_path / "fixed.pt")["version[serialization]"].status is Status.PASS
    torch.load(tmp_path / "fixed.pt", weights_only=True, mmap=True)  # what the legacy file could not do


def test_dcp_from_before_torch_2_4(tmp_path: Path) -> None:
    with open_checkpoint(OLD / "dcp_torch_2_3") as ckpt:
        assert ckpt.manifest.facts["dcp layout"].startswith("before torch 2.4")
    results = results_of(OLD / "dcp_torch_2_3", target="resume")
    assert all(r.status is not Status.FAIL for r in results.values())
    assert "pytorch #133923" in results["version[dcp_layout]"].message
    assert main(["repair", str(OLD / "dcp_torch_2_3"), str(tmp_path / "new"), "--target", "resume"]) == 0
    with open_checkpoint(tmp_path / "new") as ckpt:
        assert ckpt.manifest.facts["dcp metadata version"] != "none"
        assert "optim.param_groups.0.params" in ckpt.manifest.extra_entries  # lists flattened, as 2.4+ does


def test_torch_2_4_0_cannot_read_pre_2_4_dcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(version_checks, "installed_torch", lambda: (2, 4, 0))
    r = results_of(OLD / "dcp_torch_2_3")["version[dcp_layout]"]
    assert r.status is Status.FAIL and "dcp_pre_2_4_to_flattened" in r.repair


def test_dcp_from_a_newer_major_layout(tmp_path: Path) -> None:
    folder = tmp_path / "future"
    shutil.copytree(FIXTURES / "good" / "dcp", folder)
    meta = pickle.loads((folder / ".metadata").read_bytes())  # our own fixture
    meta.version = "9.0.0"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    r = results_of(folder)["version[dcp_layout]"]
    assert r.status is Status.FAIL and "9.0.0 is newer" in r.message


def test_naming_generations_are_detected_and_migrated(tmp_path: Path, tiny_cfg, tiny_state) -> None:
    from ckptcheck.naming import TITAN
    from ckptcheck.synth import in_scheme

    torch.save(in_scheme(tiny_state, TITAN, tiny_cfg), tmp_path / "titan.pth")
    with open_checkpoint(tmp_path / "titan.pth") as ckpt:
        assert [m.name for m in applicable(ckpt.manifest)] == ["titan_0_5_names"]
    assert results_of(tmp_path / "titan.pth")["naming[meta]"].status is Status.FAIL
    assert main(["repair", str(tmp_path / "titan.pth"), str(tmp_path / "meta.pth"), "--model-config", LINGUA]) == 0
    with open_checkpoint(tmp_path / "meta.pth") as ckpt:
        assert "layers.0.attention.wq.weight" in ckpt.manifest.tensors
