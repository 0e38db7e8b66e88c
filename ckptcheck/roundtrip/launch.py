"""Starting the round trip's ranks on this machine with torch's elastic launcher (torchrun).

``torchrun --standalone`` finds a free port for its rendezvous itself, so two round trips at once (say
under ``pytest -n 2``) never collide.  Ranks run with a wall-clock limit; when a trip ends, however it
ends, every process carrying its tag is killed (``reaper``), so none outlives it, and each rank's own
error (from its report file) is what the caller sees.  A launcher killed with SIGKILL runs no cleanup:
then each process of the trip ends itself, and the next round trip removes its folders (``tether``).

Before any rank starts, every input the ranks will read has passed ckptcheck's own safe readers (the
source, and the DCP folder with its metadata and every bytes entry): hostile input stops the trip with
``UnsafeInputError`` and no rank ever sees it.  The ranks then read the DCP through the same allowlist.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, StandInError
from . import tether
from .reaper import PATIENCE_S, TRIP_ENV, kill_all_with_env


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
    Whatever happens (success, failure, timeout, an exception here, SIGTERM), no process of the trip
    outlives this call and its report folder is removed.
    """
    report_dir = tether.mkdtemp()
    try:
        return _run_world(report_dir, dcp=dcp, source=source, world_size=world_size, config=config,
                          factory=factory, optimizer=optimizer, save=save, timeout=timeout, backend=backend,
                          prepare=prepare)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)


def _run_world(report_dir: Path, *, dcp: str | Path, source: str | Path, world_size: int, config: str | None,
               factory: str | None, optimizer: bool, save: str | Path | None, timeout: float, backend: str,
               prepare: Callable[[], None] | None) -> TripResult:
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
    cmd = [sys.executable, "-m", "ckptcheck.roundtrip.agent", "--standalone", f"--nproc-per-node={world_size}",
           "--max-restarts=0", "--monitor-interval=0.2", "-m", "ckptcheck.roundtrip", *worker_args]
    tag = uuid.uuid4().hex
    scratch = report_dir / "tmp"  # torchrun's own torchelastic_* folders go here, and go with the trip's
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "CKPTCHECK_BACKEND": backend_for(world_size, backend), "PYTHONUNBUFFERED": "1", TRIP_ENV: tag,
           tether.LAUNCHER_ENV: tether.own_identity(), "TMPDIR": str(scratch)}
    if env["CKPTCHECK_BACKEND"] == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo round trips run on CPU, whatever the machine has
    started = time.perf_counter()
    log = report_dir / "torchrun.log"
    errors: list[str] = []
    survivors: list[int] = []
    proc: subprocess.Popen[bytes] | None = None
    with open(log, "wb") as sink, _sigterm_as_exit():
        try:  # torchrun itself carries the tag: cleanup finds it even if a signal lands before ``proc`` is set
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            if prepare is not None:
                prepare()
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            errors.append(f"timed out after {timeout:.0f} s")
        finally:
            survivors = _end_trip(proc, tag)
    seconds = time.perf_counter() - started
    ranks, report_errors = read_reports(report_dir, world_size)
    for r in ranks:
        if r.get("error"):
            errors.append(f"rank {r['rank']} failed in phase {r.get('current_phase')}: {r['error']}")
        elif errors and errors[0].startswith("timed out"):
            errors.append(f"rank {r['rank']} was in phase {r.get('current_phase')}")
    errors += report_errors
    missing = sorted(set(range(world_size)) - {r["rank"] for r in ranks})
    if missing and not errors:
        errors.append(f"ranks {missing} ended without a report")
    assert proc is not None
    if proc.returncode not in (0, None) and not errors:
        tail = log.read_bytes().decode(errors="replace").strip().splitlines()[-5:]
        errors.append(f"torchrun exited with {proc.returncode}: " + " | ".join(tail))
    if survivors:
        errors.append(f"processes {survivors} of the round trip survived SIGKILL for {PATIENCE_S:.0f} s")
    return TripResult(world_size, str(dcp), ranks, seconds, errors)


