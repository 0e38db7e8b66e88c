"""Issue 11, DCP and training state: every malformed DCP ``.metadata`` field is one exit-2 line naming the
file, the item and the cause; DCP tensor data is CRC-checked on every read; optimizer hyperparameters and
moments are judged; conversion is bounded by bytes, not rows.

Each input is real ``dcp.save`` / ``torch.save`` output (the bundled fixtures), altered with torch's own
classes, and goes through the CLI as a user would run it."""

from __future__ import annotations

import io
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from ckptcheck.cli import main
from ckptcheck.formats import open_checkpoint

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


# --- integrity: a record's CRC-32 on every read path -------------------------------------------------------

def flip_in_record(path: Path, start: int = 0, length: int | None = None, at: int = 100) -> None:
    """Flip one bit inside the tensor data of the torch.save blob at ``start`` of ``path`` (a whole .pth, or
    one DCP chunk): the zip structure and the record's stored CRC-32 stay as written."""
    data = bytearray(path.read_bytes())
    blob = bytes(data[start:start + length] if length else data)
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        rec = next(i for i in z.infolist() if "/data/" in i.filename)
    names, extra = struct.unpack("<HH", blob[rec.header_offset + 26:rec.header_offset + 30])
    data[start + rec.header_offset + 30 + names + extra + at] ^= 0x10
    path.write_bytes(bytes(data))


def flipped_dcp(tmp: Path, fqn: str = WQ) -> Path:
    folder = dcp_copy(tmp)
    info = _storage(pickle.loads((folder / ".metadata").read_bytes()), fqn)
    flip_in_record(folder / info.relative_path, info.offset, info.length)
    return folder


@pytest.mark.parametrize("args", [(), ("--target", "resume")], ids=["init", "resume"])
def test_dcp_flipped_byte_in_tensor_data_is_refused(args, tmp_path, capsys) -> None:
    """torch's own dcp.load reads the flipped value silently; the chunk's record carries a CRC-32 that says so."""
    import torch.distributed.checkpoint as dcp

    folder = flipped_dcp(tmp_path)
    good = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)["layers.0.attention.wq.weight"]
    state = {"model": {"layers.0.attention.wq.weight": torch.zeros(32, 32)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder))  # our own fixture: trusted
    assert not torch.equal(state["model"]["layers.0.attention.wq.weight"], good)
    code, _, err = check(folder, capsys, *args)
    assert code == 2
    assert_one_line(err, "__0_0.distcp", WQ, "chunk at [0, 0]", "bad CRC-32")


def test_dcp_flipped_byte_in_optimizer_state_is_refused_under_resume(tmp_path, capsys) -> None:
    fqn = "optim.state.layers.0.attention.wq.weight.exp_avg"
    folder = flipped_dcp(tmp_path, fqn)
    code, _, err = check(folder, capsys, "--target", "resume")
    assert code == 2
    assert_one_line(err, "__0_0.distcp", fqn, "bad CRC-32")


@pytest.mark.parametrize("source", ["dcp", "pth"])
def test_convert_reads_rows_with_the_crc_check(source, tmp_path, capsys) -> None:
    """convert reads a chunk of rows at a time: before, only whole-tensor reads checked the CRC, and the
    corrupted value was converted (and 'verified' against the same corrupted read)."""
    if source == "dcp":
        src = flipped_dcp(tmp_path)
    else:
        src = Path(shutil.copy(FIXTURES / "good" / "consolidated.pth", tmp_path / "in.pth"))
        with zipfile.ZipFile(src) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        assert pkl  # the first record is some tensor's: which one the message names is checked below
        flip_in_record(src)
    dst = tmp_path / "out.safetensors"
    code = main(["convert", str(src), str(dst), "--weights-only", "--model-config", LINGUA])
    _, err = capsys.readouterr()
    assert code == 2 and not dst.exists()
    assert_one_line(err, str(src), "bad CRC-32")


