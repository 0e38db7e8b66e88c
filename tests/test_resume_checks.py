"""--target resume: optimizer state per parameter, param groups, step, scheduler and data-loader state,
in every layout frameworks save: lingua DCP step folders and consolidated files, torchtitan DCP, and a
plain {"model", "optimizer"} torch file."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from ckptcheck.checks.model import Status
from ckptcheck.cli import main
from ckptcheck.configs import load_config
from ckptcheck.engine import Options, plan, run
from ckptcheck.model import Transformer
from ckptcheck.naming import TITAN
from ckptcheck.synth import in_scheme

from .writers import CONFIGS, FIXTURES

LINGUA = CONFIGS / "lingua_params.json"
RESUME_CATEGORIES = ("resume", "optimizer_state", "optimizer_groups", "optimizer_step", "train_state")


def resume_results(path: Path, config: Path | None = LINGUA, **options) -> dict[str, object]:
    the_plan = plan(path, config, Options(target="resume", **options))
    try:
        return {r.id: r for r in run(the_plan) if r.category in RESUME_CATEGORIES}
    finally:
        the_plan.close()


def failing(results: dict) -> list[str]:
    return sorted(k for k, r in results.items() if r.status is Status.FAIL)


def _trained(steps: int = 2) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(load_config(LINGUA))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(torch.arange(8)).sum().backward()
        optim.step()
        optim.zero_grad()
    return model, optim


def test_lingua_step_folder_passes() -> None:
    results = resume_results(FIXTURES / "good" / "dcp")
    assert failing(results) == []
    assert len([k for k in results if k.startswith("optimizer_state[")]) == 21


def test_lingua_consolidated_has_optimizer_but_no_train_state() -> None:
    results = resume_results(FIXTURES / "good" / "lingua_consolidated")
    assert failing(results) == ["train_state[data_loader]", "train_state[scheduler]"]


def test_plain_model_optimizer_file_keyed_by_position(tmp_path: Path) -> None:
    model, optim = _trained()
    scheduler = torch.optim.lr_scheduler.LinearLR(optim)
    torch.save({"model": model.state_dict(), "optimizer": optim.state_dict(), "lr_scheduler": scheduler.state_dict()},
               tmp_path / "ckpt.pt")
    results = resume_results(tmp_path / "ckpt.pt")
    assert failing(results) == ["train_state[data_loader]"]
    assert results["optimizer_step[all]"].message.startswith("every parameter at step 2")


def test_torchtitan_dcp_layout(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, optim = _trained(1)
    cfg = load_config(LINGUA)
    osd = get_optimizer_state_dict(model, optim, options=StateDictOptions(flatten_optimizer_state_dict=True))
    titan_names = {k: TITAN.from_canonical(k) for k in model.state_dict()}
    state = {
        **in_scheme(model.state_dict(), TITAN, cfg),
        "optimizer": {".".join([k.split(".")[0], titan_names.get(k.split(".", 1)[1].rsplit(".", 1)[0], ""),
                                k.rsplit(".", 1)[1]]): v for k, v in osd.items()},
        "lr_scheduler": {"last_epoch": 1},
        "dataloader": {"dp_rank_0": {"position": 8}},
        "train_state": {"step": 1},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "step-1"))
    results = resume_results(tmp_path / "step-1")
    assert failing(results) == [], [results[k].message for k in failing(results)]
    assert "one entry per parameter" in results["optimizer_groups[all]"].message


@pytest.fixture
def consolidated(tmp_path: Path) -> dict:
    return torch.load(FIXTURES / "good" / "lingua_consolidated" / "consolidated.pth", weights_only=True)


def _save(tmp_path: Path, ckpt: dict) -> Path:
    path = tmp_path / "consolidated.pth"
    torch.save(ckpt, path)
    return path


def test_missing_field_names_parameter_and_field(tmp_path: Path, consolidated: dict) -> None:
    del consolidated["optim"]["state"]["layers.1.attention.wk.weight"]["exp_avg_sq"]
    results = resume_results(_save(tmp_path, consolidated))
    r = results["optimizer_state[layers.1.attention.wk.weight]"]
    assert r.status is Status.FAIL and "lacks exp_avg_sq" in r.message and "layers.1.attention.wk.weight" in r.message


def test_missing_state_and_wrong_shape(tmp_path: Path, consolidated: dict) -> None:
    del consolidated["optim"]["state"]["norm.weight"]
    consolidated["optim"]["state"]["output.weight"]["exp_avg"] = torch.zeros(3, 3)
    results = resume_results(_save(tmp_path, consolidated))
    assert "has no optimizer state" in results["optimizer_state[norm.weight]"].message
    assert "exp_avg has shape [3, 3]" in results["optimizer_state[output.weight]"].message


def test_param_groups_must_list_each_parameter_once(tmp_path: Path, consolidated: dict) -> None:
    group = consolidated["optim"]["param_groups"][0]
    group["params"] = [p for p in group["params"] if p != "norm.weight"] + ["output.weight"]
    results = resume_results(_save(tmp_path, consolidated))
    message = results["optimizer_groups[all]"].message
    assert "in no param group: norm.weight" in message and "in several param groups: output.weight" in message


def test_steps_must_agree(tmp_path: Path, consolidated: dict) -> None:
    consolidated["optim"]["state"]["layers.0.attention.wq.weight"]["step"] = torch.tensor(3.0)
    results = resume_results(_save(tmp_path, consolidated))
    r = results["optimizer_step[all]"]
    assert r.status is Status.FAIL and "layers.0.attention.wq.weight" in r.message
    assert resume_results(_save(tmp_path, consolidated), metadata_only=True)["optimizer_step[all]"].status is Status.SKIP


def test_step_must_agree_with_train_state(tmp_path: Path) -> None:
    folder = tmp_path / "step"
    shutil.copytree(FIXTURES / "good" / "dcp", folder)
    (folder / "train_state_00000.json").write_text(json.dumps({"step": 99, "data_loader_state": {}, "scheduler": {}}))
    r = resume_results(folder)["optimizer_step[all]"]
    assert r.status is Status.FAIL and "train state says step 99" in r.message


def test_one_train_state_per_saving_rank(tmp_path: Path) -> None:
    folder = tmp_path / "step"
    shutil.copytree(FIXTURES / "good" / "dcp", folder)
    shutil.copy(folder / "__0_0.distcp", folder / "__1_0.distcp")
    shutil.copy(folder / "__0_0.distcp", folder / "__2_0.distcp")  # three ranks saved, one train state
    r = resume_results(folder)["train_state[ranks]"]
    assert r.status is Status.FAIL and "1 per-rank train states for 3 data-parallel ranks" in r.message


def test_weights_only_file_fails_resume_with_both_ways_out(capsys: pytest.CaptureFixture[str]) -> None:
    results = resume_results(FIXTURES / "good" / "consolidated.pth")
    r = results["resume[optimizer]"]
    assert r.status is Status.FAIL
    assert "init_ckpt_path" in r.repair and "initial_load_model_only" in r.repair
    assert "--init-optimizer-state" in r.repair
    assert all(results[k].status is Status.SKIP for k in results if k.startswith("optimizer_state["))


@pytest.mark.parametrize("to", ["torch", "dcp"])
def test_init_optimizer_state_repair(to: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / ("out.pth" if to == "torch" else "out")
    code = main(["repair", str(FIXTURES / "good" / "consolidated.pth"), str(dst), "--model-config", str(LINGUA),
                 "--target", "resume", "--to", to, "--init-optimizer-state"])
    out = capsys.readouterr().out
    assert "INITIALISE optimizer state" in out and "NOTE: optimizer state was INITIALISED" in out
    assert code == 1  # scheduler and data-loader state cannot be made up, and the command says so
    assert failing(resume_results(dst)) == ["train_state[data_loader]", "train_state[scheduler]"]
