"""Bytes this process has read through read(2) (Linux ``/proc/self/io``), to prove metadata work is cheap."""

from __future__ import annotations

from pathlib import Path

_PROC_IO = Path("/proc/self/io")


def bytes_read() -> int | None:
    """Cumulative ``rchar`` of this process, or None where the kernel does not report it."""
    try:
        for line in _PROC_IO.read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
