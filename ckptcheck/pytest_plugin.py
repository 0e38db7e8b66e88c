"""The pytest door: ``pytest --ckpt PATH --model-config PATH`` collects one item per check.

This module is what the ``pytest11`` entry point loads for every pytest run, so it imports nothing
heavy: without ``--ckpt`` it only registers options.  With ``--ckpt`` the engine is imported, the
checkpoint's metadata is read at collection (each xdist worker does the same, deterministically), and
each item runs its check when pytest runs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .options import CHECK_OPTIONS, MATRIX, REPORT, add_options, engine_options

RESULT_PROPERTY = "ckptcheck_result"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ckptcheck", "checkpoint checks (ckptcheck)")
    add_options(group.addoption, pytest=True, options=(*CHECK_OPTIONS, REPORT, MATRIX))


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("ckpt", None):
        config.pluginmanager.register(CheckpointSession(config), "ckptcheck-session")


class CheckpointSession:
    """Registered only when ``--ckpt`` is given: adds the checkpoint collector to the session."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        # Results by check id, from this process's items or, under xdist, from every worker's reports.
        self.results: dict[str, Any] = {}

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

        get = self.config.getoption
        options = engine_options(get)
        the_plan = plan(get("ckpt"), get("model_config"), options)  # metadata only: the header's facts
        the_plan.close()
        results = sort_results(list(self.results.values()))
        rows = None
        if get("matrix"):
            from .matrix import compatibility_matrix

            rows = compatibility_matrix(get("ckpt"), get("model_config"), options)
        return ReportData(the_plan.checkpoint_info, the_plan.config_info, options.target, results,
                          summarize(results), rows)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.config.getoption("report")
        if path and self.is_controller and self.results:
            from .report.document import write

            self.written = write(self._report_data(), path)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results or not self.is_controller:
            return
        from .report.document import ReportData, sort_results
        from .report.text import category_table

        results = sort_results(list(self.results.values()))
        terminalreporter.section("ckptcheck")
        terminalreporter.write_line(category_table(results))
        data = ReportData({}, {}, "", results, {})
        for command in data.repairs:
            terminalreporter.write_line(f"repair: {command}")
        if data.repairs and data.blocking:
            terminalreporter.write_line(f"(ckptcheck repair refuses while these fail: {', '.join(data.blocking)})")
        written = getattr(self, "written", None)
        if written:
            terminalreporter.write_line(f"report: {written}")
    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        from .engine import resolve_config_path

        ckpt, given = config.getoption("ckpt"), config.getoption("model_config")
        cfg = resolve_config_path(ckpt, given)
        found = " (found beside the checkpoint)" if given is None and cfg is not None else ""
        factory = config.getoption("model_factory")
        lines = [f"ckptcheck: checkpoint {ckpt}", f"ckptcheck: config {cfg}{found}"]
        if factory:
            lines.append(f"ckptcheck: model factory {factory}")
        return lines

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Any:
        report = yield
        if isinstance(collector, pytest.Session) and report.passed:
            # With --ckpt and no test paths on the command line, the checkpoint is the whole run; explicit
            # paths are collected as well.
            explicit = self.config.args_source == pytest.Config.ArgsSource.ARGS
            name = str(self.config.getoption("ckpt"))
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

        get = self.config.getoption
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

