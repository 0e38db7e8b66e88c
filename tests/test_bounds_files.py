"""Issue 11, files and shard sets: every file a checkpoint folder names is a regular file inside that folder
(a hub cache's blob links excepted), every safetensors header and index is bounded and validated before it
drives anything, and a Meta shard set is numbered in ASCII digits with no shard a copy of another."""

from __future__ import annotations

import json
import os
import struct
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptcheck.cli import main

from .writers import FIXTURES

# A guard so that a regression fails instead of hanging the suite; a pass takes about a second.
HANG_GUARD_S = 120
SHARDED = FIXTURES / "good" / "hf_sharded"
MP = FIXTURES / "good" / "meta_mp"
CONFIG = FIXTURES / "configs" / "lingua_params.json"
SECOND = {"sharded": "model-00002-of-00002.safetensors", "meta": "consolidated.01.pth"}
SOURCE = {"sharded": SHARDED, "meta": MP}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, as a user runs it: a hang or a runaway read ends at the guard."""
    return subprocess.run([sys.executable, "-m", "ckptcheck", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=cwd)


def _with_second_shard(tmp: Path, kind: str, make) -> Path:
    """A copy of a good shard set whose second shard is replaced by ``make(path)``."""
    folder = Path(shutil.copytree(SOURCE[kind], tmp / kind))
    (folder / SECOND[kind]).unlink()
    make(folder / SECOND[kind])
    return folder


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind", SECOND)
def test_fifo_shard_is_refused_not_waited_on(tmp_path: Path, kind: str) -> None:
    folder = _with_second_shard(tmp_path, kind, os.mkfifo)
    proc = _cli("check", str(folder), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{SECOND[kind]}: is a FIFO, not a regular file: refused" in _one_line(proc)


@pytest.mark.parametrize("kind", SECOND)
def test_shard_linked_to_dev_zero_is_unsafe_not_read(tmp_path: Path, kind: str) -> None:
    folder = _with_second_shard(tmp_path, kind, lambda p: p.symlink_to("/dev/zero"))
    proc = _cli("check", str(folder), "-v", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"{SECOND[kind]}: leads to /dev/zero, outside the checkpoint folder {folder.resolve()}: refused" in proc.stdout


@pytest.mark.parametrize("kind", SECOND)
def test_shard_linked_outside_the_folder_is_unsafe(tmp_path: Path, kind: str) -> None:
    """The linked file is the real shard, valid in every byte: only where it lives is wrong."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(SOURCE[kind] / SECOND[kind], elsewhere / SECOND[kind])
    folder = _with_second_shard(tmp_path, kind, lambda p: p.symlink_to(f"../elsewhere/{SECOND[kind]}"))
    assert main(["check", str(folder), "-v"]) == 1
    line = f"leads to {(elsewhere / SECOND[kind]).resolve()}, outside the checkpoint folder"
    assert main(["inspect", str(folder)]) == 1
    proc = _cli("check", str(folder), "-v", cwd=tmp_path)
    assert proc.returncode == 1 and line in proc.stdout and "UNSAFE safety" in proc.stdout


