"""One rank of the round trip.  Runs unchanged under torchrun:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m ckptcheck.roundtrip --dcp /shared/ckpt_dcp --source /shared/consolidated.pth \\
        --model-config params.json --report /shared/report

Every rank builds the model on the meta device, shards it with ``fully_shard`` on a 1-D mesh of all
ranks, loads the DCP checkpoint with get_model_state_dict -> dcp.load -> set_model_state_dict, and
compares the shard it holds with the same rows of the source, bit for bit, one tensor at a time: the
ranks together compare every element once, and no rank ever holds more than its shard plus one shard
read from the source.  It then checks that tied weights are still one Parameter and, if asked, saves
the sharded state back to DCP (from this world size, for a later load into another).  Each rank writes
``rank<N>.json`` into ``--report``, errors included, so a failed rank is reported with its own error;
the file appears whole or not at all (written beside it, then renamed).

The DCP folder is read through ckptcheck's allowlist (``storage``): ``.metadata`` and every bytes entry
are never unpickled by torch, whose default reader and planner would run any pickled code in them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ckptcheck.roundtrip", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dcp", required=True, help="DCP checkpoint to load (lingua layout, or flat)")
    ap.add_argument("--source", required=True, help="checkpoint to compare against (any format)")
    ap.add_argument("--model-config", help="config to build the model from")
    ap.add_argument("--model-factory", help="module:function building the model instead")
    ap.add_argument("--optimizer", action="store_true", help="also load AdamW state and compare it")
    ap.add_argument("--save", help="save the loaded sharded state back to this DCP folder")
    ap.add_argument("--report", required=True, help="folder for rank<N>.json results")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may wait")
    ap.add_argument("--wait-for-dcp", action="store_true",
                    help="wait (up to --timeout) for --dcp to appear: it is being written while the ranks start")
    return ap.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> None:
    from .tether import watch_launcher

    watch_launcher()  # a rank never outlives its launcher, even one killed with SIGKILL
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    report: dict[str, Any] = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                              "host": os.uname().nodename, "phases": {}, "mismatches": [], "error": None}
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    try:
        run(args, report)
    except BaseException as exc:
        report["error"] = one_line(exc)
        report["traceback"] = traceback.format_exc()
        raise
    finally:
        report["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_report(out / f"rank{rank}.json", report)
        _destroy()


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Atomically: a rank killed while writing leaves a ``.tmp`` file, never a torn report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def one_line(exc: BaseException) -> str:
    """The root cause of an exception in one line: DCP wraps every rank's traceback into its message."""
    text = f"{type(exc).__name__}: {exc}"
    causes = [line.strip() for line in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): ", line)]
    line = causes[-1] if causes else text.splitlines()[0]
    return line if len(line) <= 400 else line[:397] + "..."


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Phase:
    def __init__(self, report: dict[str, Any], name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        self.report["current_phase"] = self.name

    def __exit__(self, *exc: object) -> None:
        self.report["phases"][self.name] = round(time.perf_counter() - self.t0, 3)


def run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    backend = os.environ.get("CKPTCHECK_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    cuda = backend == "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    with Phase(report, "init"):
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=args.timeout))
        world = dist.get_world_size()
        mesh = init_device_mesh(device.type, (world,))
    report.update(backend=backend, device=str(device), world_size=world)

    from ..formats import open_checkpoint
    from .storage import SafeLoadPlanner, open_dcp

    if args.wait_for_dcp:
        with Phase(report, "wait"):
            deadline = time.monotonic() + args.timeout
            while not (Path(args.dcp) / ".metadata").is_file():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{args.dcp} did not appear within {args.timeout:.0f} s")
                time.sleep(0.05)
    items, reader = open_dcp(args.dcp)
    with Phase(report, "build"):
        model, cfg = _build(args, dtype=_dcp_dtype(items), entries=len(items))
        for block in getattr(model, "layers", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device=device)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4) if args.optimizer else None

    nested = any(it.path[0] == "model" and len(it.path) > 1 for it in items.values())
    prefix = "model." if nested else ""
    with Phase(report, "load"):
        msd = get_model_state_dict(model)
        # A tied weight is one tensor under two names; load it once when the checkpoint stores it once.
        tied = {k: first for k, first in _aliases(msd).items() if prefix + k not in items}
        model_sd = {k: v for k, v in msd.items() if k not in tied}
        state: dict[str, Any] = {"model": model_sd} if nested else dict(model_sd)
        if optim is not None:
            state["optim"] = get_optimizer_state_dict(model, optim)
        report["absent_in_checkpoint"] = _absent(state, items)
        missing_model = [k for k in report["absent_in_checkpoint"] if not k.startswith("optim.")]
        if missing_model:
            raise RuntimeError(f"the checkpoint lacks {len(missing_model)} model tensors, first {missing_model[0]}")
        # Optimizer fields newer than the checkpoint (say AdamW's decoupled_weight_decay) keep their
        # defaults: load partially, and report what was absent.
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(args.dcp, allow_partial_load=True))
        loaded = dict(state["model"] if nested else {k: state[k] for k in model_sd})
        loaded.update({k: loaded[first] for k, first in tied.items()})
        set_model_state_dict(model, loaded, options=StateDictOptions(strict=True))
        if optim is not None:
            set_optimizer_state_dict(model, optim, state["optim"])

    with Phase(report, "compare"), open_checkpoint(args.source) as source:
        compare = _Comparator(source, cfg, world, dist.get_rank())
        for name, tensor in model.state_dict().items():
            compare.tensor(name, tensor, name)
        if optim is not None:
            osd = get_optimizer_state_dict(model, optim)
            for fqn, entries in sorted(osd["state"].items()):
                for field_name, value in sorted(entries.items()):
                    compare.tensor(f"optim.state.{fqn}.{field_name}", value, fqn, optimizer=True)
        report["compared_tensors"], report["compared_bytes"] = compare.count, compare.bytes
        report["mismatches"] = compare.mismatches

    report["tied"] = None
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        report["tied"] = model.output.weight is model.tok_embeddings.weight
        if not report["tied"]:
            report["mismatches"].append({"key": "output.weight", "rank": dist.get_rank(),
                                         "detail": "no longer the same Parameter as tok_embeddings.weight"})

    if args.save:
        with Phase(report, "save"):
            saved: dict[str, Any] = {"model": get_model_state_dict(model)}
            if optim is not None:
                saved["optim"] = get_optimizer_state_dict(model, optim)
            dcp.save(saved, checkpoint_id=args.save)
    dist.barrier()


