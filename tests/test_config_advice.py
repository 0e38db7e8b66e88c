"""Advice converges: the config edit a failing config check suggests, applied literally to the file, makes
that check pass, or leaves the honest "cannot be verified" skip; all the edits together clear every config
and shape failure.  Random models, random wrong fields, in lingua, Meta and Hugging Face schemas."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ckptcheck.checks.model import CheckResult, Status
from ckptcheck.configs import ffn_hidden, load_config
from ckptcheck.engine import Options, plan, run
from ckptcheck.errors import InputError
from ckptcheck.naming import HF, META
from ckptcheck.synth import in_scheme, random_state_dict

EDIT = re.compile(r"set (.+) in (.+), if the weights are the model you meant")
UNVERIFIABLE = "cannot be verified: the weights fix only heads × head_dim"
HEAD_FIELDS = ("n_heads", "n_kv_heads")
UNSHOWN_FIELDS = ("norm_eps", "rope_theta")  # only a saved config witnesses them


def _true_config(schema: str, m: dict[str, Any]) -> dict[str, Any]:
    """The model's own config file, in ``schema``."""
    if schema == "hf":
        return {"model_type": "llama", "hidden_size": m["dim"], "num_hidden_layers": m["layers"],
                "num_attention_heads": m["heads"], "num_key_value_heads": m["kv"], "head_dim": m["hd"],
                "vocab_size": m["vocab"], "intermediate_size": m["ffn"], "tie_word_embeddings": m["tied"],
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0}  # stated, as a training run's saved config states them
    model = {"dim": m["dim"], "n_layers": m["layers"], "n_heads": m["heads"], "n_kv_heads": m["kv"],
             "head_dim": m["hd"], "vocab_size": m["vocab"], "multiple_of": m["multiple_of"], "norm_eps": 1e-5,
             "rope_theta": 10000.0}
    if schema == "meta":
        return model
    return {"model": {**model, "weight_tying": m["tied"]}}


