"""Shared by the benchmarks: a generated Llama-style checkpoint and child-process measurements."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# 12 layers of dim 2048 with a 128256 vocab: ~1.25 B parameters, ~2.5 GB in bf16.
MODEL = {"dim": 2048, "n_layers": 12, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
         "ffn_dim_multiplier": 1.5}


def generate_pth(out: Path, layers: int = 12) -> tuple[Path, Path]:
    """``consolidated.pth`` (bf16, Meta naming) and its lingua ``params.json``, made once and reused."""
    import torch

    from ckptcheck.configs import load_config
    from ckptcheck.synth import random_state_dict

    out.mkdir(parents=True, exist_ok=True)
    params, pth = out / "params.json", out / "consolidated.pth"
    model = {**MODEL, "n_layers": layers}
    if pth.exists() and params.exists() and json.loads(params.read_text())["model"] == model:
        return pth, params
    params.write_text(json.dumps({"model": model}))
    torch.save(random_state_dict(load_config(params), dtype="bfloat16", seed=0), pth)
    return pth, params


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes


def run_child(code: str, *args: str) -> Measured:
    """Run ``python -c code args`` and report its wall time and peak resident memory (wait4 rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"benchmark child failed ({status}): {code[:80]} {args}")
    return Measured(seconds, usage.ru_maxrss * 1024 if sys.platform != "darwin" else usage.ru_maxrss)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


__all__ = ["Measured", "drop_caches", "generate_pth", "median", "resource", "run_child", "size_of"]
