"""Issue 11, DCP and training state: every malformed DCP ``.metadata`` field is one exit-2 line naming the
file, the item and the cause; DCP tensor data is CRC-checked on every read; optimizer hyperparameters and
moments are judged; conversion is bounded by bytes, not rows.

Each input is real ``dcp.save`` / ``torch.save`` output (the bundled fixtures), altered with torch's own
classes, and goes through the CLI as a user would run it."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from ckptcheck.cli import main

from .writers import CONFIGS, FIXTURES

LINGUA = str(CONFIGS / "lingua_params.json")
WQ = "model.layers.0.attention.wq.weight"


def dcp_copy(tmp: Path) -> Path:
    folder = tmp / "dcp"
    shutil.copytree(FIXTURES / "good" / "dcp", folder)
    return folder


def edit_metadata(tmp: Path, change: Callable[[object], None]) -> Path:
    """Rewrite the fixture's .metadata with torch's own classes (our fixture, loaded with pickle: trusted)."""
    folder = dcp_copy(tmp)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    change(meta)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder


def check(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check", str(path), "--model-config", LINGUA, *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *parts: str) -> None:
    assert err.count("\n") == 1 and err.startswith("ckptcheck: error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def _storage(meta, fqn: str = WQ):
    return next(v for k, v in meta.storage_data.items() if k.fqn == fqn)


def _rekey(meta, offset: object, fqn: str = WQ) -> None:
    """Re-index a chunk's storage entry under ``offset`` as a writer would (MetadataIndex is frozen)."""
    key = next(k for k in meta.storage_data if k.fqn == fqn)
    info = meta.storage_data.pop(key)
    new = MetadataIndex.__new__(MetadataIndex)
    for name, value in (("fqn", fqn), ("offset", offset), ("index", key.index)):
        object.__setattr__(new, name, value)
    meta.storage_data[new] = info


def _set_offsets(value: object, *, rekey: bool) -> Callable[[object], None]:
    def change(meta) -> None:
        meta.state_dict_metadata[WQ].chunks[0].offsets = value
        if rekey:
            _rekey(meta, value)
    return change


# --- DCP Metadata fields ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["00", 0, (0.0, 0.0)], ids=["string", "int", "floats"])
@pytest.mark.parametrize("rekey", [False, True], ids=["chunk", "chunk-and-index"])
def test_dcp_chunk_offsets_of_the_wrong_type_are_one_line(value, rekey, tmp_path, capsys) -> None:
    folder = edit_metadata(tmp_path, _set_offsets(value, rekey=rekey))
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "not")


@pytest.mark.parametrize("value", ["32", (32.0, 32.0), (-32, 32), (2**70, 32)],
                         ids=["string", "floats", "negative", "huge"])
def test_dcp_chunk_sizes_of_the_wrong_type_or_range_are_one_line(value, tmp_path, capsys) -> None:
    def change(meta) -> None:
        meta.state_dict_metadata[WQ].chunks[0].sizes = value
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "chunk 0")


@pytest.mark.parametrize("value", [5, None, "abc", {1: 2}], ids=["int", "none", "string", "dict"])
def test_dcp_chunks_that_are_not_a_list_are_one_line(value, tmp_path, capsys) -> None:
    def change(meta) -> None:
        meta.state_dict_metadata[WQ].chunks = value
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, f"chunks is a {type(value).__name__}, not a list")


@pytest.mark.parametrize("rel", ["__0_0\x00.distcp", "__0_0.distcp\n", ".", "a/", "./__0_0.distcp", "a" * 5000],
                         ids=["nul", "newline", "dot", "trailing-slash", "dot-part", "too-long"])
def test_dcp_nul_byte_in_relative_path_is_one_line(rel, tmp_path, capsys) -> None:
    """A NUL (or any control character, '.' part, or 5,000 characters) is not a file name in the folder:
    torch's open raises ValueError on it; we name the entry."""
    def change(meta) -> None:
        _storage(meta).relative_path = rel
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "is not a file name inside the folder")


@pytest.mark.parametrize(("version", "shown"), [("v2", "'v2'"), ([1, 0], "a list"), (2, "a int"),
                                                ((1, 0, 0), "a tuple")])
def test_dcp_version_that_is_not_a_dotted_string_is_one_line(version, shown, tmp_path, capsys) -> None:
    def change(meta) -> None:
        meta.version = version
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), "version", f"metadata version {shown} is not a dotted version")


@pytest.mark.parametrize(("field", "value"), [("offset", -1), ("offset", 2**80), ("offset", 1.0),
                                              ("length", "10"), ("length", 2**63)])
