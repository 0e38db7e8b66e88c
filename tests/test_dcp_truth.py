"""Issue 11, engineer I: what the attack on DCP, files, shard sets and convert found.  Every input is real
``dcp.save`` / ``torch.save`` output (the bundled fixtures) altered with torch's own classes, judged through
the CLI as a user runs it, and, where torch decides, against torch's own reader."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
from torch.distributed.checkpoint.metadata import MetadataIndex

from ckptcheck.cli import main

from .writers import FIXTURES
from .test_bounds_dcp import WQ, assert_one_line, check, edit_metadata


def rename_tensor(old: str, new: str):
    """A metadata change: the tensor ``old`` is called ``new`` everywhere the .metadata names it."""
    def change(meta) -> None:
        meta.state_dict_metadata[new] = meta.state_dict_metadata.pop(old)
        meta.storage_data = {(MetadataIndex(new, k.offset, k.index) if k.fqn == old else k): v
                             for k, v in meta.storage_data.items()}
        if meta.planner_data:
            meta.planner_data.pop(old)
            meta.planner_data[new] = ("model", new[len("model."):])
    return change


def flip_tensor_data(folder: Path, fqn: str) -> None:
    """Flip one byte of the tensor data of ``fqn``'s first chunk (inside the torch.save record, so only the
    CRC-32 tells)."""
    meta = pickle.loads((folder / ".metadata").read_bytes())  # our fixture: trusted
    info = next(v for k, v in meta.storage_data.items() if k.fqn == fqn)
    path = folder / info.relative_path
    data = bytearray(path.read_bytes())
    blob = bytes(data[info.offset:info.offset + info.length])
    record = next(z for z in zipfile.ZipFile(io.BytesIO(blob)).infolist() if "/data/" in z.filename)
    name_len, extra_len = struct.unpack("<HH", blob[record.header_offset + 26:record.header_offset + 30])
    data[info.offset + record.header_offset + 30 + name_len + extra_len] ^= 0x01
    path.write_bytes(bytes(data))


def test_name_with_newline_and_ansi_escape_stays_one_escaped_line(tmp_path, capsys):
    folder = edit_metadata(tmp_path, rename_tensor(WQ, WQ + "\n\x1b[31mFAKE: all good"))
    flip_tensor_data(folder, WQ + "\n\x1b[31mFAKE: all good")
    code, out, err = check(folder, capsys, "--target", "resume")
    assert code == 2
    assert_one_line(err, "\\x0a\\x1b[31mFAKE")
    assert "\x1b" not in out + err


def test_lone_surrogate_in_a_dcp_key_is_printed_escaped_not_exit_3(tmp_path, capsys):
    folder = edit_metadata(tmp_path, rename_tensor(WQ, WQ + "\ud800"))
    code, out, err = check(folder, capsys)
    assert code == 1, err
    assert "internal error" not in err
    assert "\\ud800" in out + err
    (out + err).encode("utf-8")


def test_lone_surrogate_escape_in_a_safetensors_header_is_refused_like_safetensors(tmp_path, capsys):
    from safetensors import SafetensorError, safe_open
    header = json.dumps({"tok_embeddings.weight\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    raw = header.replace("\\\\ud800", "\\ud800").encode()
    path = tmp_path / "sur.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(SafetensorError, match="invalid JSON"):
        safe_open(str(path), "pt")
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert_one_line(err, str(path), "header", "lone surrogate", "\\ud800")


def save_adamw_dcp(folder: Path, betas: tuple[float, float]) -> tuple[object, object]:
    """A real dcp.save of the fixture model and an AdamW stepped twice with 0-dim tensor betas."""
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = nn.Module()
    for key, value in torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True).items():
        *mods, leaf = key.split(".")
        module = root
        for name in mods:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(value.float().clone()))
    opt = torch.optim.AdamW(root.parameters(), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    for _ in range(2):
        sum((p ** 2).sum() for p in root.parameters()).backward()
        opt.step()
    opt.param_groups[0]["betas"] = tuple(torch.tensor(b) for b in betas)  # AdamW refuses 1.5 only when built
    model_state, optim_state = get_state_dict(root, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    shutil.copy(FIXTURES / "good" / "dcp" / "params.json", folder)
    (folder / "train_state_00000.json").write_text(json.dumps(
        {"step": 2, "acc_step": 0, "data_loader_state": {}, "scheduler": {"last_epoch": 2}}))
    return root, opt


@pytest.mark.parametrize(("betas", "code"), [((0.9, 0.999), 0), ((0.9, 1.5), 1)])
def test_tensor_betas_are_read_through_their_data(tmp_path, capsys, betas, code):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    folder = tmp_path / "dcp"
    root, opt = save_adamw_dcp(folder, betas)
    state = dict(zip(("model", "optim"), get_state_dict(root, opt), strict=True))
    dcp.load(state, checkpoint_id=str(folder))  # torch's own reader resumes it: the judge
    got = main(["check", str(folder), "--target", "resume"])
    out, err = capsys.readouterr()
    assert got == code, out
    if code:
        assert "group 0 betas is (0.89999997" in out and "1.5), not two numbers in [0, 1)" in out


def test_meta_shards_named_out_of_meta_order_are_refused(tmp_path, capsys):
    """Four real shards named 00, 01, 002, 03: int() orders them 0..3, Meta's loader gives rank 1 '002'."""
    import torch

    from ckptcheck.formats.meta_shards import split_dim
    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    folder = tmp_path / "shards"
    folder.mkdir()
    names = ["consolidated.00.pth", "consolidated.01.pth", "consolidated.002.pth", "consolidated.03.pth"]
    for rank, name in enumerate(names):
        torch.save({k: v.clone() if (d := split_dim(k, tuple(v.shape), 32, 4)) is None else v.chunk(4, d)[rank].clone()
                    for k, v in state.items()}, folder / name)
    assert sorted(folder.glob("*.pth"))[1].name == "consolidated.002.pth"  # Meta's loader, llama/generation.py
    code = main(["check", str(folder), "--model-config", str(FIXTURES / "good" / "meta_mp" / "params.json")])
    out, err = capsys.readouterr()
    assert code == 2
    assert_one_line(err, str(folder / "consolidated.002.pth"), "numbered 2", "loads it as rank 1")


