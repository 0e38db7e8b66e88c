"""Issue 11, files and shard sets: every file a checkpoint folder names is a regular file inside that folder
(a hub cache's blob links excepted), every safetensors header and index is bounded and validated before it
drives anything, and a Meta shard set is numbered in ASCII digits with no shard a copy of another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptcheck.cli import main

from .writers import FIXTURES

# A guard so that a regression fails instead of hanging the suite; a pass takes about a second.
HANG_GUARD_S = 120
SHARDED = FIXTURES / "good" / "hf_sharded"
MP = FIXTURES / "good" / "meta_mp"
SECOND = {"sharded": "model-00002-of-00002.safetensors", "meta": "consolidated.01.pth"}
SOURCE = {"sharded": SHARDED, "meta": MP}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, as a user runs it: a hang or a runaway read ends at the guard."""
    return subprocess.run([sys.executable, "-m", "ckptcheck", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=cwd)


def _with_second_shard(tmp: Path, kind: str, make) -> Path:
    """A copy of a good shard set whose second shard is replaced by ``make(path)``."""
    folder = Path(shutil.copytree(SOURCE[kind], tmp / kind))
    (folder / SECOND[kind]).unlink()
    make(folder / SECOND[kind])
    return folder


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind", SECOND)
def test_fifo_shard_is_refused_not_waited_on(tmp_path: Path, kind: str) -> None:
    folder = _with_second_shard(tmp_path, kind, os.mkfifo)
    proc = _cli("check", str(folder), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{SECOND[kind]}: is a FIFO, not a regular file: refused" in _one_line(proc)


@pytest.mark.parametrize("kind", SECOND)
def test_shard_linked_to_dev_zero_is_unsafe_not_read(tmp_path: Path, kind: str) -> None:
    folder = _with_second_shard(tmp_path, kind, lambda p: p.symlink_to("/dev/zero"))
    proc = _cli("check", str(folder), "-v", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"{SECOND[kind]}: leads to /dev/zero, outside the checkpoint folder {folder.resolve()}: refused" in proc.stdout


@pytest.mark.parametrize("kind", SECOND)
def test_shard_linked_outside_the_folder_is_unsafe(tmp_path: Path, kind: str) -> None:
    """The linked file is the real shard, valid in every byte: only where it lives is wrong."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(SOURCE[kind] / SECOND[kind], elsewhere / SECOND[kind])
    folder = _with_second_shard(tmp_path, kind, lambda p: p.symlink_to(f"../elsewhere/{SECOND[kind]}"))
    assert main(["check", str(folder), "-v"]) == 1
    line = f"leads to {(elsewhere / SECOND[kind]).resolve()}, outside the checkpoint folder"
    assert main(["inspect", str(folder)]) == 1
    proc = _cli("check", str(folder), "-v", cwd=tmp_path)
    assert proc.returncode == 1 and line in proc.stdout and "UNSAFE safety" in proc.stdout


def _hub_cache(tmp: Path, source: Path, subfolder: str = "") -> Path:
    """A Hugging Face hub cache as huggingface_hub lays it out: every file of a snapshot a relative symlink
    into the repo's blobs folder."""
    repo = tmp / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd" / subfolder
    snapshot.mkdir(parents=True)
    depth = "../" * (2 + len(Path(subfolder).parts))
    for i, f in enumerate(sorted(source.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"{depth}blobs/blob{i}")
    return snapshot


@pytest.mark.parametrize("kind", SECOND)
@pytest.mark.parametrize("subfolder", ["", "original"])
def test_hub_cache_snapshot_links_into_its_blobs_are_read(tmp_path: Path, kind: str, subfolder: str) -> None:
    snapshot = _hub_cache(tmp_path, SOURCE[kind], subfolder)
    assert main(["check", str(snapshot)]) == 0


def test_hub_cache_link_into_another_repos_blobs_is_unsafe(tmp_path: Path) -> None:
    snapshot = _hub_cache(tmp_path, SHARDED)
    other = tmp_path / "hub" / "models--other--repo" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(SHARDED / SECOND["sharded"], other / "x")
    (snapshot / SECOND["sharded"]).unlink()
    (snapshot / SECOND["sharded"]).symlink_to("../../../models--other--repo/blobs/x")
    assert main(["check", str(snapshot)]) == 1
