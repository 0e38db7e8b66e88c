"""Structure-aware fuzzing (issue 11): mostly-valid checkpoints of every format with one structural mutation
each (tests/fuzzing/strategies.py), run through the CLI in a worker process with time and memory limits and
judged against the contract (tests/fuzzing/harness.py): exit 0, 1 or 2 with one line, never 3 or a traceback,
no hang, memory under twice the input plus a baseline, and no exit 0 where torch or safetensors refuses the
input or where the mutation made it wrong by construction.

CI runs a small derandomized budget; ``make fuzz`` a large one (CKPTCHECK_FUZZ_STRUCTURED_EXAMPLES per
format) and prints the campaign's totals.  Every example runs even after a break: the failure lists each
broken class once with its first reproducer saved under build/fuzz/ (CKPTCHECK_FUZZ_OUT)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

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