# Wrong values for one field, as the config file spells it: (schema-independent name, edit of the model section).
def _mutations(schema: str, m: dict[str, Any]) -> dict[str, Any]:
    f = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
         "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "tied": "tie_word_embeddings"} \
        if schema == "hf" else {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
                                "vocab_size": "vocab_size", "tied": "weight_tying"}
    out: dict[str, Any] = {
        "dim": {f["dim"]: m["dim"] * 2}, "n_layers": {f["n_layers"]: m["layers"] + 1},
        "n_heads_double": {f["n_heads"]: m["heads"] * 2, f["n_kv_heads"]: m["kv"] * 2},
        "n_heads_half": {f["n_heads"]: max(1, m["heads"] // 2), f["n_kv_heads"]: max(1, m["kv"] // 2)},
        "n_kv_heads": {f["n_kv_heads"]: 1}, "no_head_dim": {"head_dim": None},
        "head_dim": {"head_dim": m["hd"] * 2}, "no_kv": {f["n_kv_heads"]: None},
        "vocab_size": {f["vocab_size"]: m["vocab"] + 3},
        "ffn": {"intermediate_size": m["ffn"] + 4} if schema == "hf" else {"multiple_of": m["multiple_of"] * 2},
        "norm_eps": {"rms_norm_eps" if schema == "hf" else "norm_eps": 1e-3}, "rope_theta": {"rope_theta": 5e5},
    }
    if schema != "meta":
        out["tied"] = {f["tied"]: not m["tied"]}
    return out


def _section(data: dict[str, Any], schema: str) -> dict[str, Any]:
    return data["model"] if schema == "lingua" else data


def _apply(data: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    for field, value in edit.items():
        section = out
        *parents, leaf = field.split(".")
        for p in parents:
            section = section[p]
        if value is None:
            section.pop(leaf, None)
        else:
            section[leaf] = value
    return out


def _check(ckpt: Path, config: Path) -> list[CheckResult]:
    the_plan = plan(ckpt, config, Options())  # values read: a tie saved as a copy is told apart by them
    try:
        return run(the_plan)
    finally:
        the_plan.close()


def _edits(repair: str, config: Path) -> dict[str, Any]:
    """The assignments a repair names, parsed as a person would read them."""
    match = EDIT.fullmatch(repair)
    assert match, repair
    assert match.group(2) == str(config), repair
    out = {}
    for part in match.group(1).split(" and "):
        field, _, value = part.partition(" = ")
        out[field] = json.loads(value)
    return out


def _witness(witness: str | None, config: Path, saved: dict[str, Any]) -> str | None:
    """The witness left once the config is edited: a config whose content equals the saved one is the config
    under test again, not evidence for it."""
    same = witness == "saved_config" and json.loads(config.read_text()) == saved
    return None if same else witness


def _settled(r: CheckResult, witness: str | None) -> bool:
    """Passes, or is a field no witness can decide (reported, not passed)."""
    if r.status is Status.PASS:
        return True
    if r.status is not Status.SKIP:
        return False
    if r.key in HEAD_FIELDS:
        return witness is None and UNVERIFIABLE in r.message
    # a saved config decides both; rotary frequencies decide rope_theta, never norm_eps
    decided = witness == "saved_config" or (witness == "rope_freqs" and r.key == "rope_theta")
    return r.key in UNSHOWN_FIELDS and not decided and "cannot be verified" in r.message


model_st = st.fixed_dictionaries({
    "kv": st.integers(1, 3), "groups": st.integers(1, 3), "hd": st.sampled_from([2, 4, 6, 8]),
    "layers": st.integers(1, 3), "vocab": st.integers(16, 40), "multiple_of": st.sampled_from([4, 8, 16]),
    "wide": st.booleans(), "state_hd": st.booleans(), "tied": st.booleans(),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=model_st, schema=st.sampled_from(["lingua", "meta", "hf"]),
       wrong=st.lists(st.sampled_from(["dim", "n_layers", "n_heads_double", "n_heads_half", "n_kv_heads",
                                       "no_head_dim", "head_dim", "no_kv", "vocab_size", "ffn", "tied",
                                       "norm_eps", "rope_theta"]),
                      min_size=1, max_size=3, unique=True),
       witness=st.sampled_from([None, "saved_config", "rope_freqs"]))
def test_suggested_config_edits_converge(model: dict[str, Any], schema: str, wrong: list[str],
                                         witness: str | None) -> None:
    m = dict(model, heads=model["kv"] * model["groups"])
    m["dim"] = m["heads"] * m["hd"] * (2 if m["wide"] else 1)
    m["ffn"] = ffn_hidden(m["dim"], m["multiple_of"], None)
    if schema == "meta":
        m["tied"] = False  # a Meta params.json cannot state tying
        assume(not m["wide"])  # nor a head size other than dim / n_heads (test_config_checks covers the advice)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "ckpt").mkdir()
        truth_path = d / "truth.json"
        truth = _true_config(schema, m)
        if not (m["wide"] or m["state_hd"]):  # head_dim then defaults to dim / n_heads
            _section(truth, schema).pop("head_dim")
        truth_path.write_text(json.dumps(truth))
        cfg = load_config(truth_path)
        state = random_state_dict(cfg, dtype="float32", seed=0)
        scheme = HF if schema == "hf" else META
        stored = in_scheme(state, scheme, cfg)
        if witness == "rope_freqs":  # Meta's rotary buffer, or the one older transformers saved
            freqs = 1.0 / 10000.0 ** (torch.arange(0, m["hd"], 2).float() / m["hd"])  # the default theta
            stored["model.rotary_emb.inv_freq" if schema == "hf" else "rope.freqs"] = freqs
        torch.save(stored, d / "ckpt" / "consolidated.pth")
        if witness == "saved_config":
            (d / "ckpt" / ("config.json" if schema == "hf" else "params.json")).write_text(json.dumps(truth))
        ckpt = d / "ckpt" / "consolidated.pth"

        mutations = _mutations(schema, m)
        edit: dict[str, Any] = {}
        for name in wrong:
            if name in mutations:
                edit.update(mutations[name])
        section = "model." if schema == "lingua" else ""
        bad = _apply(truth, {section + k: v for k, v in edit.items()})
        assume(bad != truth)
        config = d / "config" / "params.json"
        config.parent.mkdir()
        config.write_text(json.dumps(bad))
        try:
            load_config(config)
        except InputError:
            assume(False)  # not a config at all: load_config's own tests cover the refusal

        results = _check(ckpt, config)
        failing = [r for r in results if r.category == "config" and r.status is Status.FAIL]
        combined: dict[str, Any] = {}
        for r in failing:
            assert r.repair, r.message
            one = _edits(r.repair, config)
            assert all(combined.get(k, v) == v for k, v in one.items()), (combined, one)  # the fixes agree
            combined.update(one)
            config.write_text(json.dumps(_apply(bad, one)))
            again = {x.id: x for x in _check(ckpt, config)}[r.id]
            assert _settled(again, _witness(witness, config, truth)), (r.message, r.repair, again.status,
                                                                        again.message)
        config.write_text(json.dumps(_apply(bad, combined)))
        final = _check(ckpt, config)
        for r in final:
            if r.category == "config":
                assert _settled(r, _witness(witness, config, truth)), (r.id, r.message, [f.repair for f in failing])
            if r.category == "shape":
                assert r.status is Status.PASS, (r.id, r.message)
