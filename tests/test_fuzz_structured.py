"""Structure-aware fuzzing (issue 11): mostly-valid checkpoints of every format with one structural mutation
each (tests/fuzzing/strategies.py), run through the CLI in a worker process with time and memory limits and
judged against the contract (tests/fuzzing/harness.py): exit 0, 1 or 2 with one line, never 3 or a traceback,
no hang, memory under twice the input plus a baseline, and no exit 0 where ``check`` passes a file torch or
safetensors refuses, or where the command read data the mutation made wrong by construction.  The commands:
check (also --metadata-only and --target resume), convert, diff, inspect and repair, on every family.

CI runs a small derandomized budget; ``make fuzz`` a large one (CKPTCHECK_FUZZ_STRUCTURED_EXAMPLES per
format) and prints the campaign's totals.  Every example runs even after a break: the failure lists each
broken class once with its first reproducer saved under build/fuzz/ (CKPTCHECK_FUZZ_OUT)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzzing.harness import Harness, Stats, save_reproducer
from .fuzzing.strategies import FAMILIES, Case

EXAMPLES = int(os.environ.get("CKPTCHECK_FUZZ_STRUCTURED_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_structured_mutations_keep_the_contract(family: str, harness: Harness) -> None:
    stats = Stats(family)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=FAMILIES[family])
    def explore(case: Case) -> None:
        outcome = harness.check(case)
        new_class = stats.add(case, outcome)
        if new_class:
            stats.breaks[new_class] = str(save_reproducer(case, outcome))

    explore()
    stats.write()
    assert not stats.breaks, "\n".join(f"{cls}  ->  {where}" for cls, where in sorted(stats.breaks.items()))


# --- the harness itself: it must be able to see each kind of break ---------------------------------------

_CASE = Case("torch", "m", "d", (("x.pth", b"0" * 1000),), ("check", "{case}/x.pth"))


@pytest.mark.parametrize(("rc", "stderr", "memory", "case", "symptom"), [
    (3, "ckptcheck: internal error: RecursionError: deep (rerun with --debug)\n", 0, _CASE, "exit 3 (RecursionError)"),
    ("hang", "", 0, _CASE, "no outcome within"),
    ("slow", "", 0, _CASE, "over 20 s of CPU"),
    ("crash", "", 0, _CASE, "the worker died"),
    (2, "Traceback (most recent call last):\nckptcheck: error: x: y: z\n", 0, _CASE, "traceback on stderr"),
    (2, "ckptcheck: error: x: y: z\nframe #0: c10::Error\n", 0, _CASE, "traceback on stderr"),
    (2, "", 0, _CASE, "exit 2 without exactly one error line"),
    (1, "", 600 << 20, _CASE, "memory over 2x input + baseline"),
    (0, "", 0, Case("dcp", "m", "d", (), (), (), "a flipped byte"), "exit 0 on input wrong by construction"),
    (2, "ckptcheck: using the config found beside the checkpoint: c\nckptcheck: error: x: y: z\n", 10 << 20, _CASE,
     ""),
    (0, "", 0, _CASE, ""),
])
def test_each_contract_break_has_a_symptom(rc, stderr, memory, case, symptom) -> None:
    from .fuzzing.harness import symptom_of

    found = symptom_of(rc, stderr, memory, case)
    assert found.startswith(symptom) if symptom else found == ""


def test_a_hung_worker_is_killed_and_the_next_case_still_runs(tmp_path) -> None:
    """The worker blocks forever opening its stdout file when that is a FIFO nobody reads: the harness must end
    it from outside and start a fresh one for the next job."""
    from .fuzzing.harness import Worker
    from .writers import CONFIGS, FIXTURES

    worker = Worker("run")
    try:
        hung = tmp_path / "hung"
        hung.mkdir()
        os.mkfifo(hung / "stdout")
        assert worker.ask({"folder": str(hung), "argv": ["check", "x"]}, timeout=3.0) is None
        assert worker.failure == "hang"
        fine = tmp_path / "fine"
        fine.mkdir()
        argv = ["check", str(FIXTURES / "good/consolidated.pth"), "--model-config", str(CONFIGS / "lingua_params.json")]
        answer = worker.ask({"folder": str(fine), "argv": argv}, 120.0)
        assert answer is not None and answer["rc"] == 0
    finally:
        worker.close()


def test_the_oracle_refuses_what_torch_refuses(tmp_path) -> None:
    from .fuzzing import bases
    from .fuzzing.harness import Worker

    archive = bases.read_zip(bases.fixture("good/consolidated.pth"))
    records = [(n, b"middle" if n.endswith("/byteorder") else d) for n, d in archive.records]
    (tmp_path / "bad.pth").write_bytes(bases.write_zip(records))
    (tmp_path / "good.pth").write_bytes(bases.fixture("good/consolidated.pth"))
    oracle = Worker("oracle")
    try:
        refused = oracle.ask({"kind": "torch", "path": str(tmp_path / "bad.pth")}, 120.0)
        accepted = oracle.ask({"kind": "torch", "path": str(tmp_path / "good.pth")}, 120.0)
    finally:
        oracle.close()
    assert refused is not None and refused["refused"]
    assert accepted == {"refused": ""}


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(case=st.one_of(*FAMILIES.values()))
def test_each_oracle_judges_only_what_the_command_reads_and_decides(case: Case) -> None:
    """The loader oracle is a verdict on check's exit 0 only; a flipped optimizer byte is no verdict on a
    command that leaves the optimizer state behind (convert --weights-only)."""
    if case.oracle:
        assert case.argv[0] == "check" and "--metadata-only" not in case.argv
    if case.mutation == "data.flip" and "optim." in case.detail:
        assert bool(case.must_refuse) == ("--weights-only" not in case.argv)
