"""The pytest door: ``pytest --ckpt PATH --model-config PATH`` collects one item per check.

This module is what the ``pytest11`` entry point loads for every pytest run, so it imports nothing
heavy: without ``--ckpt`` it only registers options.  With ``--ckpt`` the engine is imported, the
checkpoint's metadata is read at collection (each xdist worker does the same, deterministically), and
each item runs its check when pytest runs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .options import PYTEST_OPTIONS, add_options, add_pytest_aliases, engine_options, plugin_dest

RESULT_PROPERTY = "ckptcheck_result"
_ALIASES_KEY = pytest.StashKey[list[str]]()  # short spellings a project's own option holds


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ckptcheck", "checkpoint checks (ckptcheck)")
    add_options(group.addoption, pytest=True, options=PYTEST_OPTIONS)


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> Any:
    """Add ``--ckpt``, ``--model-config`` and ``--model-factory`` after the project's conftests, and only
    where they left them free: pytest loads plugins before conftests, and a conftest that defines one of
    them must still start (its option wins; ``--ckpt-path``, ``--ckpt-model-config`` always work)."""
    _keep_alias_values_out_of_test_paths(early_config, args)
    result = yield
    early_config.stash[_ALIASES_KEY] = add_pytest_aliases(parser.getgroup("ckptcheck").addoption,
                                                          _registered_names(parser))
    return result


def _registered_names(parser: pytest.Parser) -> set[str] | None:
    """Every option string registered so far; None where this pytest's parser does not tell (pytest has no
    public API for it): then no alias is added, rather than one that could stop another project's pytest."""
    try:
        groups = {id(g): g for g in (parser._anonymous, *parser._groups)}.values()
        return {name for group in groups for option in group.options for name in option.names()}
    except AttributeError:
        return None


def _keep_alias_values_out_of_test_paths(early_config: pytest.Config, args: list[str]) -> None:
    """Not yet registered, ``--ckpt X`` reads to pytest's first parse as an unknown flag and a test path X:
    pytest would then import conftest.py files from the checkpoint's folder.  Take the values back out."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    aliases = [opt for opt in PYTEST_OPTIONS if opt.pytest_alias]
    for opt in aliases:
        pre.add_argument(opt.pytest_alias, dest=opt.dest, action="append", default=[])
    known, _ = pre.parse_known_args([str(a) for a in args])
    paths = early_config.known_args_namespace.file_or_dir
    for opt in aliases:
        for value in getattr(known, opt.dest):
            if value in paths:
                paths.remove(value)


def option_getter(config: pytest.Config) -> Callable[[str], Any]:
    """Read ckptcheck's options by their names in options.py (pytest keeps them under its own dests)."""
    return lambda name: config.getoption(plugin_dest(name), None)


def pytest_configure(config: pytest.Config) -> None:
    if option_getter(config)("ckpt"):
        config.pluginmanager.register(CheckpointSession(config), "ckptcheck-session")


