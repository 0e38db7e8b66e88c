"""Conversions: every format into every other and back, bit for bit, and each output readable by the
library that owns the format (torch.load, safetensors, dcp.load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptcheck.configs import load_config
from ckptcheck.convert.api import OUTPUT_FORMATS, convert
from ckptcheck.diff import diff
from ckptcheck.formats import open_checkpoint

from .writers import CONFIGS, FORMATS, named, write

LINGUA = CONFIGS / "lingua_params.json"
SUFFIX = {"torch": "out.pth", "safetensors": "out.safetensors", "dcp": "out_dcp", "hf": "out_hf"}
BACK = {"torch": "torch", "lingua-torch": "torch", "meta-shards": "torch", "safetensors": "safetensors",
        "safetensors-sharded": "hf", "dcp": "dcp", "hf": "hf"}


@pytest.mark.parametrize("to", OUTPUT_FORMATS)
@pytest.mark.parametrize("src_fmt", list(FORMATS))
def test_every_format_into_every_other_and_back(src_fmt: str, to: str, tiny_cfg, tiny_state, tmp_path: Path) -> None:
    state = named(tiny_state, FORMATS[src_fmt], tiny_cfg)
    src = write(src_fmt, state, tmp_path / "src")
    mid = tmp_path / SUFFIX[to]
    convert(src, mid, to=to, config=LINGUA, head_dim=8)  # the fixtures' split, which no witness shows
    back_fmt = BACK[src_fmt]
    back = tmp_path / ("back_" + SUFFIX[back_fmt])
    naming = "hf" if FORMATS[src_fmt].name == "hf" else "meta"
    convert(mid, back, to=back_fmt, naming=None if back_fmt == "hf" else naming, config=LINGUA, head_dim=8)
    with open_checkpoint(back) as ckpt:
        assert set(ckpt.manifest.tensors) == set(state)
        for key, t in state.items():
            assert torch.equal(ckpt.load(key).view(torch.int16), t.view(torch.int16)), key
    assert diff(src, mid, config=LINGUA).equal


def test_outputs_load_with_the_owning_libraries(tiny_state, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    src = Path(__file__).parent.parent / "fixtures" / "good" / "consolidated.pth"
    convert(src, tmp_path / "a.pth")
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "a.pth", weights_only=True, mmap=mmap)
        assert all(torch.equal(loaded[k], v) for k, v in tiny_state.items())
    convert(src, tmp_path / "a.safetensors")
    assert all(torch.equal(load_file(tmp_path / "a.safetensors")[k], v) for k, v in tiny_state.items())
    convert(src, tmp_path / "dcp", to="dcp", config=LINGUA)
    target = {"model": {k: torch.empty_like(v) for k, v in tiny_state.items()}}
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert all(torch.equal(target["model"][k], v) for k, v in tiny_state.items())
    assert load_config(tmp_path / "dcp" / "params.json").schema == "lingua"


def test_large_tensors_are_chunked_in_dcp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big tensors become several DCP chunks (bounded memory), and DCP reassembles them."""
    import torch.distributed.checkpoint as dcp

    from ckptcheck.convert import stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 4096)
    state = {"big": torch.randn(300, 40), "small": torch.randn(3)}
    torch.save(state, tmp_path / "s.pth")
    convert(tmp_path / "s.pth", tmp_path / "d", to="dcp")
    from ckptcheck.formats.dcp import read_metadata

    items, _ = read_metadata(tmp_path / "d")
    assert len(items["model.big"].chunks) > 1
    target = {"model": {k: torch.empty_like(v) for k, v in state.items()}}
    dcp.load(target, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    assert torch.equal(target["model"]["big"], state["big"])


def test_tied_weights_stay_shared_in_torch_and_dropped_in_safetensors(tmp_path: Path) -> None:
    emb = torch.randn(16, 4)
    torch.save({"tok_embeddings.weight": emb, "output.weight": emb, "norm.weight": torch.ones(4)}, tmp_path / "t.pth")
    convert(tmp_path / "t.pth", tmp_path / "u.pth")
    loaded = torch.load(tmp_path / "u.pth", weights_only=True)
    assert loaded["output.weight"].data_ptr() == loaded["tok_embeddings.weight"].data_ptr()
    report = convert(tmp_path / "t.pth", tmp_path / "u.safetensors")
    assert [d[0] for d in report.dropped] == ["output.weight"]


def test_dtype_cast_reports_precision_loss(tmp_path: Path) -> None:
    torch.save({"w": torch.tensor([1.0, 1.0 + 2**-12, 3.14159, 1e-3])}, tmp_path / "f.pth")
    report = convert(tmp_path / "f.pth", tmp_path / "b.pth", dtype="bf16")
    assert report.summary["cast"] == 1
    stats = report.precision["w"]
    assert stats["changed"] == 3 and stats["elements"] == 4
    assert 0 < stats["max_abs_error"] < 0.01
    assert torch.load(tmp_path / "b.pth", weights_only=True)["w"].dtype == torch.bfloat16
    widened = convert(tmp_path / "b.pth", tmp_path / "f32.pth", dtype="fp32")
    assert widened.precision == {}  # widening loses nothing, and is not measured


def test_precision_note_names_the_tensor_whose_nan_payload_changed(tmp_path: Path) -> None:
    """A NaN has no absolute error: a rewritten payload is named as such, in the tensor that holds it, not
    reported as "largest absolute error 0" in whichever tensor came first."""
    payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)  # survives no bf16 cast
    torch.save({"a": torch.tensor([0.5, 2.0]), "b": torch.cat([torch.ones(2), payload])}, tmp_path / "f.pth")
    report = convert(tmp_path / "f.pth", tmp_path / "b.pth", dtype="bf16")
    assert {k: (v["changed"], v["nan_payloads_changed"]) for k, v in report.precision.items()} == {
        "a": (0, 0), "b": (1, 1)}
    line = next(x for x in report.lines() if x.startswith("  precision"))
    assert line == "  precision: the cast changed 1 of 5 values; 1 NaN payload(s) rewritten (in b)", line
    torch.save({"a": torch.tensor([0.5, 1.0 + 2**-12]), "b": torch.cat([torch.ones(2), payload])}, tmp_path / "g.pth")
    line = next(x for x in convert(tmp_path / "g.pth", tmp_path / "c.pth", dtype="bf16").lines() if x.startswith("  precision"))
    assert line == ("  precision: the cast changed 2 of 5 values; largest absolute error 0.000244 (in a); "
                    "1 NaN payload(s) rewritten (in b)"), line


