"""Outputs that appear whole or not at all, and never over something without ``--force``.

Everything is written into a temporary sibling of the destination (same folder, so the final rename
stays on one filesystem), fsynced, verified, then renamed into place and the parent folder fsynced.
A crash or SIGKILL at any point leaves the destination as it was, plus at most the clearly named
temporary, which a later run removes when its writer process is gone.

Replacing an existing destination (``--force``) never loses both the old and the new: a file is
replaced by one atomic rename; a folder is swapped with the new one in one atomic exchange
(``renameat2(RENAME_EXCHANGE)``) where the kernel has it, else the old one is first moved to a
clearly named sibling (``.DST.ckptcheck-replaced-PID``) that a later run puts back if DST is missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from ..errors import InputError

TMP_MARK = ".ckptcheck-tmp-"
REPLACED_MARK = ".ckptcheck-replaced-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def refuse_unsafe_destination(src: Path, dst: Path, force: bool) -> None:
    recover_replaced(dst)
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise InputError(dst, None, f"is the input {src} or overlaps it; write the output elsewhere")
    if dst.exists() and not force:
        if dst.is_file() or any(dst.iterdir()):
            raise InputError(dst, None, "already exists; pass --force to replace it")


def refuse_short_space(dst: Path, nbytes: int) -> None:
    """Refuse before writing anything when the file system that will hold ``dst`` has fewer free bytes than
    the output's tensors take: a half-written output fills the disk for everyone, then fails anyway."""
    folder = next(p for p in (dst.parent, *dst.parent.parents) if p.is_dir())
    try:
        st = os.statvfs(folder)
    except OSError:
        return  # nothing to measure with: the write itself reports a full disk
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise InputError(dst, None, f"the output needs {nbytes:,} bytes of tensor data but the file system holding "
                                    f"{folder} has {free:,} free: free space or write it elsewhere")


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
        if pid.isascii() and pid.isdigit() and not _alive(int(pid)):  # '²' is a digit int() refuses
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def recover_replaced(dst: Path) -> None:
    """Finish a replacement an earlier run left half done: put the old DST back if DST is missing
    (the crash came before the new output landed), else remove the old one (it landed)."""
    if not dst.parent.is_dir():
        return
    for old in sorted(dst.parent.glob(f".{dst.name}{REPLACED_MARK}*")):
        pid = old.name[len(f".{dst.name}{REPLACED_MARK}"):]
        if not (pid.isascii() and pid.isdigit()) or _alive(int(pid)):
            continue
        if not dst.exists() and not dst.is_symlink():
            os.replace(old, dst)
            fsync_path(dst.parent)
        else:
            _remove(old)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
        """Put the output in place; at every instant DST is the old or the new output, or (fallback
        only) the old one waits in its REPLACED_MARK sibling for ``recover_replaced``."""
        fsync_tree(self.path)
        dst, parent = self.dst, self.dst.parent
        if not (dst.exists() or dst.is_symlink()) or (self.path.is_file() and dst.is_file()):
            os.replace(self.path, dst)  # atomic: DST is the old file until it is the new one
            fsync_path(parent)
            return
        # only with --force, checked before writing
        if _exchange(self.path, dst):  # self.path now holds the old output
            fsync_path(parent)
            _remove(self.path)
            return
        aside = parent / f".{dst.name}{REPLACED_MARK}{os.getpid()}"
        os.replace(dst, aside)
        fsync_path(parent)
        try:
            os.replace(self.path, dst)
        except BaseException:
            os.replace(aside, dst)
            raise
        fsync_path(parent)
        _remove(aside)

    def abort(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)
