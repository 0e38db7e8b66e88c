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