class CheckpointSession:
    """Registered only when ``--ckpt`` is given: adds the checkpoint collector to the session."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        # Results by check id, from this process's items or, under xdist, from every worker's reports.
        self.results: dict[str, Any] = {}
        self.matrix: Any = None  # --ckpt-matrix: matrix.MatrixRow per framework target
        self.written: Any = None  # --ckpt-report: the path written

    @property
    def is_controller(self) -> bool:
        return not hasattr(self.config, "workerinput")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == RESULT_PROPERTY:
                from .checks.model import CheckResult

                result = CheckResult.from_json(json.loads(value))
                self.results[result.id] = result

    def _report_data(self) -> Any:
        from .engine import plan, summarize
        from .report.document import ReportData, sort_results

        get = option_getter(self.config)
        options = engine_options(get)
        the_plan = plan(get("ckpt"), get("model_config"), options)  # metadata only: the header's facts
        the_plan.close()
        results = sort_results(list(self.results.values()))
        return ReportData(the_plan.checkpoint_info, the_plan.config_info, options.target, results,
                          summarize(results), self.matrix)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not (self.is_controller and self.results):
            return
        get = option_getter(self.config)
        if get("matrix"):  # shown in the summary, and in the report when one is asked for
            from .matrix import compatibility_matrix

            self.matrix = compatibility_matrix(get("ckpt"), get("model_config"), engine_options(get))
        if get("report"):
            from .report.document import write

            self.written = write(self._report_data(), get("report"))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results or not self.is_controller:
            return
        from .engine import summarize
        from .report.document import ReportData, sort_results
        from .report.text import category_table

        results = sort_results(list(self.results.values()))
        terminalreporter.section("ckptcheck")
        terminalreporter.write_line(category_table(summarize(results)["by_category"]))
        data = ReportData({}, {}, "", results, {})
        for command in data.repairs:
            terminalreporter.write_line(f"repair: {command}")
        if data.repairs and data.blocking:
            terminalreporter.write_line(f"(ckptcheck repair refuses while these fail: {', '.join(data.blocking)})")
        if self.matrix is not None:
            from .matrix import render_text

            terminalreporter.write_line("compatibility matrix")
            terminalreporter.write_line(render_text(self.matrix).rstrip("\n"))
        if self.written:
            terminalreporter.write_line(f"report: {self.written}")

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        from .engine import resolve_config_path

        get = option_getter(config)
        ckpt, given = get("ckpt"), get("model_config")
        cfg = resolve_config_path(ckpt, given)
        found = " (found beside the checkpoint)" if given is None and cfg is not None else ""
        factory = get("model_factory")
        lines = [f"ckptcheck: checkpoint {ckpt}", f"ckptcheck: config {cfg}{found}"]
        if factory:
            lines.append(f"ckptcheck: model factory {factory}")
        for alias in config.stash.get(_ALIASES_KEY, []):
            opt = next(o for o in PYTEST_OPTIONS if o.pytest_alias == alias)
            lines.append(f"ckptcheck: {alias} is this project's own option; ckptcheck reads {opt.pytest}")
        return lines

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Any:
        report = yield
        if isinstance(collector, pytest.Session) and report.passed:
            # With --ckpt and no test paths on the command line, the checkpoint is the whole run; explicit
            # paths are collected as well.
            explicit = self.config.args_source == pytest.Config.ArgsSource.ARGS
            name = str(option_getter(self.config)("ckpt"))
            ckpt = CheckpointCollector.from_parent(collector, name=name, nodeid=name)
            report.result = [*(report.result if explicit else []), ckpt]
        return report


class CheckError(Exception):
    """A check that could not run (unreadable tensor data): reported as its one line."""


class CheckFailed(Exception):
    def __init__(self, result: Any) -> None:
        super().__init__(result.message)
        self.result = result


class CheckpointCollector(pytest.Collector):
    def collect(self) -> Iterator[pytest.Item]:
        from .engine import plan
        from .errors import CkptError

        get = option_getter(self.config)
        try:
            the_plan = plan(get("ckpt"), get("model_config"), engine_options(get))
        except CkptError as exc:
            raise self.CollectError(f"ckptcheck: {exc.line()}") from None
        self.config.add_cleanup(the_plan.close)
        for check in the_plan.checks:
            yield CheckItem.from_parent(self, name=f"test_{check.category}[{check.key}]", check=check)


class CheckItem(pytest.Item):
    def __init__(self, *, check: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check

    def runtest(self) -> None:
        from .checks.model import Status
        from .errors import CkptError

        try:
            result = self.check.run()
        except CkptError as exc:
            from .checks.model import CheckResult, Status

            failed = CheckResult(self.check.id, self.check.category, self.check.key, Status.FAIL, None, None,
                                 exc.line(), "", None)
            self.user_properties.append((RESULT_PROPERTY, json.dumps(failed.to_json())))
            raise CheckError(exc.line()) from None
        self.user_properties.append((RESULT_PROPERTY, json.dumps(result.to_json())))
        if result.status is Status.SKIP:
            pytest.skip(result.message)
        if result.status in (Status.FAIL, Status.UNSAFE):
            raise CheckFailed(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CheckFailed):
            from .report.text import failure_lines

            r = excinfo.value.result
            head = "UNSAFE: " if r.status.value == "unsafe" else ""
            return "\n".join([head + r.message, *failure_lines(r)[1:]])
        if isinstance(excinfo.value, CheckError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path | str, int | None, str]:
        return self.path, None, self.name