def test_dcp_storage_offset_or_length_out_of_range_is_one_line(field, value, tmp_path, capsys) -> None:
    def change(meta) -> None:
        setattr(_storage(meta), field, value)
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "storage offset/length are not non-negative integers")


def test_dcp_storage_range_beyond_the_data_file_is_one_line(tmp_path, capsys) -> None:
    def change(meta) -> None:
        _storage(meta).offset = 10**9
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, "__0_0.distcp", WQ, "past the end of the")


def test_dcp_storage_ranges_shared_by_two_tensors_are_one_line(tmp_path, capsys) -> None:
    """wk's entry pointing at wq's bytes (same shape and dtype, so the blob itself cannot tell): torch's
    dcp.load would load wq's values as wk silently."""
    wk = "model.layers.0.attention.wk.weight"

    def change(meta) -> None:
        mine, theirs = _storage(meta, wk), _storage(meta, "model.layers.0.attention.wv.weight")
        mine.offset, mine.length = theirs.offset, theirs.length
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), "overlap those of", "attention.wv.weight")


def test_dcp_overlapping_chunks_are_one_line(tmp_path, capsys) -> None:
    def change(meta) -> None:
        entry = meta.state_dict_metadata[WQ]
        entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([32, 16])),
                        ChunkStorageMetadata(torch.Size([0, 8]), torch.Size([32, 16]))]
        meta.storage_data[MetadataIndex(WQ, torch.Size([0, 8]))] = _storage(meta)
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "chunks at [0, 0] and [0, 8] overlap")


def test_dcp_chunk_beyond_the_tensor_is_one_line(tmp_path, capsys) -> None:
    def change(meta) -> None:
        meta.state_dict_metadata[WQ].chunks[0].offsets = torch.Size([1, 0])
        _rekey(meta, torch.Size([1, 0]))
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "lies outside [32, 32]")


@pytest.mark.parametrize("value", ["x", 5], ids=["string", "int"])
def test_dcp_planner_data_of_the_wrong_type_is_one_line(value, tmp_path, capsys) -> None:
    def change(meta) -> None:
        meta.planner_data = value
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), "planner_data", "not a dict of key paths")


@pytest.mark.parametrize("path", [("model", None), (), {"a": 1}, "model"], ids=["none-part", "empty", "dict", "str"])
def test_dcp_planner_path_of_the_wrong_type_is_one_line(path, tmp_path, capsys) -> None:
    def change(meta) -> None:
        meta.planner_data[WQ] = path
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "planner_data path is")


def test_dcp_planner_path_given_to_two_keys_is_one_line(tmp_path, capsys) -> None:
    def change(meta) -> None:
        meta.planner_data[WQ] = meta.planner_data["model.norm.weight"]
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), "planner_data gives it the path of")


# --- convert and diff: chunking bounded by bytes, not rows -------------------------------------------------

@pytest.fixture()
def no_endless_reads(monkeypatch):
    """Counts row reads of torch files and stops the run (exit 3, not a hang) far beyond what a 0.1 MB
    checkpoint needs: a loop over rows of a zero-byte [2**62, 0] tensor makes 2**36 of them."""
    from ckptcheck.formats.torchzip import PickledCheckpoint

    real, calls = PickledCheckpoint.read_rows, []

    def counted(self, key, start, stop, out=None):
        calls.append(key)
        assert len(calls) < 10_000, f"reads {key} row by row"
        return real(self, key, start, stop, out)

    monkeypatch.setattr(PickledCheckpoint, "read_rows", counted)
    return calls


def _with_empty(tmp_path: Path, name: str) -> Path:
    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    state["extra.empty"] = torch.empty(2**62, 0)
    torch.save(state, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("args", [("out.safetensors",), ("out.pth", "--dtype", "bf16")], ids=["safetensors", "cast"])
def test_convert_of_a_zero_byte_tensor_with_2_62_rows_ends(args, tmp_path, capsys, no_endless_reads) -> None:
    src = _with_empty(tmp_path, "in.pth")
    dst = tmp_path / args[0]
    code = main(["convert", str(src), str(dst), *args[1:], "--model-config", LINGUA])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    assert "verified" in out and dst.exists()


def test_diff_of_a_zero_byte_tensor_with_2_62_rows_ends(tmp_path, capsys, no_endless_reads) -> None:
    a, b = _with_empty(tmp_path, "a.pth"), _with_empty(tmp_path, "b.pth")
    code = main(["diff", str(a), str(b), "--model-config", LINGUA])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
