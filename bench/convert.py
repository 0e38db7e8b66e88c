"""ckptcheck's converter against torch.distributed.checkpoint.format_utils, and against the disk.

    .venv/bin/python bench/convert.py [--repeat 3] [--out /tmp/ckptcheck-bench]

Converts a generated ~2.5 GB bf16 Llama-style checkpoint .pth -> DCP and DCP -> .pth with ckptcheck and
with format_utils (torch_save_to_dcp / dcp_to_torch_save), each in a fresh process, and copies the same
bytes with cp.  Every timing ends with sync(), so each counts the time to get its bytes to disk (ckptcheck
fsyncs anyway; torch.save does not).  Peak memory is the child's maximum resident set (wait4).  Runs are
interleaved and repeated; medians and ratios from the same run are printed.  ckptcheck's time includes
reading its output back and comparing it with the input.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import drop_caches, generate_pth, median, run_child, size_of

SYNC = "import os; os.sync()"
CONVERT = "import sys; from ckptcheck.convert.api import convert; convert(sys.argv[1], sys.argv[2], to={to!r}); "
FORMAT_UTILS = ("import sys, warnings; warnings.simplefilter('ignore'); "
                "from torch.distributed.checkpoint.format_utils import {fn}; {fn}(sys.argv[1], sys.argv[2]); ")
# name -> (code, input: "pth" or "dcp", output name)
CASES = {
    "cp + sync (the disk's limit)": (
        "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2]); " + SYNC, "pth", "out.pth"),
    "ckptcheck .pth -> dcp": (CONVERT.format(to="dcp") + SYNC, "pth", "out_dcp"),
    "format_utils .pth -> dcp": (FORMAT_UTILS.format(fn="torch_save_to_dcp") + SYNC, "pth", "out_dcp"),
    "ckptcheck dcp -> .pth": (CONVERT.format(to="torch") + SYNC, "dcp", "out.pth"),
    "format_utils dcp -> .pth": (FORMAT_UTILS.format(fn="dcp_to_torch_save") + SYNC, "dcp", "out.pth"),
    "python + import torch (baseline memory)": ("import torch, ckptcheck.convert.api", "pth", "unused"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ckptcheck-bench"))
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run")
    args = ap.parse_args()
    pth, _ = generate_pth(args.out, args.layers)
    work = args.out / "convert"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    # The DCP every dcp -> .pth run reads: written once by format_utils, so both readers get the same input.
    src_dcp = work / "src_dcp"
    run_child(CASES["format_utils .pth -> dcp"][0], str(pth), str(src_dcp))
    inputs = {"pth": pth, "dcp": src_dcp}
    results: dict[str, list] = {name: [] for name in CASES}
    for _ in range(args.repeat):
        for name, (code, src_kind, out_name) in CASES.items():
            src, dst = inputs[src_kind], work / out_name
            if args.cold:
                drop_caches()
            results[name].append(run_child(code, str(src), str(dst)))
            shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
    size = size_of(pth)
    print(f"checkpoint: {pth} ({size / 1e9:.2f} GB bf16), {args.repeat} runs each, medians")
    print(f"{'':42} {'wall s':>8} {'GB/s':>6} {'peak RSS GB':>12}")
    med = {n: (median([m.seconds for m in r]), median([m.peak_rss for m in r])) for n, r in results.items()}
    for name, (secs, rss) in med.items():
        rate = f"{size / secs / 1e9:6.2f}" if "baseline" not in name else "      "
        print(f"{name:42} {secs:8.2f} {rate} {rss / 1e9:12.2f}")
    copy = med["cp + sync (the disk's limit)"][0]
    print()
    for direction in (".pth -> dcp", "dcp -> .pth"):
        ours, theirs = med[f"ckptcheck {direction}"], med[f"format_utils {direction}"]
        print(f"{direction}: ckptcheck/format_utils wall {ours[0] / theirs[0]:.2f}x, peak memory "
              f"{ours[1] / theirs[1]:.2f}x; ckptcheck/copy wall {ours[0] / copy:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