def test_the_ranks_reader_checks_the_crc(tmp_path) -> None:
    """The round trip's storage reader (what each rank loads through) refuses the flipped chunk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ckptcheck.roundtrip.storage import SafeLoadPlanner, open_dcp

    folder = flipped_dcp(tmp_path)
    _, reader = open_dcp(folder)
    state = {"model": {"layers.0.attention.wq.weight": torch.zeros(32, 32)}}
    with pytest.raises(CheckpointException, match=r"attention\.wq\.weight: chunk at \[0, 0\]: bad CRC-32"):
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(folder, allow_partial_load=True))


# --- optimizer state values --------------------------------------------------------------------------------

LINGUA_PTH = FIXTURES / "good" / "lingua_consolidated" / "consolidated.pth"
WQ_PARAM = "layers.0.attention.wq.weight"


def _optim(tmp: Path, change: Callable[[dict], None], fmt: str = "pth") -> Path:
    """The lingua fixture (model + AdamW state) re-saved by torch with one optimizer value changed."""
    state = torch.load(LINGUA_PTH, weights_only=True)
    change(state["optim"])
    if fmt == "pth":
        torch.save(state, tmp / "consolidated.pth")
        return tmp / "consolidated.pth"
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    return tmp / "dcp"


def _group(name: str, value: object) -> Callable[[dict], None]:
    return lambda optim: optim["param_groups"][0].__setitem__(name, value)


def _moment(name: str, index: int, value: float) -> Callable[[dict], None]:
    return lambda optim: optim["state"][WQ_PARAM][name].view(-1).__setitem__(index, value)


def _step_of(value: object) -> Callable[[dict], None]:
    return lambda optim: optim["state"][WQ_PARAM].__setitem__("step", torch.tensor(value))


def test_resume_passes_on_the_good_lingua_checkpoint(tmp_path, capsys) -> None:
    """The baseline of the cases below: only the scheduler and data-loader state (never saved here) fail."""
    code, out, err = check(_optim(tmp_path, lambda optim: None), capsys, "--target", "resume")
    assert code == 1 and "FAIL   optimizer" not in out and "FAIL   train_state[scheduler]" in out, out + err


@pytest.mark.parametrize("fmt", ["pth", "dcp"])
@pytest.mark.parametrize(("name", "value", "shown"), [
    ("lr", float("nan"), "lr is nan, not a finite number >= 0"),
    ("lr", float("inf"), "lr is inf"),
    ("lr", -1e-3, "lr is -0.001"),
    ("lr", "0.1", "lr is '0.1'"),
    ("betas", (0.9, 1.0), "betas is (0.9, 1.0), not two numbers in [0, 1)"),
    ("betas", (-0.1, 0.95), "betas is (-0.1, 0.95)"),
    ("eps", 0.0, "eps is 0.0, not a finite number > 0"),
    ("eps", float("nan"), "eps is nan"),
    ("weight_decay", -0.1, "weight_decay is -0.1"),
], ids=["lr-nan", "lr-inf", "lr-negative", "lr-string", "beta-one", "beta-negative", "eps-zero", "eps-nan",
        "weight-decay-negative"])
def test_nan_learning_rate_in_optimizer_state_fails(fmt, name, value, shown, tmp_path, capsys) -> None:
    code, out, _ = check(_optim(tmp_path, _group(name, value), fmt), capsys, "--target", "resume")
    assert code == 1
    assert "FAIL   optimizer_groups[all]" in out and f"optim.param_groups: group 0 {shown}" in out, out


@pytest.mark.parametrize(("value", "shown"), [(float("nan"), "nan"), (-1.0, "-1.0"), (1.5, "1.5")],
                         ids=["nan", "negative", "fraction"])
def test_optimizer_step_that_is_not_a_count_fails(value, shown, tmp_path, capsys) -> None:
    code, out, _ = check(_optim(tmp_path, _step_of(value)), capsys, "--target", "resume")
    assert code == 1
    assert "FAIL   optimizer_step[all]" in out, out
    assert f"{WQ_PARAM}: optimizer step is {shown}, not a whole number >= 0" in out, out


@pytest.mark.parametrize(("name", "value", "shown"), [
    ("exp_avg", float("nan"), "exp_avg holds 1 NaN and 0 Inf values (first at flat index 5)"),
    ("exp_avg_sq", float("inf"), "exp_avg_sq holds 0 NaN and 1 Inf values (first at flat index 5)"),
    ("exp_avg_sq", -1.0, "exp_avg_sq holds 1 negative values"),
], ids=["exp_avg-nan", "exp_avg_sq-inf", "exp_avg_sq-negative"])
def test_nan_in_optimizer_moments_fails(name, value, shown, tmp_path, capsys) -> None:
    code, out, _ = check(_optim(tmp_path, _moment(name, 5, value)), capsys, "--target", "resume")
    assert code == 1
    assert f"FAIL   optimizer_state[{WQ_PARAM}]" in out and f"{WQ_PARAM}: {shown}" in out, out


def test_optimizer_moments_are_not_read_under_metadata_only(tmp_path, capsys) -> None:
    path = _optim(tmp_path, _moment("exp_avg", 5, float("nan")))
    code, out, _ = check(path, capsys, "--target", "resume", "--metadata-only", "-v")
    assert f"PASS   optimizer_state[{WQ_PARAM}]" in out and "FAIL   optimizer" not in out, out


# --- a DCP bytes entry goes through the pickle allocation bound --------------------------------------------

class _Payload:
    """Pickles as ``func(*args)``: how a hostile bytes entry asks for an allocation."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


