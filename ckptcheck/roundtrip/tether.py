"""Nothing of a round trip outlives its launcher, even one killed with SIGKILL (which runs no cleanup).

The launcher is named by its pid and its start time (field 22 of ``/proc/<pid>/stat``), so a reused pid
is never taken for it.  Every process of the trip (the torchrun agent, each rank) runs a daemon thread
that ends its process as soon as the launcher is gone; the trip's temporary folders carry the same
identity in their names, and each later round trip removes the folders of launchers that are gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

LAUNCHER_ENV = "CKPTCHECK_LAUNCHER"
PREFIX = "ckptcheck-roundtrip-"
CHECK_EVERY_S = 0.5
_FOLDER = re.compile(re.escape(PREFIX) + r"([0-9]+)-([0-9]+)-")


def identity(pid: int) -> str | None:
    """``<pid>-<start time>`` of a live process, or None when it is gone (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else f"{pid}-{fields[19]}"


def own_identity() -> str:
    ident = identity(os.getpid())
    assert ident is not None
    return ident


def mkdtemp() -> Path:
    """A temporary folder of this launcher's trip, named so a later run can tell when its launcher is gone."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{own_identity()}-"))


def sweep_dead() -> list[Path]:
    """Remove the round trip folders in the temporary folder whose launcher is gone; returns them."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        match = _FOLDER.match(folder.name)
        if match and identity(int(match[1])) != f"{match[1]}-{match[2]}":
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def watch_launcher() -> None:
    """In a process of the trip: end it (``os._exit``) once the launcher named in the environment is gone."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return
    pid = int(launcher.split("-")[0])

    def watch() -> None:
        while identity(pid) == launcher:
            time.sleep(CHECK_EVERY_S)
        os._exit(1)

    threading.Thread(target=watch, name="ckptcheck-launcher-watch", daemon=True).start()
