"""An explicit request is never dropped silently: ``--roundtrip`` runs for every target, whether or not its
suite lists the round trip, and requests that contradict each other fail the run with one line."""

from __future__ import annotations

import pytest

from ckptcheck.cli import main
from ckptcheck.engine import Options, plan
from ckptcheck.suite import available

from .writers import FIXTURES

DCP = str(FIXTURES / "good" / "dcp")


@pytest.mark.parametrize("target", available())
def test_roundtrip_is_planned_for_every_target(target: str) -> None:
    the_plan = plan(DCP, None, Options(target=target, roundtrip="1,2", reshard="2"))
    try:
        trips = [c.key for c in the_plan.checks if c.category == "fsdp_roundtrip"]
    finally:
        the_plan.close()
    assert trips == ["world_size=1->2", "world_size=2"]


def test_no_roundtrip_unless_asked() -> None:
    the_plan = plan(DCP, None, Options(target="init"))
    the_plan.close()
    assert all(c.category != "fsdp_roundtrip" for c in the_plan.checks)


def test_roundtrip_with_metadata_only_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", DCP, "--roundtrip", "1", "--metadata-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--roundtrip" in err and "--metadata-only" in err


def test_plugin_refuses_roundtrip_with_metadata_only(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", DCP, "--ckpt-roundtrip", "1", "--ckpt-metadata-only")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*ckptcheck: --roundtrip: *cannot run with --metadata-only*"])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.slow
def test_lingua_init_runs_the_requested_roundtrip(pytester: pytest.Pytester) -> None:
    """The seed's own flow: is this DCP loadable by lingua's FSDP model?  It used to run no round trip, green."""
    result = pytester.runpytest("--ckpt", DCP, "--ckpt-target", "lingua_init", "--ckpt-roundtrip", "1",
                                "-k", "roundtrip", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*::test_fsdp_roundtrip?world_size=1? PASSED*"])


def test_plugin_matrix_without_a_report_is_shown(pytester: pytest.Pytester) -> None:
    """``--ckpt-matrix`` alone used to compute nothing: the matrix only went into a ``--ckpt-report``."""
    result = pytester.runpytest("--ckpt", DCP, "--ckpt-matrix", "-k", "naming")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["compatibility matrix", "target *naming*", "lingua_init    ok  lingua: *",
                                 "torchtitan     FAIL  *", "*repair: ckptcheck repair * --target torchtitan *"])


@pytest.mark.slow
def test_lingua_resume_trips_the_optimizer_state() -> None:
    """Every resume target, not only the one named ``resume``, sends AdamW state through the round trip."""
    the_plan = plan(DCP, None, Options(target="lingua_resume", roundtrip="1"))
    try:
        (trip,) = [c for c in the_plan.checks if c.category == "fsdp_roundtrip"]
        params = sum(c.category == "key_present" for c in the_plan.checks)
        result = trip.run()
    finally:
        the_plan.close()
    assert result.status.value == "pass", result.message
    # each parameter, then its step, exp_avg and exp_avg_sq (the model alone: one shard per parameter)
    assert f" {4 * params} shards compared" in result.message, result.message


def test_matrix_rows_do_not_rerun_the_roundtrip() -> None:
    """The matrix asks which frameworks load this layout; the round trip belongs to the run's own target."""
    from ckptcheck.matrix import compatibility_matrix

    rows = compatibility_matrix(DCP, None, Options(target="init", roundtrip="1,2", reshard="2"))
    assert rows and all("fsdp_roundtrip" not in row.cells for row in rows)