def _hub_cache(tmp: Path, source: Path, subfolder: str = "") -> Path:
    """A Hugging Face hub cache as huggingface_hub lays it out: every file of a snapshot a relative symlink
    into the repo's blobs folder."""
    repo = tmp / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd" / subfolder
    snapshot.mkdir(parents=True)
    depth = "../" * (2 + len(Path(subfolder).parts))
    for i, f in enumerate(sorted(source.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"{depth}blobs/blob{i}")
    return snapshot


@pytest.mark.parametrize("kind", SECOND)
@pytest.mark.parametrize("subfolder", ["", "original"])
def test_hub_cache_snapshot_links_into_its_blobs_are_read(tmp_path: Path, kind: str, subfolder: str) -> None:
    snapshot = _hub_cache(tmp_path, SOURCE[kind], subfolder)
    assert main(["check", str(snapshot)]) == 0


def test_hub_cache_link_into_another_repos_blobs_is_unsafe(tmp_path: Path) -> None:
    snapshot = _hub_cache(tmp_path, SHARDED)
    other = tmp_path / "hub" / "models--other--repo" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(SHARDED / SECOND["sharded"], other / "x")
    (snapshot / SECOND["sharded"]).unlink()
    (snapshot / SECOND["sharded"]).symlink_to("../../../models--other--repo/blobs/x")
    assert main(["check", str(snapshot)]) == 1


def _header_file(tmp: Path, header: bytes, data: bytes = b"") -> Path:
    path = tmp / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _entry(dtype: str = '"F32"', shape: str = "[1]", offsets: str = "[0, 4]") -> bytes:
    return f'{{"a": {{"dtype": {dtype}, "shape": {shape}, "data_offsets": {offsets}}}}}'.encode()


# name: (header, data, the cause in the one line)
HEADERS = {
    "nested_1000_deep": (b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}", b"", "JSON nested 1001 levels deep (limit 64)"),
    "dtype_a_list": (_entry(dtype='["F32"]'), b"\0" * 4, "a: unknown dtype ['F32']"),
    "dtype_an_object": (_entry(dtype='{"F32": 1}'), b"\0" * 4, "a: unknown dtype {'F32': 1}"),
    "integer_of_5000_digits": (_entry(shape=f"[{'9' * 5000}]"), b"\0" * 4, "an integer of 5000 digits (limit 40)"),
    "shape_product_of_7800_digits": (_entry(shape="[" + ", ".join(["9" * 39] * 200) + "]"), b"\0" * 4,
                                     "is not a list of non-negative integers whose product fits torch's int64 sizes"),
    "offsets_strings": (_entry(offsets='["0", "4"]'), b"\0" * 4,
                        "a: data_offsets ['0', '4'] are not [begin, end] with 0 <= begin <= end <= 4"),
    "offsets_floats": (_entry(offsets="[0.0, 4.0]"), b"\0" * 4, "a: data_offsets [0.0, 4.0] are not [begin, end]"),
    "offsets_negative": (_entry(offsets="[-4, 0]"), b"\0" * 4, "a: data_offsets [-4, 0] are not [begin, end]"),
    "offsets_huge": (_entry(offsets=f"[0, {2**64}]"), b"\0" * 4,
                     f"a: data_offsets [0, {2**64}] are not [begin, end] with 0 <= begin <= end <= 4"),
    "offsets_past_the_file": (_entry(shape="[2]", offsets="[0, 8]"), b"\0" * 4,
                              "a: data_offsets [0, 8] are not [begin, end] with 0 <= begin <= end <= 4"),
    "shape_not_a_list": (_entry(shape="4"), b"\0" * 4, "a: shape 4 is not a list of non-negative integers"),
    "shape_floats": (_entry(shape="[1.0]"), b"\0" * 4, "a: shape [1.0] is not a list of non-negative integers"),
    "shape_bools": (_entry(shape="[true]"), b"\0" * 4, "a: shape [True] is not a list of non-negative integers"),
    "shape_negative": (_entry(shape="[-1, -4]"), b"\0" * 4, "a: shape [-1, -4] is not a list of non-negative"),
    "size_cannot_fit_the_file": (_entry(shape=f"[{2**20}, {2**20}]"), b"\0" * 4,
                                 f"a: spans 4 bytes but shape [{2**20}, {2**20}] of float32 needs more bytes than "
                                 "the file holds"),
    "zero_elements_dim_2_63": (_entry(shape=f"[0, {2**63}]", offsets="[0, 0]"), b"",
                               f"a: shape [0, {2**63}] is not a list of non-negative integers whose product "
                               "fits torch's int64 sizes"),
    "zero_elements_numel_overflow": (_entry(shape=f"[{2**62}, 4, 0]", offsets="[0, 0]"), b"",
                                     "fits torch's int64 sizes"),
}

# The reference reader, in a process of its own with a memory limit: it must refuse every header above too.
_ORACLE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from safetensors.torch import load_file
for path in sys.argv[1:]:
    try:
        load_file(path)
    except Exception:
        continue
    print(path)
"""


@pytest.fixture(scope="module")
def loaded_by_safetensors(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The header cases the safetensors library loads (one process for all of them)."""
    folder = tmp_path_factory.mktemp("oracle")
    paths = []
    for case, (header, data, _) in HEADERS.items():
        (folder / case).mkdir()
        paths.append(str(_header_file(folder / case, header, data)))
    proc = subprocess.run([sys.executable, "-c", _ORACLE, *paths], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, check=True)
    return [Path(p).parent.name for p in proc.stdout.split()]


@pytest.mark.parametrize("case", HEADERS)
def test_invalid_safetensors_header_is_one_line_not_a_crash(tmp_path: Path, case: str, loaded_by_safetensors: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    header, data, cause = HEADERS[case]
    path = _header_file(tmp_path, header, data)
    assert main(["check", str(path), "--model-config", str(CONFIG)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: " in err and cause in err, err
    assert case not in loaded_by_safetensors


def _index_with(tmp: Path, edit) -> Path:
    """A copy of the good sharded checkpoint whose index text is ``edit(index as a dict)``."""
    folder = Path(shutil.copytree(SHARDED, tmp / "sharded"))
    index = folder / "model.safetensors.index.json"
    index.write_text(edit(json.loads(index.read_text())))
    return folder


def _first_named(name: str):
    def edit(index: dict) -> str:
        first = next(iter(index["weight_map"]))
        return json.dumps({**index, "weight_map": {**index["weight_map"], first: name}})
    return edit


# name: (how the index text is made, the cause in the one line)
INDEXES = {
    "nested_1000_deep": (lambda i: '{"weight_map": ' + "[" * 1000 + "]" * 1000 + "}",
                         "model.safetensors.index.json: JSON nested 1001 levels deep (limit 64)"),
    "integer_of_5000_digits": (lambda i: json.dumps({**i, "metadata": {"total_size": 0}}).replace(
        '"total_size": 0', '"total_size": ' + "9" * 5000), "an integer of 5000 digits (limit 40)"),
    "name_with_a_nul": (_first_named("a\0b"), "weight_map[lm_head.weight]: names 'a\\x00b', which does not exist"),
    "name_of_a_folder": (_first_named("sub"), "sharded/sub: is a folder, not a regular file: refused\n"),
}


@pytest.mark.parametrize("case", INDEXES)
def test_invalid_index_json_is_one_line_not_a_crash(tmp_path: Path, case: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    edit, cause = INDEXES[case]
    folder = _index_with(tmp_path, edit)
    (folder / "sub").mkdir()
    assert main(["check", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder}" in err and cause in err, err


def _many_keys(tmp: Path, n: int) -> Path:
    tmp.mkdir()
    header = {f"blocks.{i}.extra.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i in range(n)}
    return _header_file(tmp, json.dumps(header).encode(), b"\0" * (4 * n))


def test_header_with_many_keys_is_checked_in_steps_linear_in_the_keys(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key is a failing check that names a repair command; working out that command's flags maps every
    key, and did so once per check (100,000 keys: hours).  Counted, not timed: the whole-checkpoint key
    mapping runs as often for 200 keys as for 20."""
    import ckptcheck.naming

    calls: list[int] = []
    real = ckptcheck.naming.map_keys

    def counted(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(ckptcheck.naming, "map_keys", counted)
    counts = []
    for n in (20, 200):
        calls.clear()
        assert main(["check", str(_many_keys(tmp_path / str(n), n)), "--model-config", str(CONFIG)]) == 1
        counts.append(sum(1 for c in calls if c >= n))
    assert counts[0] == counts[1] and counts[1] < 20, counts


ARABIC_ONE = "\u0661"  # ARABIC-INDIC DIGIT ONE: int() reads it as 1, str.isdigit() and \d accept it


def test_shard_numbered_in_arabic_indic_digits_is_not_shard_one(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = Path(shutil.copytree(MP, tmp_path / "mp"))
    (folder / "consolidated.01.pth").rename(folder / f"consolidated.{ARABIC_ONE}.pth")
    assert main(["check", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip().endswith(
        f"consolidated.{ARABIC_ONE}.pth: numbered in digits other than ASCII 0-9: not a model-parallel shard name"), err


def test_layer_numbered_in_arabic_indic_digits_is_not_layer_one(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The model's load_state_dict finds no layers.1...wq (missing) and an unexpected key: so must the check,
    and layer 1 is partial, not the complete layer that would confirm n_layers = 2."""
    from safetensors.torch import load_file, save_file

    state = load_file(FIXTURES / "good" / "model.safetensors")
    state[f"layers.{ARABIC_ONE}.attention.wq.weight"] = state.pop("layers.1.attention.wq.weight")
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    assert main(["check", str(path), "--model-config", str(CONFIG), "-v"]) == 1
    out = capsys.readouterr().out
    assert "FAIL   key_present[layers.1.attention.wq.weight]" in out
    assert f"FAIL   unexpected_key[layers.{ARABIC_ONE}.attention.wq.weight]" in out
    assert "layer 1 holds 8 of 9 tensors" in out and "PASS   config[n_layers]" not in out


def test_key_of_a_superscript_digit_is_sorted_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """'²'.isdigit() is True but int('²') raises: a key made of it crashed sorting the keys (exit 3)."""
    path = _header_file(tmp_path, json.dumps({"\u00b2": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),
                        b"\0" * 4)
    assert main(["inspect", str(path)]) == 0
    assert "\u00b2" in capsys.readouterr().out


def test_version_record_in_arabic_indic_digits_is_refused_as_torch_does(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """torch parses the archive's version record with stoll (ASCII digits); int() reads '٣' as 3."""
    import zipfile

    import torch

    source, path = tmp_path / "source.pth", tmp_path / "model.pth"
    torch.save({"w": torch.zeros(4)}, source)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, "\u0663\n".encode() if info.filename.endswith("/version") else src.read(info))
    oracle = subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=True)",
                             str(path)], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert oracle.returncode != 0 and "Couldn't parse the version" in oracle.stderr
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source/version: format version" in err and "torch.load refuses it" in err, err


def test_duplicate_tensor_in_a_second_meta_shard_is_reported(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """consolidated.01.pth holds shard 0's slice of a split tensor (rank 1 would load rank 0's rows); a split
    tensor that is constant (zeros) in every shard is no evidence of a copy and passes."""
    import torch

    folder = Path(shutil.copytree(MP, tmp_path / "mp"))
    first = torch.load(folder / "consolidated.00.pth", weights_only=True)
    second = torch.load(folder / "consolidated.01.pth", weights_only=True)
    second["layers.0.attention.wq.weight"] = first["layers.0.attention.wq.weight"].clone()
    for shard in (first, second):
        shard["layers.1.feed_forward.w1.weight"].zero_()
    torch.save(first, folder / "consolidated.00.pth")
    torch.save(second, folder / "consolidated.01.pth")
    assert main(["check", str(folder), "-v"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert fails == ["FAIL   replicas[layers.0.attention.wq.weight]"], fails
    assert "layers.0.attention.wq.weight is split across the shards, but the slice in consolidated.01.pth is " \
           "bit-identical to an earlier shard's" in out
    assert "PASS   replicas[layers.1.feed_forward.w1.weight]" in out


def test_nul_byte_in_a_named_file_is_one_line_not_a_crash(tmp_path: Path) -> None:
    """Names come from the input (an index's weight_map, DCP metadata): os.open raises ValueError on a NUL."""
    from ckptcheck.errors import InputError
    from ckptcheck.files import open_binary

    for inside in (None, tmp_path):
        with pytest.raises(InputError, match="a file name with a NUL byte: refused"):
            open_binary(tmp_path / "a\0b", inside)


def test_temporary_named_with_a_non_ascii_pid_is_left_alone_not_a_crash(tmp_path: Path) -> None:
    """convert clears its own stale temporaries by the writer's pid in their name: '²' passed str.isdigit()
    and int() raised (exit 3); '٣' read as pid 3 got a stranger's file deleted."""
    out = tmp_path / "out.pth"
    strangers = [tmp_path / f".out.pth.ckptcheck-tmp-{pid}-x" for pid in ("\u00b2", "\u0663\u0663\u0663\u0663\u0663")]
    for path in strangers:
        path.write_text("not ours")
    assert main(["convert", str(FIXTURES / "good" / "consolidated.pth"), str(out)]) == 0
    assert out.is_file() and all(path.read_text() == "not ours" for path in strangers)


@pytest.mark.parametrize("key", ["layers." + "9" * 5000 + ".attention.wq.weight", "w" + "9" * 5000])
def test_key_with_a_run_of_5000_digits_is_a_key_not_an_error(tmp_path: Path, key: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """safetensors loads such a key (it is a string); sorting keys and reading layer indices int()-ed the digits,
    which raises past 4,300 of them, and the file was refused as unreadable (exit 2)."""
    from safetensors.torch import load_file

    path = _header_file(tmp_path, json.dumps({key: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),
                        b"\0" * 4)
    assert list(load_file(path)) == [key]
    assert main(["check", str(path), "--model-config", str(CONFIG), "-v"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL   unexpected_key[{key}]" in out


@pytest.mark.parametrize("name", ["model.safetensors", "consolidated.pth", "model.safetensors.index.json"])
def test_file_found_in_a_folder_linked_outside_it_is_unsafe(tmp_path: Path, name: str) -> None:
    """The folder named is the checkpoint: the file found in it (a single file, or the index) must be in it."""
    source = {"model.safetensors": FIXTURES / "good" / "hf", "consolidated.pth": FIXTURES / "good",
              "model.safetensors.index.json": SHARDED}[name]
    elsewhere = Path(shutil.copytree(source, tmp_path / "elsewhere"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / name).symlink_to(elsewhere / name)
    proc = _cli("check", str(folder), "--model-config", str(CONFIG), "-v", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"leads to {(elsewhere / name).resolve()}, outside the checkpoint folder" in proc.stdout


def test_hub_cache_single_file_snapshot_is_read(tmp_path: Path) -> None:
    assert main(["check", str(_hub_cache(tmp_path, FIXTURES / "good" / "hf"))]) == 0