LIMITED_CHECK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))  # far below the 2 GiB the entry asks for
from ckptcheck.cli import main
from ckptcheck.formats import open_checkpoint
sys.exit(main(["check", sys.argv[1], "--model-config", sys.argv[2], "--target", "resume"]))
"""


def _bytearray_dcp(tmp: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    folder = tmp / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True),
                  "train_state": _Payload(bytearray, 2**31)}, checkpoint_id=str(folder))
    return folder


def test_dcp_bytes_entry_bytearray_2gb_is_refused_under_resume(tmp_path) -> None:
    """bytearray(2**31) in a train_state bytes entry: refused before anything is allocated (run under a
    1.5 GiB address-space limit, so a regression is a failure here, not 2 GiB taken)."""
    folder = _bytearray_dcp(tmp_path)
    proc = subprocess.run([sys.executable, "-c", LIMITED_CHECK, str(folder), LINGUA], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line(proc.stderr, str(folder / "__0_0.distcp"), "train_state", "more than its bytes can hold")


LIMITED_RANK_READ = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from ckptcheck.roundtrip.storage import SafeLoadPlanner, open_dcp
_, reader = open_dcp(sys.argv[1])
state = {"train_state": None}
try:
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(sys.argv[1], allow_partial_load=True))
except CheckpointException as exc:
    print(exc)
    sys.exit(2)
"""


