"""Issue 11, round two (F1): what the readers' first round left.  Every test goes through the CLI and asserts the
exit status and the one line, with torch or safetensors as the oracle where the issue names one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptcheck.cli import main

from .writers import FIXTURES, torch_refuses

MP = FIXTURES / "good" / "meta_mp"
HF = FIXTURES / "good" / "hf"
OPCODES = "FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL"


def fails(out: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if line.startswith("FAIL ")]


# -- 1. shard sets merge every fact that bears on a verdict ---------------------------------------------------


def _protocol_4(path: Path) -> None:
    torch.save(torch.load(path, weights_only=True), path, pickle_protocol=4)
    assert "Unsupported operand" in (torch_refuses(path) or "")


def _hf_bin_shards(tmp_path: Path) -> Path:
    """The hf fixture as a two-file pytorch_model.bin shard set."""
    folder = tmp_path / "hf_bin"
    folder.mkdir()
    shutil.copy(HF / "config.json", folder)
    tensors = load_file(HF / "model.safetensors")
    keys = sorted(tensors)
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, half in zip(names, halves):
        torch.save({k: tensors[k] for k in half}, folder / name)
    weight_map = {k: name for name, half in zip(names, halves) for k in half}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shard", [0, 1])
def test_shard_set_keeps_weights_only_opcodes_of_meta_shards(tmp_path: Path, shard: int,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = Path(shutil.copytree(MP, tmp_path / "mp"))
    _protocol_4(folder / f"consolidated.{shard:02d}.pth")
    assert main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert fails(out) == ["version[weights_only_opcodes]"], out
    assert f"its pickle uses the opcodes {OPCODES}, which torch's weights_only unpickler does not read" in out


@pytest.mark.parametrize("shard", [0, 1])
def test_shard_set_keeps_weights_only_opcodes_of_hf_bin_shards(tmp_path: Path, shard: int,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = _hf_bin_shards(tmp_path)
    assert main(["check", str(folder)]) == 0, capsys.readouterr()
    _protocol_4(folder / f"pytorch_model-0000{shard + 1}-of-00002.bin")
    assert main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "version[weights_only_opcodes]" in fails(out), out
    assert f"its pickle uses the opcodes {OPCODES}, which torch's weights_only unpickler does not read" in out


# -- 2. loops over rows bounded by bytes ------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI in a real process, memory-limited; the timeout only ends a regression (2**36 empty reads)."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
        "from ckptcheck.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _meta_with(tmp_path: Path, extra: dict[str, torch.Tensor]) -> Path:
    folder = Path(shutil.copytree(MP, tmp_path / "mp"))
    for shard in folder.glob("consolidated.*.pth"):
        torch.save({**torch.load(shard, weights_only=True), **extra}, shard)
    return folder


def test_zero_byte_rows_are_compared_in_one_step_not_row_by_row(tmp_path: Path) -> None:
    """A replicated [2**62, 0] tensor and a split [2**61, 0] one: 2**36 empty reads each before."""
    folder = _meta_with(tmp_path, {"extra.weight": torch.empty(2**62, 0),
                                   "layers.0.attention.wq.weight": torch.empty(2**61, 0)})
    code, out, err = run_cli("check", str(folder), "-v")
    assert code == 1 and "Traceback" not in err, err
    assert "PASS   replicas[extra.weight]" in out and "PASS   replicas[layers.0.attention.wq.weight]" in out


def test_split_slices_adding_past_int64_are_refused(tmp_path: Path) -> None:
    folder = _meta_with(tmp_path, {"layers.0.attention.wq.weight": torch.empty(2**62, 0)})
    code, _out, err = run_cli("check", str(folder))
    assert code == 2 and err.count("\n") == 1, err
    assert (f"{folder}: layers.0.attention.wq.weight: its slices add up to {2**63} along the split dimension 0: "
            "more than a tensor dimension holds (2**63 - 1)") in err


def test_zero_byte_tied_copy_is_compared_in_one_step_not_row_by_row(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    torch.save({**state, "tok_embeddings.weight": torch.empty(2**62, 0), "output.weight": torch.empty(2**62, 0)},
               path)
    code, out, err = run_cli("check", str(path), "--model-config", str(FIXTURES / "configs" / "lingua_tied_params.json"))
    assert code == 1 and "Traceback" not in err, err
    assert "FAIL   shape[tok_embeddings.weight]" in out, out


# -- 3. convert's pre-flight: nothing written that cannot be written whole ------------------------------------

LINGUA = FIXTURES / "configs" / "lingua_params.json"


def _with_extra(path: Path, tensor: torch.Tensor, key: str = "extra") -> Path:
    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    torch.save({**state, key: tensor}, path)
    return path


def test_repeated_view_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A 70 KB file holding a stride-0 view of 2**62 elements: refused from the manifest, with how to write it."""
    src = _with_extra(tmp_path / "view.pth", torch.ones(1, 1).expand(2**31, 2**31))
    out = tmp_path / "out"
    out.mkdir()
    code, _out, err = run_cli("convert", str(src), str(out / "model.safetensors"), "--model-config", str(LINGUA))
    assert code == 2 and err.count("\n") == 1, err
    assert (f"{src}: extra: repeats its stored values along dims [0, 1] (stride 0 or overlapping "
            "strides): copying it would write all "
            f"{2**62:,} elements; to write them, re-save it with tensor.clone() before torch.save") in err
    assert list(out.iterdir()) == []


