"""Starting the round trip's ranks on this machine with torch's elastic launcher (torchrun).

``torchrun --standalone`` finds a free port for its rendezvous itself, so two round trips at once (say
under ``pytest -n 2``) never collide.  Ranks run in their own process group with a wall-clock limit;
on a timeout or any failure the whole group is killed, so no worker outlives its round trip, and each
rank's own error (from its report file) is what the caller sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError


@dataclass
class TripResult:
    """One world size's load (and compare, and optional save)."""

    world_size: int
    dcp: str
    ranks: list[dict[str, Any]]
    seconds: float
    errors: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> list[dict[str, Any]]:
        return [m for r in self.ranks for m in r.get("mismatches", [])]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.mismatches and len(self.ranks) == self.world_size

    @property
    def peak_rss(self) -> list[int]:
        return [r.get("peak_rss", 0) for r in sorted(self.ranks, key=lambda r: r["rank"])]

    def summary(self) -> str:
        if self.errors:
            return f"world size {self.world_size}: " + "; ".join(self.errors)
        if self.mismatches:
            first = self.mismatches[0]
            return (f"world size {self.world_size}: {len(self.mismatches)} mismatches; first {first['key']}: "
                    f"{first['detail']}")
        tensors = sum(r.get("compared_tensors", 0) for r in self.ranks)
        from ..report.text import human_bytes

        size = human_bytes(sum(r.get("compared_bytes", 0) for r in self.ranks))
        tied = {r.get("tied") for r in self.ranks} - {None}
        return (f"world size {self.world_size}: {tensors} shards compared bit for bit ({size}) in "
                f"{self.seconds:.1f} s" + (", tied weights still tied" if tied == {True} else ""))


def backend_for(world_size: int, requested: str = "auto") -> str:
    """gloo on CPU; NCCL with one process per GPU when there are enough GPUs."""
    if requested != "auto":
        return requested
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
            return "nccl"
    except ImportError:
        pass
    return "gloo"


def run_world(*, dcp: str | Path, source: str | Path, world_size: int, config: str | None, factory: str | None,
              optimizer: bool, save: str | Path | None, timeout: float, backend: str = "auto",
              prepare: Callable[[], None] | None = None) -> TripResult:
    """Run the worker on ``world_size`` local ranks and collect their reports.

    ``prepare`` (the conversion to DCP) runs here while the ranks start up, import torch and meet;
    they wait for the DCP folder, which the converter renames into place only once it is complete.
    """
    report_dir = Path(tempfile.mkdtemp(prefix="ckptcheck-roundtrip-"))
    worker_args = ["--dcp", str(dcp), "--source", str(source), "--report", str(report_dir),
                   "--timeout", str(max(30.0, timeout / 4))]
    if prepare is not None:
        worker_args.append("--wait-for-dcp")
    if config:
        worker_args += ["--model-config", str(config)]
    if factory:
        worker_args += ["--model-factory", factory]
    if optimizer:
        worker_args.append("--optimizer")
    if save:
        worker_args += ["--save", str(save)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
           "--max-restarts=0", "--monitor-interval=0.2", "-m", "ckptcheck.roundtrip", *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "CKPTCHECK_BACKEND": backend_for(world_size, backend), "PYTHONUNBUFFERED": "1"}
    if env["CKPTCHECK_BACKEND"] == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo round trips run on CPU, whatever the machine has
    started = time.perf_counter()
    log = report_dir / "torchrun.log"
    errors: list[str] = []
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if prepare is not None:
                prepare()
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            errors.append(f"timed out after {timeout:.0f} s")
        finally:
            _kill_group(proc)
            proc.wait()
    output = log.read_bytes()
    seconds = time.perf_counter() - started
    ranks = []
    for path in sorted(report_dir.glob("rank*.json")):
        ranks.append(json.loads(path.read_text()))
    shutil.rmtree(report_dir, ignore_errors=True)
    for r in sorted(ranks, key=lambda r: r["rank"]):
        if r.get("error"):
            errors.append(f"rank {r['rank']} failed in phase {r.get('current_phase')}: {r['error']}")
        elif errors and errors[0].startswith("timed out"):
            errors.append(f"rank {r['rank']} was in phase {r.get('current_phase')}")
    reported = {r["rank"] for r in ranks}
    missing = sorted(set(range(world_size)) - reported)
    if missing and not errors:
        errors.append(f"ranks {missing} ended without a report")
    if proc.returncode not in (0, None) and not errors:
        tail = output.decode(errors="replace").strip().splitlines()[-5:]
        errors.append(f"torchrun exited with {proc.returncode}: " + " | ".join(tail))
    return TripResult(world_size, str(dcp), ranks, seconds, errors)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class RoundtripResult:
    source: str
    dcp: str
    converted: bool
    trips: list[TripResult]
    # this process's peak resident memory: the converter's, when it converted
    launcher_peak_rss: int = 0

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.trips)

    def lines(self) -> list[str]:
        head = f"{self.source} -> DCP {'(converted by ckptcheck) ' if self.converted else ''}{self.dcp}"
        return [head, *("  " + ("ok    " if t.ok else "FAIL  ") + t.summary() for t in self.trips)]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "dcp": self.dcp, "converted": self.converted, "ok": self.ok,
                "launcher_peak_rss": self.launcher_peak_rss,
                "trips": [{"world_size": t.world_size, "ok": t.ok, "seconds": t.seconds, "errors": t.errors,
                           "mismatches": t.mismatches, "peak_rss": t.peak_rss, "dcp": t.dcp} for t in self.trips]}


