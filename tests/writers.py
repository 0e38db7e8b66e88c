"""Write a state dict in each supported format with the real libraries, for the format matrix tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from ckptcheck.configs import ModelConfig
from ckptcheck.synth import write_meta_shards
from ckptcheck.naming import HF, META, Scheme
from ckptcheck.synth import adamw_state, in_scheme

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CONFIGS = FIXTURES / "configs"

# format name -> the naming that format is normally written in
FORMATS: dict[str, Scheme] = {
    "torch": META, "lingua-torch": META, "meta-shards": META, "safetensors": META,
    "safetensors-sharded": HF, "dcp": META, "hf": HF,
}


def config_for(scheme: Scheme) -> Path:
    return CONFIGS / ("hf_config.json" if scheme is HF else "lingua_params.json")


def write(fmt: str, state: dict[str, torch.Tensor], folder: Path, *, optimizer: bool = False) -> Path:
    """Write ``state`` (keys already in the format's naming) as ``fmt`` under ``folder``; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        path = folder / "consolidated.pth"
        torch.save({"model": state, "optimizer": adamw_state(state)} if optimizer else state, path)
        return path
    if fmt == "lingua-torch":
        path = folder / "consolidated.pth"
        torch.save({"model": state, **({"optim": adamw_state(state)} if optimizer else {})}, path)
        return path
    if fmt == "meta-shards":
        write_meta_shards(state, folder, 2)
        return folder
    if fmt == "safetensors":
        path = folder / "model.safetensors"
        save_file(_untie(state), str(path))
        return path
    if fmt == "safetensors-sharded":
        state = _untie(state)
        keys = sorted(state)
        weight_map = {}
        for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: state[k] for k in part}, str(folder / name))
            weight_map.update({k: name for k in part})
        index = folder / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return index
    if fmt == "dcp":
        path = folder / "dcp"
        if path.exists():
            shutil.rmtree(path)
        payload = {"model": state, **({"optim": adamw_state(state)} if optimizer else {})}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(payload, checkpoint_id=str(path))
        return path
    if fmt == "hf":
        save_file(_untie(state), str(folder / "model.safetensors"))
        shutil.copy(CONFIGS / "hf_config.json", folder / "config.json")
        return folder
    raise ValueError(fmt)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage, and HF drops the tied copy: keep the first of each alias."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = k
        out[k] = v
    return out


def named(state: dict[str, torch.Tensor], scheme: Scheme, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return in_scheme(state, scheme, cfg)


def torch_refuses(path: Path) -> str | None:
    """``torch.load(weights_only=True)`` in a memory-limited process: its error output, or None."""
    code = (
        "import resource, sys, torch\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
        "torch.load(sys.argv[1], weights_only=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    return None if proc.returncode == 0 else proc.stderr.strip() or "?"
