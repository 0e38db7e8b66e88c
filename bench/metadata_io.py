"""How much of a checkpoint do metadata checks read?  Prints bytes read and wall time per format.

    .venv/bin/python bench/metadata_io.py [--layers 12] [--out /tmp/ckptcheck-bench]

Generates a Llama-style bf16 checkpoint (12 layers of dim 2048, vocab 128256: ~2.5 GB) as a torch .pth,
a safetensors file and a lingua-style DCP folder, then runs every metadata check (--metadata-only) on
each, counting the bytes this process read with the kernel's rchar (/proc/self/io).  Files are kept in
--out between runs and regenerated only when missing.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from common import drop_caches, size_of

from ckptcheck.engine import Options, plan, run
from ckptcheck.iostats import bytes_read


def generate(out: Path, layers: int) -> dict[str, Path]:
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from ckptcheck.configs import load_config
    from ckptcheck.synth import random_state_dict

    out.mkdir(parents=True, exist_ok=True)
    params = out / "params.json"
    params.write_text(json.dumps({"model": {"dim": 2048, "n_layers": layers, "n_heads": 32, "n_kv_heads": 8,
                                            "vocab_size": 128256, "multiple_of": 256, "ffn_dim_multiplier": 1.5}}))
    paths = {"torch": out / "consolidated.pth", "safetensors": out / "model.safetensors", "dcp": out / "dcp"}
    if all(p.exists() for p in paths.values()):
        return {"params": params, **paths}
    state = random_state_dict(load_config(params), dtype="bfloat16", seed=0)
    torch.save(state, paths["torch"])
    save_file(state, str(paths["safetensors"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=str(paths["dcp"]))
    return {"params": params, **paths}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ckptcheck-bench"))
    args = ap.parse_args()
    paths = generate(args.out, args.layers)
    run(plan(paths["torch"], paths["params"], Options(metadata_only=True)))  # warm-up: imports
    cold = drop_caches()
    print(f"page cache dropped before each run: {'yes' if cold else 'no (not permitted here): warm cache'}")
    print(f"{'format':<12} {'checkpoint':>12} {'bytes read':>12} {'share':>8} {'checks':>7} {'wall':>8}")
    for fmt in ("torch", "safetensors", "dcp"):
        if cold:
            drop_caches()
        size = size_of(paths[fmt])
        before, t0 = bytes_read(), time.perf_counter()
        the_plan = plan(paths[fmt], paths["params"], Options(metadata_only=True))
        results = run(the_plan)
        the_plan.close()
        wall, used = time.perf_counter() - t0, bytes_read() - before  # type: ignore[operator]
        failed = [r.id for r in results if r.status.value not in ("pass", "skip")]
        assert not failed, failed
        print(f"{fmt:<12} {size / 1e9:>10.2f}GB {used:>12,} {100 * used / size:>7.4f}% {len(results):>7} {wall * 1e3:>6.0f}ms")


if __name__ == "__main__":
    main()
