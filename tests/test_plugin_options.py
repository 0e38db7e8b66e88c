"""ckptcheck is installed into other projects' pytest: their own options must keep working.

pytest loads entry-point plugins before conftest.py files, so a project conftest defining ``--model-config``
(or ``--ckpt``, ``--target``) used to stop pytest at start: ``option dest 'model_config' already used``.
"""

from __future__ import annotations

import shutil

import pytest

from .writers import CONFIGS, FIXTURES

GOOD = str(FIXTURES / "good" / "consolidated.pth")
LINGUA = str(CONFIGS / "lingua_params.json")

PROJECT_TEST = """
def test_project_option(request):
    assert request.config.getoption("{dest}") == "{value}"
"""


def _project(pytester: pytest.Pytester, *options: str, dest: str, value: str) -> None:
    lines = "".join(f"    parser.addoption({opt!r})\n" for opt in options)
    pytester.makeconftest(f"def pytest_addoption(parser):\n{lines}")
    pytester.makepyfile(test_project=PROJECT_TEST.format(dest=dest, value=value))


def test_project_defining_model_config_and_target_still_starts(pytester: pytest.Pytester) -> None:
    _project(pytester, "--model-config", "--target", "--model-factory", dest="model_config", value="mine.yaml")
    result = pytester.runpytest("--model-config", "mine.yaml", "--target", "x")
    result.assert_outcomes(passed=1)
    assert result.ret == 0


def test_project_option_and_checkpoint_checks_side_by_side(pytester: pytest.Pytester) -> None:
    _project(pytester, "--model-config", dest="model_config", value="mine.yaml")
    result = pytester.runpytest("--ckpt", GOOD, "--ckpt-model-config", LINGUA, "--model-config", "mine.yaml",
                                "test_project.py", "-k", "project or naming")
    result.assert_outcomes(passed=2)  # the project's test read its own value; ckptcheck read its own
    result.stdout.fnmatch_lines(["ckptcheck: --model-config is this project's own option; "
                                 "ckptcheck reads --ckpt-model-config"])


def test_project_defining_ckpt_keeps_it_and_ckptcheck_stays_off(pytester: pytest.Pytester) -> None:
    _project(pytester, "--ckpt", dest="ckpt", value="project-ckpt")
    result = pytester.runpytest("--ckpt", "project-ckpt")
    result.assert_outcomes(passed=1)  # the project's run: no checkpoint items
    both = pytester.runpytest("--ckpt", "project-ckpt", "--ckpt-path", GOOD, "--ckpt-model-config", LINGUA,
                              "test_project.py", "-k", "project or naming")
    both.assert_outcomes(passed=2)


def test_short_spellings_work_without_a_conflict(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ckpt", GOOD, "--model-config", LINGUA, "-k", "naming")
    result.assert_outcomes(passed=1)
    assert "own option" not in result.stdout.str()


def test_checkpoint_folder_conftest_is_never_imported(pytester: pytest.Pytester) -> None:
    """``--ckpt`` is registered after the project's conftests; its value must not read as a test path, or
    pytest would import a conftest.py lying in the checkpoint's folder (a downloaded model repo's)."""
    folder = pytester.path / "downloaded"
    folder.mkdir()
    shutil.copy(GOOD, folder / "consolidated.pth")
    sentinel = pytester.path / "conftest-ran"
    (folder / "conftest.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    result = pytester.runpytest("--ckpt", str(folder / "consolidated.pth"), "--model-config", LINGUA,
                                "-k", "naming")
    result.assert_outcomes(passed=1)
    assert not sentinel.exists()