def test_hf_naming_and_layout(tiny_cfg, tiny_state, tmp_path: Path) -> None:
    src = Path(__file__).parent.parent / "fixtures" / "good" / "consolidated.pth"
    report = convert(src, tmp_path / "hf", to="hf", config=LINGUA, head_dim=8)
    assert report.summary["permuted"] == 2 * tiny_cfg.n_layers
    with open_checkpoint(tmp_path / "hf") as ckpt:
        expected = named(tiny_state, FORMATS["hf"], tiny_cfg)
        for key, t in expected.items():
            assert torch.equal(ckpt.load(key), t)
    assert load_config(tmp_path / "hf" / "config.json").schema == "hf"


def test_hf_output_is_sharded_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptcheck.convert import writers

    monkeypatch.setattr(writers, "HF_SHARD_BYTES", 20_000)
    src = Path(__file__).parent.parent / "fixtures" / "good" / "consolidated.pth"
    convert(src, tmp_path / "hf", to="hf", config=LINGUA, head_dim=8)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert diff(src, tmp_path / "hf", config=LINGUA).equal


def test_shard_split_and_merge_round_trip(tiny_state, tmp_path: Path) -> None:
    from ckptcheck.synth import write_meta_shards

    for shards, llama3 in ((2, False), (4, True)):
        folder = tmp_path / f"mp{shards}"
        folder.mkdir()
        write_meta_shards(tiny_state, folder, shards, llama3=llama3)
        convert(folder, tmp_path / f"merged{shards}.pth")
        merged = torch.load(tmp_path / f"merged{shards}.pth", weights_only=True)
        assert all(torch.equal(merged[k], v) for k, v in tiny_state.items())


@pytest.mark.parametrize("nesting", [None, "model"])
def test_dcp_into_dcp_keeps_the_source_nesting_and_rechecks_it(nesting: str | None, tiny_cfg, tiny_state,
                                                                tmp_path: Path) -> None:
    """A torchtitan 0.5+ step folder (model keys at the top level) stays flat, a lingua one nested; the
    re-check judges the output by the framework whose layout the source has, so a changed layout fails."""
    import torch.distributed.checkpoint as dcp

    from ckptcheck.cli import main
    from ckptcheck.naming import META, TITAN
    from ckptcheck.synth import in_scheme

    state = in_scheme(tiny_state, TITAN if nesting is None else META, tiny_cfg)
    dcp.save({nesting: state} if nesting else state, checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    report = convert(tmp_path / "step-1", tmp_path / "out", to="dcp", config=LINGUA)
    target = "torchtitan" if nesting is None else "lingua_init"
    assert report.nesting == nesting
    assert report.recheck is not None and report.recheck["target"] == target and not report.recheck["failed"]
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert ckpt.manifest.nesting == nesting
    assert main(["check", str(tmp_path / "out"), "--model-config", str(LINGUA), "--target", target,
                 "--metadata-only"]) == 0


def test_recheck_fails_an_output_whose_layout_is_not_the_sources(tiny_cfg, tiny_state, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a flat torchtitan step folder written nested, the re-check says so (it once judged naming only)."""
    import torch.distributed.checkpoint as dcp

    from ckptcheck.convert import api
    from ckptcheck.naming import TITAN
    from ckptcheck.synth import in_scheme

    dcp.save(in_scheme(tiny_state, TITAN, tiny_cfg), checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    layout = api._target_layout
    monkeypatch.setattr(api, "_target_layout", lambda *a: (layout(*a)[0], "model"))
    report = convert(tmp_path / "step-1", tmp_path / "out", to="dcp", config=LINGUA)
    assert report.recheck is not None and [f["id"] for f in report.recheck["failed"]] == ["layout[torchtitan]"]


@pytest.mark.parametrize(("argv", "hint"), [(["--bogus"], "(see ckptcheck --help)"),
                                            (["convert", "only-src"], "(see ckptcheck convert --help)")])
def test_usage_errors_point_at_the_right_help(argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptcheck.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.rstrip().endswith(hint), err


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_torch_into_torch_keeps_the_source_nesting(wrapper: str, tmp_path: Path) -> None:
    """A cast of a nested torch file stays nested under the same key, unless --naming asks for a layout."""
    state = torch.load(Path(__file__).parent.parent / "fixtures" / "good" / "consolidated.pth", weights_only=True)
    torch.save({wrapper: state}, tmp_path / "n.pth")
    assert convert(tmp_path / "n.pth", tmp_path / "b.pth", dtype="bf16").nesting == wrapper
    assert set(torch.load(tmp_path / "b.pth", weights_only=True)) == {wrapper}
    assert convert(tmp_path / "n.pth", tmp_path / "m.pth", naming="meta").nesting is None