def test_other_pth_beside_meta_shards_is_refused(tmp_path, capsys):
    import shutil

    import torch
    folder = tmp_path / "meta_mp"
    shutil.copytree(FIXTURES / "good" / "meta_mp", folder)
    torch.save({}, folder / "extra.pth")
    code = main(["check", str(folder)])
    out, err = capsys.readouterr()
    assert code == 2
    assert_one_line(err, str(folder / "extra.pth"), "beside model-parallel shards", "load it as a shard")


def _torch_reader_refuses(folder: Path) -> None:
    """torch's own verdict: dcp.load's default FileSystemReader reads every key of the folder."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    with pytest.raises(CheckpointException, match="torch.load|load"):
        _load_state_dict_from_keys(checkpoint_id=str(folder))


def test_dcp_tensor_chunk_of_raw_bytes_is_refused_as_torch_refuses_it(tmp_path, capsys):
    """wq's chunk replaced by its raw bytes (the metadata pointing at them): FileSystemReader torch.load()s it."""
    from ckptcheck.formats import open_checkpoint
    with open_checkpoint(FIXTURES / "good" / "dcp") as good:
        raw = good.load("layers.0.attention.wq.weight").contiguous().numpy().tobytes()
    places = {}

    def change(meta) -> None:
        key = next(k for k in meta.storage_data if k.fqn == WQ)
        info = meta.storage_data[key]
        places["file"] = info.relative_path
        info.offset, info.length = places["start"], len(raw)
    places["start"] = (FIXTURES / "good" / "dcp" / "__0_0.distcp").stat().st_size
    folder = edit_metadata(tmp_path, change)
    assert places["file"] == "__0_0.distcp"
    with open(folder / places["file"], "ab") as f:
        f.write(raw)
    _torch_reader_refuses(folder)
    code, out, err = check(folder, capsys)
    assert code == 2
    assert_one_line(err, str(folder / "__0_0.distcp"), WQ, f"(byte {places['start']}) is not a torch.save blob",
                    "FileSystemReader")


