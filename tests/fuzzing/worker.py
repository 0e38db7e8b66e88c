"""The process the harness runs cases in: ``python -m tests.fuzzing.worker run|oracle FD``.

One long-lived process per role keeps the fuzzer fast (no interpreter start per input) while a hang inside C
code can still be ended from outside: the harness kills the process and starts another.  The address space is
limited, so a runaway allocation fails fast instead of taking the machine.  Jobs come as JSON lines on stdin,
answers go as JSON lines to the file descriptor FD (stdout and stderr belong to the command under test).

``run``: ``ckptcheck.cli.main(argv)`` in-process, with its stdout and stderr captured into files, the wall
time, and the peak resident memory of this one input (VmHWM, reset before it through /proc/self/clear_refs).
``oracle``: would the real loaders take this file?  ``torch.load(weights_only=True)`` or safetensors' own.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

HEADROOM = 3 << 30  # address space beyond the warmed-up worker: room to measure a 2 GiB runaway, not to take the machine


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _limit_address_space() -> None:
    limit = _status("VmSize") + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _run(job: dict) -> dict:
    from ckptcheck.cli import main

    folder = Path(job["folder"])
    out, err = os.open(folder / "stdout", os.O_WRONLY | os.O_CREAT), os.open(folder / "stderr", os.O_WRONLY | os.O_CREAT)
    saved = os.dup(1), os.dup(2)
    os.dup2(out, 1)
    os.dup2(err, 2)
    _reset_peak()
    before = _status("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        rc: int | str = main(job["argv"])
    except SystemExit as exc:  # argparse's own exit
        rc = exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # noqa: BLE001 - an exception out of main is itself the finding
        rc = "raised"
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (out, err, *saved):
            os.close(fd)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"rc": rc, "seconds": seconds, "cpu": cpu, "rss_before": before, "peak": _status("VmHWM")}


def _oracle(job: dict) -> dict:
    """refused: the loader raised (the reason); None: no verdict (out of memory: not the loader's answer)."""
    path = job["path"]
    try:
        if job["kind"] == "torch":
            import torch

            torch.load(path, weights_only=True, map_location="cpu")
        else:
            from safetensors.torch import load_file

            load_file(path)
    except MemoryError:
        return {"refused": None}
    except Exception as exc:  # noqa: BLE001 - any refusal is the loader's verdict
        return {"refused": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return {"refused": ""}


def _warm_up(role: str) -> None:
    """Import what the first real input would, so that its memory is not counted against that input."""
    import torch

    torch.set_num_threads(1)
    if role == "run":
        from tests.writers import CONFIGS, FIXTURES

        from ckptcheck.cli import main

        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = os.dup(1), os.dup(2)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            for ckpt in ("good/consolidated.pth", "good/model.safetensors", "good/dcp", "good/meta_mp",
                         "good/hf_sharded"):
                main(["check", str(FIXTURES / ckpt), "--model-config", str(CONFIGS / "lingua_params.json")])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(devnull)
    else:
        from safetensors.torch import load_file  # noqa: F401


def serve(role: str, answers_fd: int) -> None:
    _warm_up(role)
    _limit_address_space()
    handle = _run if role == "run" else _oracle
    with os.fdopen(answers_fd, "w") as answers:
        answers.write(json.dumps({"ready": True}) + "\n")
        answers.flush()
        for line in sys.stdin:
            answers.write(json.dumps(handle(json.loads(line))) + "\n")
            answers.flush()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
