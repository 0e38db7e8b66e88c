"""Outputs that appear whole or not at all, and never over something without ``--force``.

Everything is written into a temporary sibling of the destination (same folder, so the final rename
stays on one filesystem), fsynced, verified, then renamed into place and the parent folder fsynced.
A crash or SIGKILL at any point leaves the destination as it was, plus at most the clearly named
temporary, which a later run removes when its writer process is gone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InputError

TMP_MARK = ".ckptcheck-tmp-"


def refuse_unsafe_destination(src: Path, dst: Path, force: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise InputError(dst, None, f"is the input {src} or overlaps it; write the output elsewhere")
    if dst.exists() and not force:
        if dst.is_file() or any(dst.iterdir()):
            raise InputError(dst, None, "already exists; pass --force to replace it")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    if path.is_file():
        fsync_path(path)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def _clear_stale(dst: Path) -> None:
    """Remove temporaries of earlier runs for the same destination whose writer is gone."""
    prefix = f".{dst.name}{TMP_MARK}"
    for old in dst.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Staging:
    """A temporary file or folder beside ``dst``; ``commit`` renames it into place."""

    def __init__(self, dst: Path, *, folder: bool) -> None:
        self.dst = dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(dst)
        self.path = dst.parent / f".{dst.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"
        if folder:
            self.path.mkdir()

    def commit(self) -> None:
        fsync_tree(self.path)
        old = None
        if self.dst.exists():  # only with --force, checked before writing
            old = self.dst.parent / f".{self.dst.name}{TMP_MARK}{os.getpid()}-replaced"
            os.replace(self.dst, old)
        os.replace(self.path, self.dst)
        fsync_path(self.dst.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    def abort(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)