def test_output_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A sparse safetensors file whose extra tensor is 2**40 bf16 elements (2 TiB) to write.  (An overlapping
    view no longer serves: it is refused as aliasing before this check.)"""
    state = {k: t.float() for k, t in torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True).items()}
    header, offset = {}, 0
    for key, t in state.items():
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["extra"] = {"dtype": "BF16", "shape": [2**20, 2**20], "data_offsets": [offset, offset + 2**41]}
    blob = json.dumps(header).encode()
    src = tmp_path / "sparse.safetensors"
    with open(src, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + b"".join(t.numpy().tobytes() for t in state.values()))
        f.truncate(8 + len(blob) + offset + 2**41)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model.safetensors"
    code, _out, err = run_cli("convert", str(src), str(dst), "--model-config", str(LINGUA))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{dst}: the output needs " in err and f"bytes of tensor data but the file system holding {out} has" in err
    assert list(out.iterdir()) == []


def test_repeated_rotary_buffer_is_refused_before_it_is_materialized(tmp_path: Path) -> None:
    """A dropped freqs_cis is compared with the config's: a stride-0 [2**31, 4, 2] view was copied whole (64 GB)."""
    src = _with_extra(tmp_path / "freqs.pth", torch.ones(1, 1, 2).expand(2**31, 4, 2), "freqs_cis")
    code, _out, err = run_cli("convert", str(src), str(tmp_path / "out.safetensors"), "--model-config", str(LINGUA))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{src}: freqs_cis: repeats its stored values along dims [0, 1] (stride 0)" in err


# -- 4. integrity verifies what the other checks read without reading it again --------------------------------


def test_check_reads_each_data_byte_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """finite reads every weight; integrity then verifies each record's CRC-32 without reading it again
    (it read all of them a second time: twice the data I/O).  Counted in bytes read, not timed."""
    from ckptcheck.iostats import bytes_read

    vocab = 1 << 17
    state = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)
    state["tok_embeddings.weight"] = torch.randn(vocab, 32).bfloat16()
    state["output.weight"] = torch.randn(vocab, 32).bfloat16()
    torch.save(state, tmp_path / "model.pth")
    config = json.loads(LINGUA.read_text())
    config["model"]["vocab_size"] = vocab
    (tmp_path / "params.json").write_text(json.dumps(config))
    data = sum(t.nbytes for t in state.values())
    before = bytes_read()
    if before is None:
        pytest.skip("the kernel does not report bytes read (/proc/self/io)")
    assert main(["check", str(tmp_path / "model.pth"), "--model-config", str(tmp_path / "params.json"), "-v"]) == 0
    read = bytes_read() - before
    out = capsys.readouterr().out
    assert "PASS   integrity[data]" in out and "PASS   finite[tok_embeddings.weight]" in out, out
    assert data <= read < 1.25 * data, (read, data)


# -- 5. a tensor torch cannot make is refused before it is written, never written then refused ----------------


def _zero_element_safetensors(path: Path) -> Path:
    """The hf fixture plus an F32 [0, 2**62, 4] tensor (no bytes): the safetensors library loads it."""
    raw = (HF / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["extra"] = {"dtype": "F32", "shape": [0, 2**62, 4], "data_offsets": [end, end]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    assert load_file(path)["extra"].shape == (0, 2**62, 4)
    return path


@pytest.mark.parametrize("to", ["torch", "dcp"])
def test_zero_element_tensor_torch_cannot_make_is_refused_before_writing(tmp_path: Path, to: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = _zero_element_safetensors(tmp_path / "in.safetensors")
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), "--to", to, "--model-config", str(HF / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
    assert (f"{src}: extra: shape [0, {2**62}, 4] needs strides past 64 bits, which no torch tensor holds: "
            f"write it to safetensors (--to safetensors), not {to}") in err


def test_zero_element_tensor_converts_to_safetensors(tmp_path: Path) -> None:
    src = _zero_element_safetensors(tmp_path / "in.safetensors")
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst), "--model-config", str(HF / "config.json")]) == 0
    assert load_file(dst)["extra"].shape == (0, 2**62, 4)


