"""--model-factory: any nn.Module, built on the meta device, is the spec."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ckptcheck.checks.model import Status
from ckptcheck.engine import Options, plan, run

FACTORY = '''
import torch

class Tiny(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.encoder = torch.nn.Linear(4, width)
        self.head = torch.nn.Linear(width, 2, bias=False)
        self.register_buffer("scale", torch.ones(width))
        assert self.head.weight.device.type == "meta", "not built on the meta device"

def build():
    return Tiny()

def build_from(config):
    return Tiny(width=config["model"]["width"])
'''


@pytest.fixture
def factory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_models", None)


def _state(width: int = 8) -> dict[str, torch.Tensor]:
    return {"encoder.weight": torch.randn(width, 4), "encoder.bias": torch.randn(width),
            "head.weight": torch.randn(2, width), "scale": torch.ones(width)}


def _failing(path: Path, factory: str, config: Path | None = None) -> list[str]:
    the_plan = plan(path, config, Options(model_factory=factory))
    try:
        return sorted(r.id for r in run(the_plan) if r.status is Status.FAIL)
    finally:
        the_plan.close()


def test_factory_module_passes_and_fails(factory_dir: Path) -> None:
    torch.save(_state(), factory_dir / "good.pth")
    assert _failing(factory_dir / "good.pth", "my_models:build") == []
    broken = _state()
    del broken["encoder.bias"]
    broken["head.weight"] = torch.randn(3, 8)
    broken["extra"] = torch.zeros(1)
    torch.save(broken, factory_dir / "bad.pth")
    assert _failing(factory_dir / "bad.pth", "my_models:build") == [
        "key_present[encoder.bias]", "shape[head.weight]", "unexpected_key[extra]"]


def test_factory_receives_the_config(factory_dir: Path) -> None:
    (factory_dir / "params.json").write_text('{"model": {"dim": 8, "n_layers": 1, "n_heads": 1, "width": 16}}')
    torch.save(_state(16), factory_dir / "wide.pth")
    assert _failing(factory_dir / "wide.pth", "my_models:build_from", factory_dir / "params.json") == []
