"""Fuzzing: random bit flips, truncations and splices of every fixture format.  Every outcome must be a
list of check results (pass, fail, skip, unsafe) or one clean ckptcheck error - never another exception,
never a hang.  CI runs a small budget; `make fuzz` a large one (CKPTCHECK_FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptcheck.engine import Options, plan, run
from ckptcheck.errors import CkptError

from .writers import CONFIGS, FIXTURES

EXAMPLES = int(os.environ.get("CKPTCHECK_FUZZ_EXAMPLES", "12"))
SECONDS_PER_EXAMPLE = 20
# (what to copy, the file in it to mutate)
TARGETS = {
    "torch_zip": ("good/consolidated.pth", None),
    "lingua_nested": ("good/lingua_consolidated", "consolidated.pth"),
    "safetensors": ("good/model.safetensors", None),
    "legacy": ("old/legacy.pt", None),
    "dcp_metadata": ("good/dcp", ".metadata"),
    "dcp_data": ("good/dcp", "__0_0.distcp"),
    "index": ("good/hf_sharded", "model.safetensors.index.json"),
    "meta_shard": ("good/meta_mp", "consolidated.01.pth"),
}


def mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, where, payload in ops:
        if not buf:
            break
        pos = where % len(buf)
        if kind == "flip":
            buf[pos] ^= payload[0] or 1
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "splice":
            buf[pos:pos + len(payload)] = payload
        elif kind == "insert":
            buf[pos:pos] = payload
    return bytes(buf)


OPS = st.lists(st.tuples(st.sampled_from(["flip", "flip", "flip", "truncate", "splice", "insert"]),
                         st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)), min_size=1, max_size=6)


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Hang(f"no outcome within {SECONDS_PER_EXAMPLE} s")


@pytest.mark.parametrize("target", list(TARGETS))
def test_mutations_end_cleanly(target: str) -> None:
    source, inner = TARGETS[target]

    # CI's small budget is derandomized (the same examples every run); make fuzz explores anew each time.
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 50, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ops=OPS, metadata_only=st.booleans())
    def check(ops: list[tuple[str, int, bytes]], metadata_only: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            src = FIXTURES / source
            copy = Path(tmp) / src.name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, copy)
            victim = copy / inner if inner else copy
            victim.write_bytes(mutate(victim.read_bytes(), ops))
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(SECONDS_PER_EXAMPLE)
            try:
                the_plan = plan(copy, CONFIGS / "lingua_params.json", Options(metadata_only=metadata_only))
                try:
                    results = run(the_plan)
                finally:
                    the_plan.close()
                assert all(r.status.value in ("pass", "fail", "skip", "unsafe") for r in results)
            except CkptError as exc:
                assert exc.line() and "\n" not in exc.line()
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)

    check()


# --- the opcode scanner against the real unpickler ------------------------------------------------------------

def _s(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


# Strings a payload needs and decoys the allowlist holds, with the opcodes that move them around the stack
# and memo (MARK, POP, POP_MARK, DUP, MEMOIZE, BINGET) and STACK_GLOBAL, which consumes two (protocol 4).
_PIECES = [_s(t) for t in ("posix", "system", "collections", "OrderedDict")] + [
    b"(", b"0", b"1", b"2", b"\x94", b"h\x00", b"h\x01", b"\x93",
]


def _globals_the_real_unpickler_resolves(data: bytes) -> list[tuple[str, str]]:
    import io
    import pickle

    seen: list[tuple[str, str]] = []

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            seen.append((module, name))
            return object

    try:
        Recording(io.BytesIO(data)).load()
    except Exception:
        pass
    return seen


@settings(max_examples=max(EXAMPLES * 200, 2000), deadline=None, derandomize=True, database=None)
@given(program=st.lists(st.sampled_from(_PIECES), max_size=10))
def test_scanner_sees_every_global_the_unpickler_resolves(program: list[bytes]) -> None:
    """Whatever string, memo and stack tricks a pickle plays, a global the real unpickler would
    import that is neither allowlisted nor inert data is reported as unsafe by the scanner that never loads it."""
    from ckptcheck.errors import UnsafeInputError
    from ckptcheck.formats.torch_pickle import TORCH_ALLOWLIST
    from ckptcheck.safe_pickle import is_inert_data, scan_globals

    data = b"\x80\x04" + b"".join(program) + b"."
    resolved = _globals_the_real_unpickler_resolves(data)
    dangerous = [g for g in resolved if g not in TORCH_ALLOWLIST and not is_inert_data(*g)]
    try:
        scan_globals(data, path="fuzz", member="pickle", allowed=TORCH_ALLOWLIST)
    except UnsafeInputError:
        return
    assert not dangerous, (data, dangerous)
