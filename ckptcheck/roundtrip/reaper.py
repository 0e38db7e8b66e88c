"""Ending every process of a round trip, whatever state it is in.

torch's elastic agent starts each worker in a session of its own (``start_new_session``), so killing
torchrun's process group misses them, and a worker may start children of its own.  Every process of
a trip inherits one environment variable with a value unique to the trip; the reaper kills whatever
process carries it, and scans again until a scan finds none.  A zombie has no environment left, so a
dead process is never counted as alive.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

TRIP_ENV = "CKPTCHECK_TRIP"
PATIENCE_S = 60.0  # a process SIGKILL cannot end this long is stuck in the kernel: reported, not waited on
_POLL_S = 0.01


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment holds ``name=value`` (this one excluded)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def kill_all_with_env(name: str, value: str) -> list[int]:
    """SIGKILL every process carrying ``name=value`` until none is left; returns those that outlived
    ``PATIENCE_S`` (none, unless one is stuck in uninterruptible sleep)."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        pids = processes_with_env(name, value)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(_POLL_S)  # the kernel needs a moment to tear a killed process down
