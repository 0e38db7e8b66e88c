"""Bytes torch.load would unpickle are scanned, and bytes the scan cannot follow are never handed to the
unpickler.  Old code recognised a pickle by a fixed set of first opcodes and by ``pickletools.genops``
parsing its head, so a pickle opening with FRAME or SHORT_BINBYTES, or holding ``I0x10`` (the C unpickler
reads INT and LONG with base 0, genops with base 10 and raises), was "unrecognised data" while
torch.load(weights_only=False) ran its payload; and the pre-load expansion scan gave up silently on the same
``I0x10``, so a tuple DAG used as a dict key hung the load again.  Each case runs the real CLI in a process
whose address space is capped, with a sentinel file for every payload."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .hostile import GOOD, LEGACY_INFO, LEGACY_MAGIC, LEGACY_PROTOCOL, LINGUA, legacy, torch_zip

ADDRESS_SPACE = 2 << 30
HANG_GUARD_S = 300  # only so that a regression fails instead of hanging the suite
_TUPLE_DAG = b"K\x01\x85" + b"2\x86" * 60  # (t, t) sixty times: hashing it as a dict key never ends


def _system(sentinel: Path) -> bytes:
    """``os.system("touch SENTINEL")`` as protocol 0/1 opcodes, ending in STOP."""
    command = f"touch {sentinel}".encode()
    return b"cos\nsystem\n(X" + len(command).to_bytes(4, "little") + command + b"tR."


def _frame(body: bytes) -> bytes:
    return b"\x95" + len(body).to_bytes(8, "little") + body


BARE = {  # first bytes old code did not take for a pickle
    "frame_first": lambda s: _frame(_system(s)),
    "short_binbytes_first": lambda s: b"C\x01a0" + _system(s),
    "hex_int_after_proto": lambda s: b"\x80\x02I0x10\n0" + _system(s),
    "hex_long_after_proto": lambda s: b"\x80\x02L0x10L\n0" + _system(s),
    "empty_tuple_first": lambda s: b")0" + _system(s),
}


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptcheck", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=tmp,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE)))


def _torch_unpickles(path: Path) -> bool:
    """torch.load's own test for a zip archive: what fails it goes to the legacy loader, which unpickles."""
    with open(path, "rb") as f:
        return not torch.serialization._is_zipfile(f)


@pytest.mark.parametrize("case", BARE)
def test_a_bare_pickle_torch_would_run_is_unsafe(tmp_path: Path, case: str) -> None:
    sentinel = tmp_path / "SENT"
    path = tmp_path / "model.pt"
    path.write_bytes(BARE[case](sentinel))
    assert _torch_unpickles(path)
    proc = _run(tmp_path, "check", str(path), "--model-config", str(LINGUA))
    assert not sentinel.exists(), "a payload ran"
    assert proc.returncode == 1 and "UNSAFE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_frame_in_front_of_a_torch_archive_is_unsafe(tmp_path: Path) -> None:
    """torch checks only the first four bytes for a zip: a pickle prefixed to a good archive is run."""
    sentinel = tmp_path / "SENT"
    path = tmp_path / "consolidated.pth"
    path.write_bytes(_frame(_system(sentinel)) + (GOOD / "consolidated.pth").read_bytes())
    assert _torch_unpickles(path)
    proc = _run(tmp_path, "check", str(path), "--model-config", str(LINGUA))
    assert not sentinel.exists(), "a payload ran"
    assert proc.returncode == 1 and "UNSAFE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


DAGS = {
    "hex_int_in_a_torch_zip": lambda t: torch_zip(t, b"\x80\x02I0x10\n0}" + _TUPLE_DAG + b"K\x01s."),
    "hex_long_in_a_torch_zip": lambda t: torch_zip(t, b"\x80\x02L0x10L\n0}" + _TUPLE_DAG + b"K\x01s."),
    "hex_int_in_a_legacy_file": lambda t: legacy(t, [LEGACY_MAGIC, LEGACY_PROTOCOL, LEGACY_INFO,
                                                     b"\x80\x02I0x10\n0}" + _TUPLE_DAG + b"K\x01s."]),
}


