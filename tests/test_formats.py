"""Readers: each format's manifest matches what was written, and each tensor loads back bit for bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptcheck.formats import detect_format, open_checkpoint
from ckptcheck.naming import HF, TITAN

from .writers import FIXTURES, FORMATS, named, write


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_manifest_and_bitwise_load(fmt: str, tiny_cfg, tiny_state, tmp_path: Path) -> None:
    state = named(tiny_state, FORMATS[fmt], tiny_cfg)
    path = write(fmt, state, tmp_path, optimizer=fmt in ("torch", "dcp"))
    with open_checkpoint(path) as ckpt:
        m = ckpt.manifest
        assert m.format == ("safetensors" if fmt == "hf" else "torch" if fmt == "lingua-torch" else fmt)
        assert set(m.tensors) == set(state)
        for key, t in state.items():
            info = m.tensors[key]
            assert (info.shape, info.dtype) == (tuple(t.shape), "bfloat16")
            loaded = ckpt.load(key)
            assert loaded.dtype == t.dtype and torch.equal(loaded.view(torch.int16), t.view(torch.int16))


def test_optimizer_sections_are_kept_apart(tiny_state, tmp_path: Path) -> None:
    with open_checkpoint(write("dcp", tiny_state, tmp_path, optimizer=True)) as ckpt:
        m = ckpt.manifest
        assert m.nesting == "model" and m.sections == ("optim",) and m.optimizer_section == "optim"
        assert "optim.state.norm.weight.exp_avg" in m.extra_tensors
        assert torch.equal(ckpt.load("optim.state.norm.weight.step"), torch.tensor(10.0))


def test_titan_flat_layout_with_state_beside_it(tiny_cfg, tiny_state, tmp_path: Path) -> None:
    """torchtitan saves model keys at the top level beside optimizer/lr_scheduler/train_state."""
    import torch.distributed.checkpoint as dcp

    state = named(tiny_state, TITAN, tiny_cfg)
    payload = {**state, "optimizer": {"state": {"norm.weight": {"step": torch.tensor(3.0)}}},
               "lr_scheduler": {"last_epoch": 3}}
    dcp.save(payload, checkpoint_id=str(tmp_path / "step-3"))
    with open_checkpoint(tmp_path / "step-3") as ckpt:
        m = ckpt.manifest
        assert m.nesting is None and set(m.tensors) == set(state)
        assert m.sections == ("lr_scheduler", "optimizer")


def test_tied_weights_are_aliases_in_torch_files(tmp_path: Path) -> None:
    emb = torch.randn(8, 4)
    torch.save({"tok_embeddings.weight": emb, "output.weight": emb, "view": emb[2:4]}, tmp_path / "t.pth")
    with open_checkpoint(tmp_path / "t.pth") as ckpt:
        assert ckpt.manifest.tensors["output.weight"].alias_of == "tok_embeddings.weight"
        assert ckpt.manifest.tensors["view"].alias_of is None
        assert torch.equal(ckpt.load("view"), emb[2:4])
        assert ckpt.manifest.total_bytes == 8 * 4 * 4 + 2 * 4 * 4  # the alias is not counted twice


def test_non_contiguous_views_load_correctly(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    torch.save({"t": base.t(), "slice": base[:, 1:3]}, tmp_path / "v.pth")
    with open_checkpoint(tmp_path / "v.pth") as ckpt:
        assert torch.equal(ckpt.load("t"), base.t())
        assert torch.equal(ckpt.load("slice"), base[:, 1:3])


@pytest.mark.parametrize(("name", "fmt"), [
    ("good/consolidated.pth", "torch"), ("good/lingua_consolidated", "torch"), ("good/meta_mp", "meta-shards"),
    ("good/model.safetensors", "safetensors"), ("good/hf_sharded", "safetensors-sharded"), ("good/dcp", "dcp"),
    ("good/dcp/.metadata", "dcp"), ("good/hf", "safetensors"),
])
def test_detection(name: str, fmt: str) -> None:
    assert detect_format(FIXTURES / name)[0] == fmt


def test_meta_shards_merge_as_meta_splits(tiny_state) -> None:
    with open_checkpoint(FIXTURES / "good" / "meta_mp") as ckpt:
        assert ckpt.manifest.facts["tok_embeddings split"] == "dim 1 (Llama 1/2)"
        for key, t in tiny_state.items():
            assert torch.equal(ckpt.load(key), t), key


def test_hf_fixture_holds_the_permuted_layout(tiny_cfg, tiny_state) -> None:
    hf = named(tiny_state, HF, tiny_cfg)
    with open_checkpoint(FIXTURES / "good" / "hf") as ckpt:
        q = ckpt.load("model.layers.0.self_attn.q_proj.weight")
        assert torch.equal(q, hf["model.layers.0.self_attn.q_proj.weight"])
        assert not torch.equal(q, tiny_state["layers.0.attention.wq.weight"])


def test_metadata_reading_imports_no_torch() -> None:
    code = (
        "import sys; from ckptcheck.engine import Options, plan, run;"
        f"p = plan({str(FIXTURES / 'good' / 'dcp')!r}, None, Options(metadata_only=True));"
        "r = run(p); assert all(x.status.value in ('pass', 'skip') for x in r), r;"
        "assert 'torch' not in sys.modules, 'torch imported'; print(len(r))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "97"


def test_fixtures_are_reproducible(tmp_path: Path) -> None:
    """fixtures/make_fixtures.py regenerates the committed fixtures, tensor for tensor."""
    proc = subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("good/consolidated.pth", "good/dcp", "good/hf_sharded", "good/meta_mp", "broken/damaged.pth"):
        with open_checkpoint(FIXTURES / name) as a, open_checkpoint(tmp_path / name) as b:
            assert a.manifest.tensors == b.manifest.tensors
            for key in a.manifest.tensors:
                assert _same_bits(a.load(key), b.load(key)), (name, key)
    for cfg in (FIXTURES / "configs").iterdir():
        assert cfg.read_text() == (tmp_path / "configs" / cfg.name).read_text()


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit, NaN payloads included: ``torch.equal`` is false for any NaN, and a tolerance hides drift."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))


def test_same_bits_tells_tensors_apart() -> None:
    nan = torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)
    assert _same_bits(nan, nan.clone())
    assert not _same_bits(nan, torch.tensor([2.0, float("nan")], dtype=torch.bfloat16))
    assert not _same_bits(torch.ones(2), torch.zeros(2))  # the old assertion held for these
    assert not _same_bits(torch.ones(2), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_read_rows_matches_slices_of_the_whole(fmt: str, tiny_cfg, tiny_state, tmp_path: Path) -> None:
    state = named(tiny_state, FORMATS[fmt], tiny_cfg)
    with open_checkpoint(write(fmt, state, tmp_path)) as ckpt:
        for key, t in state.items():
            rows = t.shape[0]
            for start, stop in ((0, rows), (1, rows // 2 + 1), (rows - 1, rows), (3, 3)):
                got = ckpt.read_rows(key, start, stop)
                assert torch.equal(got, t[start:stop]), (key, start, stop)