# -- 6. finite reports positions in the tensor as the user indexes it ----------------------------------------


def test_finite_index_of_a_stride_0_view_is_its_index_in_the_view(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A [128, 1] column repeated along dim 1 (stride 0), NaN in row 3: the first NaN is at flat index
    3 * 32 = 96 of the tensor torch.load returns, not at 3 (its place among the stored elements)."""
    column = torch.ones(128, 1, dtype=torch.bfloat16)
    column[3, 0] = float("nan")
    path = _with_extra(tmp_path / "model.pth", column.expand(128, 32), "tok_embeddings.weight")
    loaded = torch.load(path, weights_only=True)["tok_embeddings.weight"]
    assert loaded.stride() == (1, 0) and int(loaded.isnan().reshape(-1).nonzero()[0, 0]) == 96
    assert main(["check", str(path), "--model-config", str(LINGUA)]) == 1
    out = capsys.readouterr().out
    assert "FAIL   finite[tok_embeddings.weight]" in out
    assert "tok_embeddings.weight holds 1 NaN and 0 Inf values (first at flat index 96)" in out, out


# -- 7. files found in a checkpoint folder stay inside it, as shards do ----------------------------------------

DCP = FIXTURES / "good" / "dcp"


def _linked_out(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """The DCP fixture with ``name`` a symlink to a file outside its folder (the same JSON, moved out)."""
    folder = Path(shutil.copytree(DCP, tmp_path / "dcp"))
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if (folder / name).exists():
        (folder / name).rename(outside)
    else:
        outside.write_text('{"step": 1}')
    (folder / name).symlink_to(outside)
    return folder, outside


def test_train_state_linked_out_of_the_folder_is_unsafe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, outside = _linked_out(tmp_path, "train_state_00000.json")
    assert main(["check", str(folder), "--model-config", str(LINGUA), "--target", "resume"]) == 1
    out = capsys.readouterr().out
    assert "UNSAFE optimizer_step[all]" in out, out
    assert f"{folder}/train_state_00000.json: leads to {outside}, outside the checkpoint folder {folder}" in out
    assert main(["convert", str(folder), str(tmp_path / "out.dcp"), "--to", "dcp"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out.dcp").exists()
    assert f"unsafe: {folder}/train_state_00000.json: leads to {outside}, outside the checkpoint folder" in err


def test_config_found_beside_linked_out_of_the_folder_is_unsafe(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder, outside = _linked_out(tmp_path, "params.json")
    assert main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"UNSAFE safety[{folder}/params.json]" in out, out
    assert f"{folder}/params.json: leads to {outside}, outside the checkpoint folder {folder}: refused" in out


def test_a_shard_holding_what_the_index_maps_elsewhere_or_leaves_out(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """transformers' from_pretrained loads every shard file whole: a copy of lm_head.weight (zeros) added to the
    other shard is what the model ends with, and a tensor the index does not list is loaded too.  Both passed,
    since only the index's mapping was read; now the copy is one line (exit 2) and the unlisted tensor is part
    of the checkpoint (an unexpected key: exit 1)."""
    from safetensors.torch import save_file

    index = json.loads((FIXTURES / "good" / "hf_sharded" / "model.safetensors.index.json").read_text())
    home = index["weight_map"]["lm_head.weight"]
    other = next(name for name in set(index["weight_map"].values()) if name != home)
    for case in ("copy", "unlisted"):
        folder = tmp_path / case
        shutil.copytree(FIXTURES / "good" / "hf_sharded", folder)
        shard = load_file(folder / other)
        head = load_file(folder / home)["lm_head.weight"]
        key = "lm_head.weight" if case == "copy" else "extra.weight"
        save_file({**shard, key: torch.zeros_like(head)}, folder / other)
        assert key in load_file(folder / other)  # what a loader reading the shard whole gets
        capsys.readouterr()
        if case == "copy":
            assert main(["check", str(folder)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"ckptcheck: error: {folder / other}: lm_head.weight: also held by {home}, where "
                           "model.safetensors.index.json maps it: loaders that read every shard whole keep whichever "
                           "copy they read last"]
        else:
            assert main(["check", str(folder), "-v"]) == 1
            assert any(line.startswith("FAIL") and "extra.weight" in line
                       for line in capsys.readouterr().out.splitlines())