@pytest.mark.parametrize("command", ["check", "inspect"])
@pytest.mark.parametrize("case", DAGS)
def test_opcodes_the_scan_cannot_follow_are_never_loaded(tmp_path: Path, case: str, command: str) -> None:
    path = DAGS[case](tmp_path)
    extra = ["--model-config", str(LINGUA)] if command == "check" else []
    proc = _run(tmp_path, command, str(path), *extra)
    assert proc.returncode == 1 and "cannot be proven free of code" in proc.stdout + proc.stderr, (
        proc.stdout[-2000:] + proc.stderr[-2000:])


def test_a_truncated_pickle_is_still_malformed_not_unsafe(tmp_path: Path) -> None:
    """Where the data ends both readers stop at the same byte: bad input, exit 2, not a payload."""
    path = torch_zip(tmp_path, b"\x80\x02}X\x10\x00\x00\x00ab")
    proc = _run(tmp_path, "check", str(path), "--model-config", str(LINGUA))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "malformed pickle" in lines[0], proc.stderr[-2000:]


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
@pytest.mark.parametrize("how", ["check", "inspect", "convert_symlink"])
def test_a_file_that_fails_to_read_is_one_line(tmp_path: Path, how: str) -> None:
    """/proc/self/mem is a regular file whose read() fails with EIO."""
    if how == "convert_symlink":
        link = tmp_path / "model.pth"
        link.symlink_to("/proc/self/mem")
        proc = _run(tmp_path, "convert", str(link), str(tmp_path / "out.safetensors"), "--model-config", str(LINGUA))
    else:
        proc = _run(tmp_path, how, "/proc/self/mem")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot be read" in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("text", [b"Some notes about the run\n", b"Nope\n", b"(unfinished"])
def test_text_whose_first_letter_is_an_opcode_is_not_a_checkpoint(tmp_path: Path, text: bytes) -> None:
    """The unpickler fails on these bytes before any global: bad input (exit 2), not unsafe."""
    path = tmp_path / "notes.pt"
    path.write_bytes(text)
    proc = _run(tmp_path, "check", str(path), "--model-config", str(LINGUA))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "not a checkpoint" in lines[0], proc.stderr[-2000:]


def test_a_payload_behind_an_image_signature_is_unsafe(tmp_path: Path) -> None:
    """"GIF8" starts with BINFLOAT: torch.load reads the signature as a float and runs what follows."""
    sentinel = tmp_path / "SENT"
    path = tmp_path / "model.pt"
    path.write_bytes(b"GIF89a\x01\x00\x01" + _system(sentinel))
    assert _torch_unpickles(path)
    proc = _run(tmp_path, "check", str(path), "--model-config", str(LINGUA))
    assert not sentinel.exists(), "a payload ran"
    assert proc.returncode == 1 and "UNSAFE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_pickle_with_a_brace_at_byte_8_is_not_taken_for_safetensors(tmp_path: Path) -> None:
    """A '{' at byte 8 made any file "safetensors"; its header length (the first 8 bytes, here far larger
    than the file) rules that out, and torch.load would unpickle it."""
    sentinel = tmp_path / "SENT"
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02X\x04\x00\x00\x00a{cd0" + _system(sentinel))
    assert path.read_bytes()[8:9] == b"{"
    assert _torch_unpickles(path)
    proc = _run(tmp_path, "check", str(path), "--model-config", str(LINGUA))
    assert not sentinel.exists(), "a payload ran"
    assert proc.returncode == 1 and "UNSAFE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_path_too_long_to_look_at_is_one_line(tmp_path: Path) -> None:
    """stat() itself fails (ENAMETOOLONG): the path is bad input, not an internal error."""
    proc = _run(tmp_path, "check", "a" * 5000)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "too long" in lines[0], proc.stderr[-300:]