def read_reports(report_dir: Path, world_size: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Each rank's ``rank<N>.json``, in rank order, and a line for each report that is not whole.

    Workers write their report beside it and rename it into place, so a ``.tmp`` file alone means the
    rank was killed while writing; a final file that does not parse is named the same way.
    """
    ranks: list[dict[str, Any]] = []
    errors: list[str] = []
    for rank in range(world_size):
        path = report_dir / f"rank{rank}.json"
        try:
            report = json.loads(path.read_text())
        except (ValueError, OSError):  # absent, or torn (JSONDecodeError and UnicodeDecodeError are ValueErrors)
            report = None
        if isinstance(report, dict) and report.get("rank") == rank:
            ranks.append(report)
        elif path.exists() or path.with_name(path.name + ".tmp").exists():
            errors.append(f"rank {rank}'s report is incomplete (the rank was killed while writing it)")
    return ranks, errors


def _end_trip(proc: subprocess.Popen[bytes] | None, tag: str) -> list[int]:
    """Kill torchrun's group, then every process carrying the trip's tag (workers run in sessions of
    their own), with SIGTERM and SIGINT held back meanwhile so that cleanup itself is never cut short.
    Returns the processes SIGKILL could not end."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        survivors = kill_all_with_env(TRIP_ENV, tag)
        if proc is not None:
            proc.wait()
        return survivors
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM to the launcher unwinds it like Ctrl-C does, so the trip's cleanup runs (only the main
    thread can take signals; elsewhere the default stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def check_inputs(*paths: str | Path) -> None:
    """Open each checkpoint the ranks will read with ckptcheck's own readers, which read a DCP's
    metadata and every bytes entry through the allowlist; raises ``UnsafeInputError`` (a payload) or
    ``InputError`` (unreadable) before any rank starts.  A DCP that ckptcheck converts is written from a
    source checked here, and read by the ranks through the allowlist all the same."""
    from ..formats import open_checkpoint

    for path in dict.fromkeys(Path(p).resolve() for p in paths):
        with open_checkpoint(path):
            pass


def roundtrip(ckpt: str | Path, *, config: str | Path | None, world_size: int = 2, reshard_to: int | None = None,
              optimizer: bool = False, factory: str | None = None, workdir: str | Path | None = None,
              timeout: float = 600.0, backend: str = "auto", dcp: str | Path | None = None,
              head_dim: int | None = None) -> RoundtripResult:
    """Convert ``ckpt`` to DCP (unless it already is one, or ``dcp`` names one made elsewhere, say by a
    training run), load it under FSDP2 at ``world_size``, compare every shard with ``ckpt``, and with
    ``reshard_to`` save it from that world and load it again at the other."""
    from ..convert.api import convert
    from ..engine import resolve_config_path
    from ..formats import detect_format

    config_path = resolve_config_path(ckpt, config)
    if config_path is None and factory is None:
        raise InputError(ckpt, None, "no model config: pass --model-config or --model-factory")
    tether.sweep_dead()
    own = workdir is None
    work = Path(workdir) if workdir else tether.mkdtemp()
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
                # The training state goes along only when the ranks load it.
                try:
                    convert(ckpt, dcp_dir, to="dcp", naming="lingua" if factory is None else None,
                            config=config_path, verify=False, weights_only=not optimizer, head_dim=head_dim)
                except StandInError as exc:  # the trip's own way to leave it behind
                    raise StandInError(exc.path, exc.item, exc.global_name,
                                       "run the round trip without --optimizer, or re-save the checkpoint "
                                       "without it") from None
        else:
            dcp_dir = Path(target)
        check_inputs(ckpt, *(() if converted else (dcp_dir,)))
        trips = [run_world(dcp=dcp_dir, source=ckpt, world_size=world_size, config=config_path, factory=factory,
                           optimizer=optimizer, save=work / f"saved_{world_size}" if reshard_to else None,
                           timeout=timeout, backend=backend, prepare=prepare)]
        if reshard_to and trips[0].ok:
            check_inputs(work / f"saved_{world_size}")
            trips.append(run_world(dcp=work / f"saved_{world_size}", source=ckpt, world_size=reshard_to,
                                   config=config_path, factory=factory, optimizer=optimizer, save=None,
                                   timeout=timeout, backend=backend))
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return RoundtripResult(str(ckpt), str(dcp_dir), converted, trips, peak)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