def test_the_ranks_reader_refuses_the_bytearray_2gb_bytes_entry(tmp_path) -> None:
    """What each rank of the round trip loads through: the bytes entry goes through the same allocation
    bound (in a subprocess under a 1.5 GiB address-space limit)."""
    folder = _bytearray_dcp(tmp_path)
    proc = subprocess.run([sys.executable, "-c", LIMITED_RANK_READ, str(folder)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "train_state" in proc.stdout and "more than its bytes can hold" in proc.stdout, proc.stdout


# --- DCP data files: regular files inside the folder ---------------------------------------------------------

@pytest.mark.parametrize("target", ["/dev/zero", "copy-outside"])
def test_dcp_data_file_linked_outside_the_folder_is_unsafe(target, tmp_path, capsys) -> None:
    """A .distcp that is a symlink to /dev/zero (reads never end) or to a real data file elsewhere is not
    this checkpoint's: refused as unsafe before anything is read from it."""
    folder = dcp_copy(tmp_path)
    data = folder / "__0_0.distcp"
    if target == "copy-outside":
        target = str(shutil.move(data, tmp_path / "elsewhere.distcp"))
    else:
        data.unlink()
    data.symlink_to(target)
    code, out, err = check(folder, capsys, "--target", "resume")
    assert code == 1, out + err
    assert "UNSAFE" in out and "outside the checkpoint folder" in out, out


def test_dcp_metadata_linked_outside_the_folder_is_unsafe(tmp_path, capsys) -> None:
    folder = dcp_copy(tmp_path)
    meta = folder / ".metadata"
    moved = shutil.move(meta, tmp_path / "elsewhere.metadata")
    meta.symlink_to(moved)
    code, out, err = check(folder, capsys)
    assert code == 1, out + err
    assert "UNSAFE" in out and "outside the checkpoint folder" in out, out


def test_dcp_fifo_data_file_is_refused_not_waited_on(tmp_path, capsys) -> None:
    import os

    folder = dcp_copy(tmp_path)
    data = folder / "__0_0.distcp"
    data.unlink()
    os.mkfifo(data)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(data), "FIFO")


@pytest.mark.parametrize(("args", "flag"), [(("--atol", "nan"), "--atol"), (("--atol", "-1"), "--atol"),
                                            (("--rtol", "inf"), "--rtol"), (("--forward", "--tokens", "0"), "--tokens"),
                                            (("--forward", "--tokens", str(10**11)), "--tokens")],
                         ids=["atol-nan", "atol-negative", "rtol-inf", "tokens-zero", "tokens-huge"])
def test_diff_arguments_out_of_range_are_one_line(args, flag, capsys) -> None:
    """Before: torch raised on them (exit 3), or the forward pass tried to allocate 800 GB of logits."""
    good = str(FIXTURES / "good" / "consolidated.pth")
    code = main(["diff", good, good, "--model-config", LINGUA, *args])
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_line(err, flag)


def _cells(tmp: Path, duplicate: bool) -> Path:
    """wq stored as 1,024 one-element chunks, each a torch.save blob as DCP writes it (a 32 x 32 grid, more than
    the 512 chunks that are compared pairwise); ``duplicate``: the last cell replaced by a second copy of the
    first."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    with open_checkpoint(FIXTURES / "good" / "dcp") as good:
        wq = good.load("layers.0.attention.wq.weight")
    cells = [(i, j) for i in range(32) for j in range(32)]
    if duplicate:
        cells[-1] = (0, 0)

    def change(meta) -> None:
        meta.state_dict_metadata[WQ].chunks = [ChunkStorageMetadata(torch.Size(c), torch.Size([1, 1])) for c in cells]
        for key in [k for k in meta.storage_data if k.fqn == WQ]:
            del meta.storage_data[key]
        for c, start, blob in zip(cells, starts, blobs, strict=True):
            meta.storage_data[MetadataIndex(WQ, torch.Size(c))] = _StorageInfo("cells.distcp", start, len(blob))
    blobs = []
    for i, j in cells:
        buffer = io.BytesIO()
        torch.save(wq[i:i + 1, j:j + 1].float().clone(), buffer)
        blobs.append(buffer.getvalue())
    starts = [sum(len(b) for b in blobs[:n]) for n in range(len(blobs))]
    folder = edit_metadata(tmp, change)
    (folder / "cells.distcp").write_bytes(b"".join(blobs))
    return folder


def test_dcp_grid_of_1024_chunks_is_read_exactly(tmp_path, capsys) -> None:
    folder = _cells(tmp_path, duplicate=False)
    code, out, err = check(folder, capsys)
    assert code == 0, out + err
    code = main(["diff", str(folder), str(FIXTURES / "good" / "dcp"), "--model-config", LINGUA])
    out, err = capsys.readouterr()
    assert code == 0 and "EQUAL" in out, out + err


def test_dcp_overlapping_chunks_beyond_the_pairwise_limit_are_one_line(tmp_path, capsys) -> None:
    """Before, above 512 chunks only the element count was compared: a duplicate chunk and a gap passed."""
    folder = _cells(tmp_path, duplicate=True)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "chunks at [0, 0] and [0, 0] overlap")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -5, True], ids=["nan", "inf", "negative", "bool"])
def test_train_state_step_that_is_not_a_count_fails(value, tmp_path, capsys) -> None:
    """Before: NaN and Inf raised converting to int (exit 3); -5 and True were taken as steps."""
    state = torch.load(LINGUA_PTH, weights_only=True)
    torch.save({**state, "train_state": {"step": value}}, tmp_path / "c.pth")
    code, out, err = check(tmp_path / "c.pth", capsys, "--target", "resume")
    assert code == 1, out + err
    assert "FAIL   optimizer_step[all]" in out
    assert f"the train state's step is not a whole number >= 0: train_state.step = {value!r}" in out, out


@pytest.mark.parametrize("key", ["²", "١"], ids=["superscript", "arabic-indic"])
def test_optimizer_state_keyed_by_a_non_ascii_digit_is_no_position(key, tmp_path, capsys) -> None:
    """str.isdigit() takes '²' (int() then raised: exit 3) and '١' (read as position 1): a position is ASCII
    digits, so such a key is a name, which names no parameter."""
    state = torch.load(LINGUA_PTH, weights_only=True)
    optim = state["optim"]
    by_position = {str(i): v for i, v in enumerate(optim["state"].values())}
    by_position[key] = by_position.pop("0")
    group = {**optim["param_groups"][0], "params": list(by_position)}
    torch.save({"model": state["model"], "optim": {"state": by_position, "param_groups": [group]}},
               tmp_path / "c.pth")
    code, out, err = check(tmp_path / "c.pth", capsys, "--target", "resume")
    assert code == 1 and "internal error" not in err, out + err
    assert "FAIL   optimizer_state[tok_embeddings.weight]" in out, out
    code = main(["convert", str(tmp_path / "c.pth"), str(tmp_path / "out.pth"), "--model-config", LINGUA])
    out, err = capsys.readouterr()
    assert code == 0, out + err


@pytest.mark.parametrize(("src", "said"), [
    ("model.safetensors", "input integrity: not verifiable, the input keeps no checksum"),
    ("consolidated.pth", "input integrity: a CRC-32 per storage record checked on every read"),
    ("dcp", "input integrity: a CRC-32 per chunk (each a torch.save record) checked on every read"),
])
def test_convert_says_whether_the_input_was_verified(src, said, tmp_path, capsys) -> None:
    """'verified' compares the output with the input as read: it proves nothing about the input itself, so
    the report says what was checked there, and for a format without checksums points to diff."""
    code = main(["convert", str(FIXTURES / "good" / src), str(tmp_path / "out.pth"), "--weights-only",
                 "--model-config", LINGUA])
    out, err = capsys.readouterr()
    assert code in (0, 1), out + err  # 1: the re-check of the output may fail on a naming the config lacks
    assert said in out, out
    if "not verifiable" in said:
        assert f"(ckptcheck diff {FIXTURES / 'good' / src} REFERENCE)" in out


def test_dcp_storage_file_name_too_long_for_the_file_system_is_one_line(tmp_path, capsys) -> None:
    """A 300-character name fits the path limit but not the file system's (ENAMETOOLONG): found by the
    structure-aware fuzzer as an internal error (exit 3)."""
    def change(meta) -> None:
        _storage(meta).relative_path = "x" * 300
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys, "--target", "resume")
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), WQ, "cannot be opened (File name too long)")


def test_dcp_bytes_entry_without_a_storage_entry_is_one_line(tmp_path, capsys) -> None:
    lr = "optim.param_groups.0.lr"

    def change(meta) -> None:
        del meta.storage_data[next(k for k in meta.storage_data if k.fqn == lr)]
    folder = edit_metadata(tmp_path, change)
    code, _, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / ".metadata"), lr, "bytes entry has no storage entry")


def test_dcp_reader_keeps_a_bounded_number_of_parsed_chunks() -> None:
    """Each chunk blob is parsed and CRC-checked once while it is read, but the reader keeps only the last
    MAX_OPEN_ARCHIVES: memory does not grow with the chunk count (the fixture has 84 tensor chunks)."""
    from ckptcheck.formats.dcp import MAX_OPEN_ARCHIVES

    with open_checkpoint(FIXTURES / "good" / "dcp") as ckpt:
        keys = [*ckpt.manifest.tensors, *ckpt.manifest.extra_tensors]
        assert len(keys) > MAX_OPEN_ARCHIVES
        for key in keys:
            ckpt.load(key)
        assert len(ckpt._archives) == MAX_OPEN_ARCHIVES


def test_dcp_of_many_data_files_keeps_a_bounded_number_open(tmp_path, capsys) -> None:
    """One data file per chunk (as thousands of ranks write): the reader keeps at most MAX_OPEN_FILES open,
    however many there are, and reads every tensor right (compared with the fixture through diff)."""
    from ckptcheck.formats.dcp import MAX_OPEN_FILES

    folder = dcp_copy(tmp_path)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    data = (folder / "__0_0.distcp").read_bytes()
    for n, info in enumerate(meta.storage_data.values()):
        (folder / f"__{n}_0.distcp").write_bytes(data[info.offset:info.offset + info.length])
        info.relative_path, info.offset = f"__{n}_0.distcp", 0
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    assert len(meta.storage_data) > MAX_OPEN_FILES
    with open_checkpoint(folder) as ckpt:
        for key in [*ckpt.manifest.tensors, *ckpt.manifest.extra_tensors]:
            ckpt.load(key)
            assert len(ckpt._handles) <= MAX_OPEN_FILES
        assert len(ckpt._handles) == MAX_OPEN_FILES
    code = main(["diff", str(folder), str(FIXTURES / "good" / "dcp"), "--model-config", LINGUA])
    out, err = capsys.readouterr()
    assert code == 0 and "EQUAL" in out, out + err
