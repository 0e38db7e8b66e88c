"""Issue 11: a safetensors header with 100,000 extra keys took 11 s and 700 MB.  ``check`` must cost memory
and work linear in the number of keys, with a small per-key budget; measured here at two sizes through the
real CLI (no timings: allocations and call counts)."""

from __future__ import annotations

import contextlib
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptcheck import cli, naming
from ckptcheck.checks import repairs

from .writers import CONFIGS

SMALL, LARGE = 2_000, 20_000
# Peak bytes allocated per extra key by a whole ``check`` run (parse, plan, checks, report).  The file itself
# takes ~70 bytes per key; the old code took ~2,500 (every result and the whole report text held at once).
BYTES_PER_KEY = 1_200


def _checkpoint(folder: Path, tiny_state: dict[str, torch.Tensor], extra: int) -> Path:
    """The tiny model plus ``extra`` zero-size tensors no model has."""
    folder.mkdir()
    state = {k: v.contiguous() for k, v in tiny_state.items()}
    state.update({f"extra.{i}": torch.zeros(0) for i in range(extra)})
    save_file(state, folder / "model.safetensors")
    return folder / "model.safetensors"


def _check(path: Path, out: Path) -> int:
    argv = ["check", str(path), "--metadata-only", "--model-config", str(CONFIGS / "lingua_params.json")]
    with out.open("w") as f, contextlib.redirect_stdout(f):
        return cli.main(argv)


def _peak_bytes(path: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        assert _check(path, out) == 1
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def sizes(tmp_path_factory: pytest.TempPathFactory, tiny_state: dict[str, torch.Tensor]) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("scale")
    return {n: _checkpoint(root / str(n), tiny_state, n) for n in (SMALL, LARGE)}


def test_many_extra_keys_memory_is_linear_and_small_per_key(sizes: dict[int, Path], tmp_path: Path) -> None:
    _check(sizes[SMALL], tmp_path / "warm")  # imports and caches out of the measurement
    peaks = {n: _peak_bytes(path, tmp_path / f"out{n}") for n, path in sizes.items()}
    per_key = (peaks[LARGE] - peaks[SMALL]) / (LARGE - SMALL)
    assert per_key <= BYTES_PER_KEY, f"{per_key:.0f} bytes per extra key (peaks {peaks})"
    assert peaks[LARGE] <= LARGE * BYTES_PER_KEY + peaks[SMALL], peaks
    # every extra key is still its own failed check, with its own repair line
    text = (tmp_path / f"out{LARGE}").read_text()
    assert text.count("FAIL   unexpected_key[extra.") == LARGE
    assert f" --drop extra.{LARGE - 1}  (drops extra.{LARGE - 1})" in text
    assert f", {LARGE} failed, " in text.rstrip().splitlines()[-1]


def test_many_extra_keys_build_the_repair_command_once(sizes: dict[int, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"command": 0, "to_canonical": 0}
    command, to_canonical = repairs.command, naming.Scheme.to_canonical

    def counted_command(*args, **kwargs):
        calls["command"] += 1
        return command(*args, **kwargs)

    def counted_to_canonical(self, key):
        calls["to_canonical"] += 1
        return to_canonical(self, key)

    monkeypatch.setattr(repairs, "command", counted_command)
    monkeypatch.setattr(naming.Scheme, "to_canonical", counted_to_canonical)
    counts = {}
    for n, path in sizes.items():
        calls.update(command=0, to_canonical=0)
        assert _check(path, tmp_path / f"out{n}") == 1
        counts[n] = dict(calls)
    # the command line is the same for every key but its --drop: built once, not once per key
    assert counts[SMALL]["command"] == counts[LARGE]["command"] <= 2, counts
    # each key is mapped once by each of the three schemes, not once more after detection
    assert counts[LARGE]["to_canonical"] - counts[SMALL]["to_canonical"] <= 3 * (LARGE - SMALL), counts
