"""Converters lose nothing: the input is untouched, the output appears whole or not at all."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main
from ckptcheck.convert import api
from ckptcheck.convert.api import convert
from ckptcheck.errors import InputError

from .writers import CONFIGS, FIXTURES

GOOD = FIXTURES / "good"


def _fingerprint(path: Path) -> dict[str, tuple[str, int]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


@pytest.mark.parametrize("src", ["consolidated.pth", "dcp", "meta_mp", "hf_sharded", "lingua_consolidated"])
@pytest.mark.parametrize("to", ["torch", "dcp", "hf"])
def test_input_bytes_and_mtime_unchanged(src: str, to: str, tmp_path: Path) -> None:
    before = _fingerprint(GOOD / src)
    held = to == "dcp" or (to == "torch" and src != "dcp")  # where the output can hold the training state
    convert(GOOD / src, tmp_path / "out", to=to, config=CONFIGS / "lingua_params.json", head_dim=8,
            weights_only=not held)
    assert _fingerprint(GOOD / src) == before


def test_existing_destination_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"precious")
    args = ["convert", str(GOOD / "consolidated.pth"), str(dst)]
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert dst.read_bytes() == b"precious"
    assert main([*args, "--force"]) == 0
    assert torch.load(dst, weights_only=True)


def test_existing_folder_is_replaced_only_with_force(tmp_path: Path) -> None:
    dst = tmp_path / "dcp"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        convert(GOOD / "consolidated.pth", dst, to="dcp")
    convert(GOOD / "consolidated.pth", dst, to="dcp", force=True)
    assert not (dst / "keep").exists() and (dst / ".metadata").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporaries left behind"


@pytest.mark.parametrize("dst", ["same", "inside"])
def test_source_and_destination_must_not_overlap(dst: str, tmp_path: Path) -> None:
    src = tmp_path / "dcp"
    convert(GOOD / "consolidated.pth", src, to="dcp")
    target = src if dst == "same" else src / "nested.pth"
    with pytest.raises(InputError, match="overlaps"):
        convert(src, target, to="torch", force=True)


def test_failure_mid_write_leaves_no_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = api.ChunkSource.read
    calls = {"n": 0}

    def failing_read(self, move, start, stop):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return original(self, move, start, stop)

    monkeypatch.setattr(api.ChunkSource, "read", failing_read)
    with pytest.raises(InputError, match="cannot write the output: No space left on device"):
        convert(GOOD / "consolidated.pth", tmp_path / "out.pth")
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptcheck.convert import writers

    real = writers.as_bytes

    def corrupt(t):  # flip the first byte of every chunk written
        data = bytearray(real(t))
        if data:
            data[0] ^= 0xFF
        return memoryview(bytes(data))

    monkeypatch.setattr(writers, "as_bytes", corrupt)
    with pytest.raises(Exception, match="differ from the input"):
        convert(GOOD / "consolidated.pth", tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_conversion_leaves_no_destination(tmp_path: Path) -> None:
    src = tmp_path / "big.pth"
    torch.save({f"w{i}": torch.randn(2048, 2048) for i in range(24)}, src)  # ~400 MB
    dst = tmp_path / "out" / "big.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "ckptcheck.cli", "convert", str(src), str(dst)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    temp = None
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list((tmp_path / "out").glob(".big.safetensors.ckptcheck-tmp-*")) if (tmp_path / "out").exists() else []
        if temps and temps[0].stat().st_size > 50e6:
            temp = temps[0]
            break
        time.sleep(0.005)
    assert temp is not None, "the conversion finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    # A later run clears the dead writer's temporary and succeeds.
    convert(src, dst)
    assert dst.is_file() and not temp.exists()


def test_a_full_disk_quota_gives_one_clean_line(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: the write fails part-way, nothing is left behind."""
    import resource

    limit = 20_000  # the output is about 70 KB

    def small_quota() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    dst = tmp_path / "out" / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "ckptcheck.cli", "convert", str(GOOD / "consolidated.pth"), str(dst)],
                          capture_output=True, text=True, timeout=120, preexec_fn=small_quota,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"ckptcheck: error: {dst}: cannot write the output: File too large"
    assert list((tmp_path / "out").iterdir()) == []


# A child process that replaces DST with --force and SIGKILLs itself at the dangerous point: with
# the atomic exchange, right after the swap; without it (the fallback), after the old DST was moved
# aside and before the new one is renamed into place.
_CRASHING_REPLACE = """
import os, signal, sys
from pathlib import Path
from ckptcheck.convert import atomic
from ckptcheck.convert.api import convert

src, dst, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
real_replace = os.replace

def kill(*args):
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "fallback":
    atomic._exchange = lambda a, b: False
    def replace(a, b):
        if Path(b) == dst and not dst.exists():
            kill()
        real_replace(a, b)
    atomic.os.replace = replace
else:
    atomic._remove = kill
convert(src, dst, to="dcp", force=True)
"""


def _tag(folder: Path) -> str | None:
    return (folder / "tag").read_text() if (folder / "tag").is_file() else None


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_crash_while_replacing_loses_neither_old_nor_new(mode: str, tmp_path: Path) -> None:
    from ckptcheck.convert import atomic

    if mode == "exchange":
        probe_a, probe_b = tmp_path / "a", tmp_path / "b"
        probe_a.mkdir()
        probe_b.mkdir()
        if not atomic._exchange(probe_a, probe_b):
            pytest.skip("this kernel or filesystem has no renameat2(RENAME_EXCHANGE)")
    dst = tmp_path / "out"
    convert(GOOD / "consolidated.pth", dst, to="dcp")
    (dst / "tag").write_text("old")
    proc = subprocess.run([sys.executable, "-c", _CRASHING_REPLACE, str(GOOD / "consolidated.pth"), str(dst), mode],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    survivors = [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    old = [p for p in survivors if _tag(p) == "old"]
    new = [p for p in survivors if p.is_dir() and (p / ".metadata").is_file() and _tag(p) is None]
    assert old or new, survivors
    if mode == "exchange":
        assert (dst / ".metadata").is_file() and _tag(dst) is None  # the new output is in place
    else:
        assert not dst.exists() and old and old[0].name.startswith(".out.ckptcheck-replaced-")
    # The next run puts the old DST back (or keeps the new one) before anything else: without --force
    # it is refused because DST exists again, and nothing is lost.
    with pytest.raises(InputError, match="already exists"):
        convert(GOOD / "consolidated.pth", dst, to="dcp")
    assert _tag(dst) == ("old" if mode == "fallback" else None)
    convert(GOOD / "consolidated.pth", dst, to="dcp", force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
