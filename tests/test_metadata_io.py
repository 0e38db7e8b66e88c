"""Metadata checks read almost nothing: < 1 % of a checkpoint's bytes, in every format.

Measured with the kernel's own count of bytes this process read (``rchar`` in /proc/self/io), around a
full metadata-only plan and run, after a warm-up so that module imports are not counted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptcheck.configs import load_config
from ckptcheck.engine import Options, plan, run
from ckptcheck.iostats import bytes_read
from ckptcheck.synth import random_state_dict

from .writers import FIXTURES, FORMATS, named, write

pytestmark = pytest.mark.skipif(bytes_read() is None, reason="needs /proc/self/io")


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory):
    """A ~60 MB bf16 model and its config."""
    folder = tmp_path_factory.mktemp("medium")
    cfg_path = folder / "params.json"
    cfg_path.write_text('{"model": {"dim": 512, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 16384}}')
    cfg = load_config(cfg_path)
    return cfg_path, cfg, random_state_dict(cfg, seed=3)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_metadata_checks_read_under_one_percent(fmt: str, medium, tmp_path: Path) -> None:
    cfg_path, cfg, state = medium
    path = write(fmt, named(state, FORMATS[fmt], cfg), tmp_path)
    if fmt == "hf":
        (tmp_path / "config.json").unlink()  # the tiny fixture config; check against the medium one
    config = cfg_path if FORMATS[fmt].name == "meta" else _hf_config(cfg, tmp_path)
    size = sum(p.stat().st_size for p in Path(tmp_path).rglob("*") if p.is_file() and p.suffix != ".json")
    run(plan(FIXTURES / "good" / "dcp", None, Options(metadata_only=True)))  # warm-up: imports
    before = bytes_read()
    the_plan = plan(path, config, Options(metadata_only=True))
    results = run(the_plan)
    the_plan.close()
    used = bytes_read() - before  # type: ignore[operator]
    assert all(r.status.value in ("pass", "skip") for r in results)
    assert size > 50e6
    assert used < 0.01 * size, f"{fmt}: read {used} of {size} bytes ({100 * used / size:.2f} %)"


def _hf_config(cfg, folder: Path) -> Path:
    import json

    path = folder / "hf_config.json"
    path.write_text(json.dumps({
        "model_type": "llama", "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.ffn_dim, "torch_dtype": "bfloat16"}))
    return path