def _build(args: argparse.Namespace, dtype: Any, entries: int) -> tuple[Any, Any]:
    import torch

    from ..configs import load_config
    from ..engine import resolve_config_path
    from ..model import Transformer
    from ..spec import require_layers_held

    config_path = args.model_config or resolve_config_path(args.source, None)
    cfg = load_config(config_path) if config_path else None
    with torch.device("meta"):
        if args.model_factory:
            from ..spec import build_factory_model

            model = build_factory_model(args.model_factory, cfg)
        elif cfg is not None:
            require_layers_held(cfg, entries)
            model = Transformer(cfg)
        else:
            raise SystemExit("round trip: no model config and no --model-factory")
    return model.to(dtype), cfg


def _dcp_dtype(items: dict[str, Any]) -> Any:
    """The dtype most of the checkpoint's model tensors have: the model is built in it, so that loading
    is a copy and the comparison can be bitwise."""
    from collections import Counter

    from .. import dtypes

    counts: Counter[str] = Counter()
    for it in items.values():
        if it.info is not None and not it.fqn.startswith(("optim.", "optimizer.")):
            counts[it.info.dtype] += it.info.numel
    return dtypes.to_torch(counts.most_common(1)[0][0]) if counts else None


def _aliases(sd: dict[str, Any]) -> dict[str, str]:
    """Keys whose tensor is the very object of an earlier key (tied weights): key -> earlier key."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for key, value in sd.items():
        if id(value) in first:
            out[key] = first[id(value)]
        else:
            first[id(value)] = key
    return out


def _absent(state: dict[str, Any], items: dict[str, Any]) -> list[str]:
    """Flattened keys of ``state`` that the checkpoint's metadata does not have."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return sorted(k for k in flat if k not in items)


class _Comparator:
    """Compares local shards with the same rows of the source, through the converter's own mapping."""

    def __init__(self, source: Any, cfg: Any, world: int, rank: int) -> None:
        from ..convert.plan import build_plan
        from ..convert.stream import ChunkSource
        from ..naming import META

        self.rank, self.world = rank, world
        plan = build_plan(source.manifest, naming=META if cfg is not None else None, config=cfg)
        self.moves = {m.dst_key: m for m in plan.moves}
        self.source = ChunkSource(source, measure_casts=False, buffers="exact")
        self.manifest = source.manifest
        self.count = 0
        self.bytes = 0
        self.mismatches: list[dict[str, Any]] = []

    def tensor(self, name: str, value: Any, param: str, optimizer: bool = False) -> None:
        from torch.distributed.tensor import DTensor

        from ..bits import first_difference
        from ..convert.plan import TensorMove
        from ..dtypes import from_torch

        if isinstance(value, DTensor):
            (chunk,) = value.__create_chunk_list__()
            offsets, local = tuple(chunk.offsets), value.to_local()
        else:
            offsets, local = (0,) * value.dim(), value
        local = local.detach().cpu()
        if optimizer:
            src_key = name if name in self.manifest.extra_tensors else None
            base = self.moves.get(param)
            move = None if src_key is None else TensorMove(
                src_key, name, None, self.manifest.extra_tensors[src_key].shape,
                self.manifest.extra_tensors[src_key].dtype, from_torch(local.dtype),
                base.permute if base is not None and local.dim() else None)
        else:
            base = self.moves.get(name)
            move = None if base is None else TensorMove(base.src_key, name, base.canonical, base.shape,
                                                        base.src_dtype, from_torch(local.dtype), base.permute)
        if move is None:
            self.mismatches.append({"key": name, "rank": self.rank, "detail": "not in the source checkpoint"})
            return
        if local.dim() and any(o for o in offsets[1:]):
            self.mismatches.append({"key": name, "rank": self.rank, "detail": "sharded on a dim other than 0"})
            return
        rows = (offsets[0], offsets[0] + local.shape[0]) if local.dim() else (0, 1)
        want = self.source.read(move, *rows) if local.numel() or not local.dim() else local
        self.count += 1
        self.bytes += local.numel() * local.element_size()
        index = first_difference(local, want.reshape(local.shape))
        if index is not None:
            if local.dim():
                index[0] += rows[0]
            self.mismatches.append({
                "key": name, "rank": self.rank, "rows": list(rows), "world_size": self.world,
                "first_index": index,
                "detail": f"rank {self.rank} of {self.world} holds rows {rows[0]}:{rows[1]}; first difference "
                          f"at {index}",
            })


if __name__ == "__main__":
    main(sys.argv[1:])
