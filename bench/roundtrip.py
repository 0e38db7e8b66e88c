"""The FSDP round trip at world size 2 against the naive path, on the same ~2.5 GB checkpoint.

    .venv/bin/python bench/roundtrip.py [--out /tmp/ckptcheck-bench]

ckptcheck: `ckptcheck roundtrip consolidated.pth --world-size 2` (its streaming converter to DCP, then
each rank loads its shards with get_model_state_dict -> dcp.load -> set_model_state_dict and compares
them with the rows of the .pth it holds).  Naive: torch_save_to_dcp, the same FSDP2 load, the full state
dict gathered on rank 0 (full_state_dict, cpu_offload), torch.load of the source on rank 0 and torch.equal
per tensor.  Both under torchrun with gloo, in the same run; wall time of the whole path and each
process's peak resident memory (the converter's process, and every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import generate_pth, run_child

NAIVE_WORKER = textwrap.dedent('''
    import json, os, resource, sys, warnings
    warnings.simplefilter("ignore")
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from ckptcheck.configs import load_config
    from ckptcheck.model import Transformer

    src, dcp_dir, params, out = sys.argv[1:5]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with torch.device("meta"):
        model = Transformer(load_config(params)).to(torch.bfloat16)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    sd = get_model_state_dict(model)
    dcp.load(sd, checkpoint_id=dcp_dir)
    set_model_state_dict(model, sd)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ok = True
    if dist.get_rank() == 0:
        source = torch.load(src, weights_only=True)
        ok = all(torch.equal(full[k], v) for k, v in source.items())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"peak_rss": rss, "equal": ok}, f)
    dist.barrier()
    dist.destroy_process_group()
''')


def torchrun(nproc: int, script: Path, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    str(script), *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ckptcheck-bench"))
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    pth, params = generate_pth(args.out, args.layers)
    work = Path(tempfile.mkdtemp(prefix="trip-bench-", dir=args.out))
    try:
        # ckptcheck: one command; its converter runs in the command's own process, the ranks under torchrun.
        report = work / "ours.json"
        code = ("import json, sys; from ckptcheck.roundtrip.launch import roundtrip; "
                "r = roundtrip(sys.argv[1], config=sys.argv[2], world_size=2, workdir=sys.argv[3]); "
                "json.dump(r.to_json(), open(sys.argv[4], 'w'))")
        ours = run_child(code, str(pth), str(params), str(work / "ours"), str(report))
        trip = json.loads(report.read_text())
        assert trip["ok"], trip
        ours_ranks = trip["trips"][0]["peak_rss"]
        ours_converter = trip["launcher_peak_rss"]

        # naive: format_utils conversion, then the load, gather and compare.
        script = work / "naive_worker.py"
        script.write_text(NAIVE_WORKER)
        t0 = time.perf_counter()
        conv = run_child("import sys, warnings; warnings.simplefilter('ignore'); "
                         "from torch.distributed.checkpoint.format_utils import torch_save_to_dcp; "
                         "torch_save_to_dcp(sys.argv[1], sys.argv[2])", str(pth), str(work / "naive_dcp"))
        (work / "naive").mkdir()
        torchrun(2, script, str(pth), str(work / "naive_dcp"), str(params), str(work / "naive"))
        naive_wall = time.perf_counter() - t0
        naive_ranks = [json.loads((work / "naive" / f"rank{r}.json").read_text()) for r in range(2)]
        assert all(r["equal"] for r in naive_ranks[:1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = 1e9
    print(f"checkpoint: {pth} ({pth.stat().st_size / gb:.2f} GB bf16), world size 2, gloo on CPU")
    print(f"{'':30} {'wall s':>8} {'converter GB':>13} {'rank 0 GB':>10} {'rank 1 GB':>10}")
    print(f"{'ckptcheck roundtrip':30} {ours.seconds:8.1f} {ours_converter / gb:13.2f} "
          f"{ours_ranks[0] / gb:10.2f} {ours_ranks[1] / gb:10.2f}")
    print(f"{'naive (format_utils + gather)':30} {naive_wall:8.1f} {conv.peak_rss / gb:13.2f} "
          f"{naive_ranks[0]['peak_rss'] / gb:10.2f} {naive_ranks[1]['peak_rss'] / gb:10.2f}")
    print(f"ratios ckptcheck/naive: wall {ours.seconds / naive_wall:.2f}x, rank-0 peak "
          f"{ours_ranks[0] / naive_ranks[0]['peak_rss']:.2f}x, converter peak {ours_converter / conv.peak_rss:.2f}x")


if __name__ == "__main__":
    main()