def roundtrip(ckpt: str | Path, *, config: str | Path | None, world_size: int = 2, reshard_to: int | None = None,
              optimizer: bool = False, factory: str | None = None, workdir: str | Path | None = None,
              timeout: float = 600.0, backend: str = "auto", dcp: str | Path | None = None) -> RoundtripResult:
    """Convert ``ckpt`` to DCP (unless it already is one, or ``dcp`` names one made elsewhere, say by a
    training run), load it under FSDP2 at ``world_size``, compare every shard with ``ckpt``, and with
    ``reshard_to`` save it from that world and load it again at the other."""
    from ..convert.api import convert
    from ..engine import resolve_config_path
    from ..formats import detect_format

    config_path = resolve_config_path(ckpt, config)
    if config_path is None and factory is None:
        raise InputError(ckpt, None, "no model config: pass --model-config or --model-factory")
    own = workdir is None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ckptcheck-roundtrip-"))
    try:
        fmt, target = detect_format(dcp if dcp is not None else ckpt)
        if dcp is not None and fmt != "dcp":
            raise InputError(dcp, None, "is not a DCP checkpoint folder")
        converted = fmt != "dcp"
        prepare = None
        if converted:
            dcp_dir = work / "dcp"

            def prepare() -> None:
                # Not verified on its own: the trip compares every shard loaded from it with the source.
                convert(ckpt, dcp_dir, to="dcp", naming="lingua" if factory is None else None, config=config_path,
                        verify=False)
        else:
            dcp_dir = Path(target)
        trips = [run_world(dcp=dcp_dir, source=ckpt, world_size=world_size, config=config_path, factory=factory,
                           optimizer=optimizer, save=work / f"saved_{world_size}" if reshard_to else None,
                           timeout=timeout, backend=backend, prepare=prepare)]
        if reshard_to and trips[0].ok:
            trips.append(run_world(dcp=work / f"saved_{world_size}", source=ckpt, world_size=reshard_to,
                                   config=config_path, factory=factory, optimizer=optimizer, save=None,
                                   timeout=timeout, backend=backend))
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return RoundtripResult(str(ckpt), str(dcp_dir), converted, trips, peak)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
