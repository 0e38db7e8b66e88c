"""A few KB of pickle cannot cost gigabytes through shared references: forty nested {"a": d, "b": d} are
2**40 paths to walk, a ``str()`` or path join of such a list is as large, and hashing a tuple DAG (a dict
key) never ends.  Old code walked every path
(dag: 2 KB -> 3.2 GB) and called ``str()`` on whatever torch.device or a DCP PosixPath was handed.  Each
case runs as the user runs it, in a process whose address space is capped, and must end with one line."""

from __future__ import annotations

import pathlib
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .hostile import (
    GOOD, LEGACY_INFO, LEGACY_MAGIC, LEGACY_PROTOCOL, LINGUA, Payload, dcp_copy, edit_metadata, legacy, torch_zip,
)

ADDRESS_SPACE = 2 << 30  # a good fixture is checked in well under this; old code needed more than 2 GB
HANG_GUARD_S = 300  # only so that a regression fails instead of hanging the suite


def _dag(leaf: object, depth: int = 45) -> object:
    d = leaf
    for _ in range(depth):
        d = {"a": d, "b": d}
    return d


def _nested_list(depth: int = 40) -> list:
    node: object = "A" * 100
    for _ in range(depth):
        node = [node, node]
    return node  # type: ignore[return-value]


def _save(tmp: Path, obj: dict) -> Path:
    path = tmp / "consolidated.pth"
    torch.save(obj, path)
    return path


def _model() -> dict:
    return torch.load(GOOD / "consolidated.pth", weights_only=True)


def _meta_path_join(tmp: Path) -> Path:
    def change(meta) -> None:
        meta.planner_data["extra"] = Payload(pathlib.PurePosixPath, _nested_list())

    return edit_metadata(dcp_copy(tmp), change)


# (1,), then sixty times DUP and TUPLE2: t = (t, t), 2**60 paths in 125 bytes (no writer can make it: its
# own hash of the key would never end).
_TUPLE_DAG = b"K\x01\x85" + b"2\x86" * 60

CASES = {
    "dict_dag_beside_the_model": (lambda t: _save(t, {**_model(), "extra": _dag(1)}), "shared references"),
    "dict_dag_of_tensors": (lambda t: _save(t, {"model": _dag(torch.zeros(1))}), "shared references"),
    "device_of_a_nested_list": (lambda t: _save(t, {**_model(), "dev": Payload(torch.device, _nested_list())}),
                                "shared references"),
    "dcp_path_of_a_nested_list": (_meta_path_join, "shared references"),
    # loading hashes a dict key or set element: a tuple's hash follows every path (never ends)
    "tuple_dag_as_dict_key": (lambda t: torch_zip(t, b"\x80\x02}" + _TUPLE_DAG + b"K\x01s."), "shared references"),
    "tuple_dag_in_a_legacy_file": (lambda t: legacy(t, [LEGACY_MAGIC, LEGACY_PROTOCOL, LEGACY_INFO,
                                                         b"\x80\x02}" + _TUPLE_DAG + b"K\x01s."]),
                                   "shared references"),
    "tuple_dag_in_a_set": (lambda t: torch_zip(t, b"\x80\x02c__builtin__\nset\n]" + _TUPLE_DAG + b"a\x85R."),
                           "shared references"),
}


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.parametrize("command", ["check", "inspect"])
@pytest.mark.parametrize("case", CASES)
def test_shared_references_end_in_one_line(tmp_path: Path, case: str, command: str) -> None:
    build, expect = CASES[case]
    path = build(tmp_path)
    assert path.stat().st_size < (1 << 20) or path.is_dir()
    extra = ["--model-config", str(LINGUA)] if command == "check" else []
    proc = subprocess.run([sys.executable, "-m", "ckptcheck", command, str(path), *extra], capture_output=True,
                          text=True, timeout=HANG_GUARD_S, preexec_fn=_capped, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]


def test_a_capped_process_checks_a_good_checkpoint(tmp_path: Path) -> None:
    """The cap leaves room for real work: the cases above fail for their content, not for the cap."""
    proc = subprocess.run([sys.executable, "-m", "ckptcheck", "check", str(GOOD / "consolidated.pth"),
                           "--model-config", str(LINGUA)], capture_output=True, text=True, timeout=HANG_GUARD_S,
                          preexec_fn=_capped, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
