"""Every check must pass on a good checkpoint and fail on its breakage, in every supported format.

Each case writes a tiny model with the real libraries (torch.save, safetensors, DCP), breaks one thing,
and asserts the exact set of failing check ids: the breakage is caught, and nothing else is blamed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ckptcheck.checks.model import Status
from ckptcheck.configs import load_config
from ckptcheck.engine import Options, plan, run
from ckptcheck.naming import HF, META
from ckptcheck.synth import random_state_dict

from .writers import FORMATS, config_for, named, write

State = dict[str, torch.Tensor]


@dataclass
class Breakage:
    mutate: Callable[[State], State] = lambda s: s
    # failing ids, in canonical naming ("{target}" is replaced by the target scheme's name)
    fails: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    config_edit: dict | None = None  # canonical field -> value, written into a copy of the config
    other_scheme: bool = False  # write the keys in the scheme the config does not use
    prefix: str = ""
    optimizer: bool = False
    tied: bool = False
    # ids that pass after all when the format stores the tie as shared storage (the key is then present)
    present_when_aliased: tuple[str, ...] = ()


def _without(key: str) -> Callable[[State], State]:
    return lambda s: {k: v for k, v in s.items() if k != key}


def _with(key: str, make: Callable[[State], torch.Tensor]) -> Callable[[State], State]:
    return lambda s: {**s, key: make(s)}


def _poison(s: State) -> State:
    t = s["layers.1.attention.wv.weight"].clone()
    t[2, 3] = float("inf")
    t[0, 0] = float("nan")
    return {**s, "layers.1.attention.wv.weight": t}


BREAKAGES: dict[str, Breakage] = {
    "good": Breakage(),
    "missing_key": Breakage(_without("layers.0.feed_forward.w3.weight"),
                            ("key_present[layers.0.feed_forward.w3.weight]",)),
    "extra_layer": Breakage(_with("layers.2.attention.wq.weight", lambda s: s["layers.1.attention.wq.weight"].clone()),
                            ("unexpected_key[layers.2.attention.wq.weight]",)),  # config[n_layers]: skip, partial
    "wrong_vocab": Breakage(_with("tok_embeddings.weight", lambda s: torch.zeros(130, 32, dtype=torch.bfloat16)),
                            ("shape[tok_embeddings.weight]", "config[vocab_size]")),
    "wrong_dtype": Breakage(_with("norm.weight", lambda s: s["norm.weight"].float()), ("dtype[norm.weight]",)),
    "not_finite": Breakage(_poison, ("finite[layers.1.attention.wv.weight]",)),
    "other_naming": Breakage(other_scheme=True, fails=("naming[{target}]",)),
    "ddp_prefix": Breakage(prefix="module.", fails=("naming[{target}]",)),
    "config_kv_heads": Breakage(config_edit={"n_kv_heads": 4}, fails=(
        "config[n_kv_heads]",
        *(f"shape[layers.{i}.attention.{w}.weight]" for i in range(2) for w in ("wk", "wv")))),
    # these writers save no scheduler or data-loader state: a resume fails those checks either way
    "resume_without_optimizer": Breakage(options={"target": "resume"}, fails=(
        "resume[optimizer]", "train_state[scheduler]", "train_state[data_loader]")),
    "resume_with_optimizer": Breakage(options={"target": "resume"}, optimizer=True, fails=(
        "train_state[scheduler]", "train_state[data_loader]")),
    "metadata_only_hides_nan": Breakage(_poison, options={"metadata_only": True}),
    "forced_dtype": Breakage(options={"dtype": "fp32"}, fails=tuple(f"dtype[{k}]" for k in (
        "tok_embeddings.weight", *(f"layers.{i}.{r}" for i in range(2) for r in (
            "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
            "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
            "attention_norm.weight", "ffn_norm.weight")), "norm.weight", "output.weight"))),
    "tied": Breakage(tied=True),
    "tied_config_untied_weights": Breakage(config_edit={"tie_embeddings": False}, tied=True,
                                           fails=("key_present[output.weight]", "config[tie_embeddings]"),
                                           present_when_aliased=("key_present[output.weight]",)),
}
OPTIMIZER_FORMATS = ("torch", "lingua-torch", "dcp")
ALIAS_FORMATS = ("torch", "lingua-torch")  # formats that can store a tie as shared storage


def _write_config(src: Path, dst: Path, edit: dict, scheme) -> Path:
    data = json.loads(src.read_text())
    target = data if scheme is HF else data["model"]
    names = {"n_kv_heads": "num_key_value_heads", "tie_embeddings": "tie_word_embeddings"} if scheme is HF else {
        "tie_embeddings": "weight_tying"}
    for key, value in edit.items():
        target[names.get(key, key)] = value
    dst.write_text(json.dumps(data))
    return dst


CASES = [
    pytest.param(fmt, name, id=f"{fmt}-{name}")
    for fmt in FORMATS
    for name, b in BREAKAGES.items()
    if not (b.optimizer and fmt not in OPTIMIZER_FORMATS)
]


@pytest.mark.parametrize(("fmt", "breakage"), CASES)
def test_check_matrix(fmt: str, breakage: str, tmp_path: Path) -> None:
    b = BREAKAGES[breakage]
    scheme = FORMATS[fmt]
    config_path = config_for(scheme)
    cfg = load_config(config_path)
    if b.tied:
        tied_edit = {"tie_embeddings": True}
        config_path = _write_config(config_path, tmp_path / "tied.json", tied_edit, scheme)
        cfg = load_config(config_path)
    state = b.mutate(random_state_dict(cfg, seed=0))
    if b.tied and fmt not in ALIAS_FORMATS:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    write_scheme = (META if scheme is HF else HF) if b.other_scheme else scheme
    stored = {b.prefix + k: v for k, v in named(state, write_scheme, cfg).items()}
    if b.tied and fmt in ALIAS_FORMATS:
        out_key = b.prefix + write_scheme.from_canonical("output.weight")
        emb_key = b.prefix + write_scheme.from_canonical("tok_embeddings.weight")
        stored[out_key] = stored[emb_key]
    path = write(fmt, stored, tmp_path / "ckpt", optimizer=b.optimizer)
    if b.config_edit:
        config_path = _write_config(config_path, tmp_path / "edited.json", b.config_edit, scheme)

    the_plan = plan(path, config_path, Options(**b.options))
    try:
        results = run(the_plan)
    finally:
        the_plan.close()

    def shown(check_id: str) -> str:
        category, _, key = check_id.partition("[")
        key = key[:-1]
        if key == "{target}":
            return f"{category}[{scheme.name}]"
        if category in ("config", "resume", "train_state"):
            return check_id
        return f"{category}[{scheme.from_canonical(key) or key}]"

    expected_fails = [f for f in b.fails if not (fmt in ALIAS_FORMATS and f in b.present_when_aliased)]
    failing = sorted(r.id for r in results if r.status in (Status.FAIL, Status.UNSAFE))
    assert failing == sorted(shown(f) for f in expected_fails), [r.message for r in results if r.status is Status.FAIL]
    passing = {r.category for r in results if r.status is Status.PASS}
    assert {"key_present", "shape", "dtype"} - {c for f in b.fails for c in [f.split("[")[0]]} <= passing
    if breakage == "metadata_only_hides_nan":
        assert all(r.status is Status.SKIP for r in results if r.category == "finite")
