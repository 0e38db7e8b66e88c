"""Reports: every format parses, carries the failures and their repair commands, and is the same
whether pytest ran on one process or several."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from ckptcheck.cli import main

from .writers import CONFIGS, FIXTURES

DAMAGED = str(FIXTURES / "broken" / "damaged.pth")
LINGUA = str(CONFIGS / "lingua_params.json")
SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "report.schema.json").read_text())
FAILED = {"key_present[layers.0.feed_forward.w3.weight]", "dtype[norm.weight]", "finite[layers.1.attention.wk.weight]"}
REPAIR = f"ckptcheck repair {DAMAGED}"


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reports")
    paths = {}
    for suffix in ("md", "html", "json"):
        paths[suffix] = out / f"damaged.{suffix}"
        assert main(["report", DAMAGED, "--model-config", LINGUA, "-o", str(paths[suffix])]) == 1
    return paths


def test_json_report_follows_the_schema(reports: dict[str, Path]) -> None:
    doc = json.loads(reports["json"].read_text())
    jsonschema.validate(doc, SCHEMA)
    failed = {c["id"]: c for c in doc["checks"] if c["status"] == "fail"}
    assert set(failed) == FAILED
    assert failed["dtype[norm.weight]"]["repair"].startswith(REPAIR)
    assert set(doc["matrix"]) == {"hf", "lingua_init", "lingua_resume", "meta", "torchtitan"}


def test_markdown_report_tables(reports: dict[str, Path]) -> None:
    text = reports["md"].read_text()
    assert text.startswith(f"# ckptcheck report: `{DAMAGED}`")
    rows = {cells[1].strip(): cells[2].strip() for line in text.splitlines()
            if line.startswith("|") and len(cells := line.split("|")) == 4}
    assert rows["format"] == "torch" and rows["dtype mix"] == "bfloat16: 19, float32: 1"
    assert rows["verdict"].startswith("FAIL: 86 passed, 3 failed")
    for check_id in FAILED:
        assert f"### FAIL `{check_id}`" in text
    assert REPAIR in text and "refuses to write anything while these fail" in text
    # one table per category; its rows are its checks
    dtype_table = text.split("### dtype (")[1].split("###")[0]
    assert len([line for line in dtype_table.splitlines() if re.match(r"^\| (pass|fail|skip) ", line)]) == 21
    assert "## Compatibility matrix" in text and "## Version facts" in text


class _Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str | None]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs += attrs
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_html_report_is_self_contained_and_complete(reports: dict[str, Path]) -> None:
    text = reports["html"].read_text()
    parser = _Tables()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags and "img" not in parser.tags
    assert not [v for k, v in parser.attrs if k in ("src", "href") and v and "://" in v]
    summary = {r[0]: r[1] for r in parser.rows if len(r) == 2}
    assert summary["format"] == "torch" and summary["verdict"].startswith("FAIL")
    statuses = [r for r in parser.rows if len(r) == 3 and r[0] in ("pass", "FAIL", "skip")]
    assert len(statuses) == 96 and sum(r[0] == "FAIL" for r in statuses) == 3
    for check_id in FAILED:
        assert check_id in text
    assert REPAIR in text


def _run_with_report(pytester: pytest.Pytester, path: Path, *extra: str) -> pytest.RunResult:
    return pytester.runpytest("--ckpt", DAMAGED, "--model-config", LINGUA, "--ckpt-report", str(path), *extra)


@pytest.mark.parametrize("suffix", ["json", "md"])
def test_same_report_with_and_without_xdist(suffix: str, pytester: pytest.Pytester, tmp_path: Path) -> None:
    single, parallel = tmp_path / f"single.{suffix}", tmp_path / f"parallel.{suffix}"
    assert _run_with_report(pytester, single).ret == 1
    result = _run_with_report(pytester, parallel, "-n", "4")
    assert result.ret == 1
    result.assert_outcomes(passed=86, failed=3, skipped=7)
    assert single.read_text() == parallel.read_text()
    if suffix == "json":
        jsonschema.validate(json.loads(parallel.read_text()), SCHEMA)


def test_terminal_summary_and_junitxml(pytester: pytest.Pytester, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest("--ckpt", DAMAGED, "--model-config", LINGUA, f"--junitxml={junit}")
    result.stdout.fnmatch_lines(["*= ckptcheck =*", "category*pass*fail*skip*unsafe*",
                                 "dtype*19*1*1*0*", f"repair: {REPAIR}*", "*refuses while these fail*"])
    cases = ET.parse(junit).getroot().iter("testcase")
    names = {c.get("name"): c for c in cases}
    assert len(names) == 96
    assert names["test_dtype[norm.weight]"].find("failure") is not None
    assert names["test_shape[tok_embeddings.weight]"].find("failure") is None
    assert "norm.weight is float32" in names["test_dtype[norm.weight]"].find("failure").get("message")


def test_report_of_a_passing_checkpoint_exits_0(tmp_path: Path) -> None:
    assert main(["report", str(FIXTURES / "good" / "dcp"), "--target", "lingua_resume", "-o", str(tmp_path / "r.md")]) == 0
    assert "**Verdict: PASS**" in (tmp_path / "r.md").read_text()


def test_committed_example_reports_are_current(tmp_path: Path) -> None:
    """reports/ is what `make reports` writes today (compare the JSON, which carries every fact)."""
    committed = Path(__file__).parent.parent / "reports" / "lingua_step_folder.json"
    import os

    cwd = os.getcwd()
    os.chdir(Path(__file__).parent.parent)
    try:
        main(["report", "fixtures/good/dcp", "--target", "lingua_resume", "-o", str(tmp_path / "now.json")])
    finally:
        os.chdir(cwd)
    assert json.loads((tmp_path / "now.json").read_text()) == json.loads(committed.read_text())