def test_dcp_saved_as_safetensors_is_named_not_called_overlapping(tmp_path, capsys):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat
    folder = tmp_path / "st"
    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    dcp.save({"model": state}, storage_writer=FileSystemWriter(
        str(folder), serialization_format=SerializationFormat.SAFETENSORS))
    _torch_reader_refuses(folder)
    code = main(["check", str(folder), "--model-config", str(FIXTURES / "good" / "meta_mp" / "params.json")])
    out, err = capsys.readouterr()
    assert code == 2
    assert_one_line(err, str(folder / "__0_0.distcp"), "a safetensors file", "SerializationFormat.SAFETENSORS",
                    "FileSystemReader")
    assert "overlap" not in err


def test_init_optimizer_state_repair_says_it_leaves_the_train_state_and_counts_what_still_fails(tmp_path, capsys):
    """The input passes train_state and fails optimizer_groups (betas 1.5); the fresh optimizer leaves the train
    state behind, which the plan says and the re-check summary counts and names (it said only '... pass')."""
    src, dst = tmp_path / "dcp", tmp_path / "out"
    save_adamw_dcp(src, (0.9, 1.5))
    assert main(["check", str(src), "--target", "resume"]) == 1
    out, _ = capsys.readouterr()
    assert "FAIL   optimizer_groups[all]" in out and "FAIL   train_state" not in out, out
    assert "--init-optimizer-state  (writes fresh AdamW state at step 0 and leaves the train state behind" in out
    code = main(["repair", str(src), str(dst), "--target", "resume", "--init-optimizer-state"])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "repair: leave the train state behind (train_state_00000.json: its step disagrees with the fresh " \
           "optimizer's step 0), so the output has no scheduler or data-loader state" in out, out
    line = next(x for x in out.splitlines() if x.startswith("re-checked"))
    assert line.endswith("; 2 fail: train_state[scheduler], train_state[data_loader]"), line


def test_symlink_out_of_the_folder_is_unsafe_with_a_why_about_paths(tmp_path, capsys):
    import shutil
    folder = tmp_path / "dcp"
    shutil.copytree(FIXTURES / "good" / "dcp", folder)
    (folder / "__0_0.distcp").rename(tmp_path / "outside.distcp")
    (folder / "__0_0.distcp").symlink_to(tmp_path / "outside.distcp")
    code = main(["check", str(folder)])
    out, _ = capsys.readouterr()
    assert code == 1
    assert f"UNSAFE safety[{folder / '__0_0.distcp'}]" in out
    why = next(x for x in out.splitlines() if x.strip().startswith("why:"))
    assert "a path that leads outside the checkpoint folder makes the loader read files the checkpoint does not own" \
        in why, why


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_lone_surrogate_in_a_key_is_written_escaped_to_a_report_file(tmp_path, capsys, suffix):
    """The report files were written as UTF-8 without escaping: a lone surrogate in a key was exit 3."""
    folder = edit_metadata(tmp_path, rename_tensor(WQ, WQ + "\ud800"))
    report = tmp_path / f"r{suffix}"
    code = main(["report", str(folder), "--model-config", str(FIXTURES / "good" / "meta_mp" / "params.json"),
                 "-o", str(report)])
    _, err = capsys.readouterr()
    assert code == 1, err
    assert "\\ud800" in report.read_text(encoding="utf-8")


def test_pickle_of_empty_list_opcodes_is_refused_before_it_allocates(tmp_path, capsys):
    """A real torch.save of {"x": []} whose list is spliced into 300,000 EMPTY_LIST opcodes, one byte each:
    300 KB of pickle made 300,000 lists (a 10 MB one took over 2 GB).  Refused by the memory its objects
    would take, counted on the opcodes before loading."""
    import torch
    buffer = io.BytesIO()
    torch.save({"x": []}, buffer)
    source = zipfile.ZipFile(buffer)
    name = next(n for n in source.namelist() if n.endswith("data.pkl"))
    pkl = source.read(name)
    at = pkl.index(b"]")
    pkl = pkl[:at] + b"](" + b"]" * 300_000 + b"e" + pkl[at + 1:]
    path = tmp_path / "amp.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            out.writestr(info.filename, pkl if info.filename == name else source.read(info.filename))
    assert len(torch.load(path, weights_only=True)["x"]) == 300_000  # torch builds every one
    code = main(["inspect", str(path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_line(err, str(path), "data.pkl", "the pickle makes objects of more than",
                    "far more than a checkpoint makes: refused before loading it")
