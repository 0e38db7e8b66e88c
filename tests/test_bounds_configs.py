"""Issue 11, configs: every field a config sets is bounded and typed before anything is computed from it.

Each case goes through the real CLI (``ckptcheck check``) with the bundled Meta checkpoint and a config written
here, and asserts the exit status and the one line (file, field, cause).  A config that is valid JSON but asks for
far more layers than the checkpoint holds is a config[n_layers] failure, found in time linear in the checkpoint.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptcheck.cli import main
from ckptcheck.engine import Options, plan
from ckptcheck.errors import InputError

from .writers import CONFIGS, FIXTURES

GOOD = str(FIXTURES / "good" / "consolidated.pth")
LINGUA: dict[str, Any] = json.loads((CONFIGS / "lingua_params.json").read_text())
HF: dict[str, Any] = json.loads((CONFIGS / "hf_config.json").read_text())


def lingua(**model: Any) -> dict[str, Any]:
    return {**LINGUA, "model": {**LINGUA["model"], **model}}


def _with_literal(data: dict[str, Any], field: str, literal: str) -> str:
    """``data`` as JSON with ``field`` (dotted) set to a literal json.dumps cannot write (NaN, 1e308, huge ints)."""
    marker = "__LITERAL__"
    node = data = json.loads(json.dumps(data))
    *parents, last = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = marker
    return json.dumps(data).replace(f'"{marker}"', literal)


def _check(tmp_path: Path, text: str, name: str = "params.json") -> tuple[int, str, str, Path]:
    path = tmp_path / name
    path.write_text(text)
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["check", GOOD, "--model-config", str(path)])
    return code, out.getvalue(), err.getvalue(), path


# (config text, file name, item, cause): each is exit 2 with exactly this line.
INVALID = {
    "deep_params": ('{"model": ' + "[" * 1000 + "]" * 1000 + "}", "params.json", None,
                    "JSON nested 1001 levels deep (limit 64)"),
    "deep_hf": ('{"model_type": "llama", "x": ' + '{"a": ' * 1000 + "1" + "}" * 1000 + "}", "config.json", None,
                "JSON nested 1001 levels deep (limit 64)"),
    "int_5000_digits": (_with_literal(LINGUA, "model.max_seqlen", "9" * 5000), "params.json", None,
                        "an integer of 5000 digits (limit 40)"),
    "n_layers_1e308": (_with_literal(LINGUA, "model.n_layers", "1e308"), "params.json", "field model.n_layers",
                       "must be an integer, got 1e+308"),
    "n_layers_float": (json.dumps(lingua(n_layers=2.0)), "params.json", "field model.n_layers",
                       "must be an integer, got 2.0"),
    "n_layers_2_62": (json.dumps(lingua(n_layers=2**62)), "params.json", "field model.n_layers",
                      "4611686018427387904 is over 2147483648, more than any model has"),
    "dim_true": (json.dumps(lingua(dim=True)), "params.json", "field model.dim", "must be an integer, got True"),
    "dim_2_62": (json.dumps(lingua(dim=2**62)), "params.json", "field model.dim",
                 "4611686018427387904 is over 1048576, more than any model has"),
    "head_dim_2_40": (json.dumps(lingua(head_dim=2**40)), "params.json", "field model.head_dim",
                      "1099511627776 is over 65536, more than any model has"),
    "head_dim_odd": (json.dumps(lingua(n_heads=32, n_kv_heads=16, head_dim=1)), "params.json",
                     "field model.head_dim", "1 is odd: rotary embeddings turn pairs of dimensions"),
    "head_dim_odd_derived": (json.dumps(lingua(n_heads=32, n_kv_heads=16)), "params.json", "field model.n_heads",
                             "dim / n_heads = 32 / 32 = 1, an odd head size: rotary embeddings turn pairs of dimensions"),
    "vocab_10_30": (json.dumps(lingua(vocab_size=10**30)), "params.json", "field model.vocab_size",
                    "1000000000000000000000000000000 is over 2147483648, more than any model has"),
    "vocab_minus_5": (json.dumps(lingua(vocab_size=-5)), "params.json", "field model.vocab_size",
                      "must be a positive integer, got -5"),
    "multiple_of_0": (json.dumps(lingua(multiple_of=0)), "params.json", "field model.multiple_of",
                      "must be a positive integer, got 0"),
    "ffn_multiplier_infinity": (_with_literal(LINGUA, "model.ffn_dim_multiplier", "Infinity"), "params.json",
                                "field model.ffn_dim_multiplier", "must be a positive finite number, got inf"),
    "ffn_multiplier_nan": (_with_literal(LINGUA, "model.ffn_dim_multiplier", "NaN"), "params.json",
                           "field model.ffn_dim_multiplier", "must be a positive finite number, got nan"),
    "ffn_multiplier_1e400": (_with_literal(LINGUA, "model.ffn_dim_multiplier", "1e400"), "params.json",
                             "field model.ffn_dim_multiplier", "must be a positive finite number, got inf"),
    "norm_eps_negative": (json.dumps(lingua(norm_eps=-1e-5)), "params.json", "field model.norm_eps",
                          "must be a positive finite number, got -1e-05"),
    "norm_eps_zero": (json.dumps(lingua(norm_eps=0)), "params.json", "field model.norm_eps",
                      "must be a positive finite number, got 0"),
    "rope_theta_nan": (_with_literal(LINGUA, "model.rope_theta", "NaN"), "params.json", "field model.rope_theta",
                       "must be a positive finite number, got nan"),
    "rope_theta_infinity": (_with_literal(LINGUA, "model.rope_theta", "Infinity"), "params.json",
                            "field model.rope_theta", "must be a positive finite number, got inf"),
    "rope_theta_string": (json.dumps(lingua(rope_theta="1e4")), "params.json", "field model.rope_theta",
                          "must be a number, got '1e4'"),
    "max_seqlen_string": (json.dumps(lingua(max_seqlen="long")), "params.json", "field model.max_seqlen",
                          "must be an integer, got 'long'"),
    "use_scaled_rope_string": (json.dumps(lingua(use_scaled_rope="yes")), "params.json",
                               "field model.use_scaled_rope", "must be true or false, got 'yes'"),
    "hf_rms_norm_eps_negative": (json.dumps({**HF, "rms_norm_eps": -1.0}), "config.json", "field rms_norm_eps",
                                 "must be a positive finite number, got -1.0"),
    "hf_rope_theta_nan": (_with_literal(HF, "rope_theta", "NaN"), "config.json", "field rope_theta",
                          "must be a positive finite number, got nan"),
    "hf_intermediate_1e308": (_with_literal(HF, "intermediate_size", "1e308"), "config.json",
                              "field intermediate_size", "must be an integer, got 1e+308"),
    "hf_layers_2_62": (json.dumps({**HF, "num_hidden_layers": 2**62}), "config.json", "field num_hidden_layers",
                       "4611686018427387904 is over 2147483648, more than any model has"),
    "hf_kv_heads_zero": (json.dumps({**HF, "num_key_value_heads": 0}), "config.json", "field num_key_value_heads",
                         "must be a positive integer, got 0"),
    "hf_max_positions_float": (json.dumps({**HF, "max_position_embeddings": 1e308}), "config.json",
                               "field max_position_embeddings", "must be an integer, got 1e+308"),
    "hf_scaling_factor_nan": (_with_literal({**HF, "rope_scaling": {"rope_type": "llama3"}}, "rope_scaling.factor",
                                            "NaN"), "config.json", "field rope_scaling.factor",
                              "must be a positive finite number, got nan"),
    "hf_scaling_type_list": (json.dumps({**HF, "rope_scaling": {"rope_type": ["llama3"]}}), "config.json",
                             "field rope_scaling.rope_type", "must be a string, got ['llama3']"),
    "hf_dtype_huge_list": (json.dumps({**HF, "torch_dtype": list(range(10_000))}), "config.json",
                           "field torch_dtype", f"unknown dtype {repr(list(range(10_000)))[:60]}..."),
    "hf_parameters_theta_negative": (json.dumps({**HF, "rope_parameters": {"rope_type": "default",
                                                                            "rope_theta": -1}}),
                                     "config.json", "field rope_parameters.rope_theta",
                                     "must be a positive finite number, got -1"),
}


# Cases the old code answered by building a spec of that many layers (for ever): run in a subprocess under
# an address-space limit, so a regression fails instead of taking the machine's memory.
UNBOUNDED_BEFORE = {"n_layers_1e308", "n_layers_2_62", "hf_layers_2_62"}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_config_number_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    """NaN, infinite, negative, float-for-int, absurdly large and deeply nested values: exit 2 and one line
    naming the file, the field and the cause (before: RecursionError, OverflowError or ValueError exit 3, a
    silent pass, or a spec built for ever)."""
    text, name, item, cause = INVALID[case]
    if case in UNBOUNDED_BEFORE:
        path = tmp_path / name
        path.write_text(text)
        done = _limited_cli("check", GOOD, "--model-config", str(path))
        code, err = done.returncode, done.stderr
    else:
        code, _, err, path = _check(tmp_path, text, name)
    expected = ": ".join(p for p in (str(path), item, cause) if p)
    assert (code, err.strip()) == (2, f"ckptcheck: error: {expected}")


def test_json_nested_deeper_than_the_recursion_limit_is_refused_by_depth() -> None:
    """The depth is measured on the text, so nesting past Python's own recursion limit is the same line."""
    from ckptcheck import bounded_json

    text = "[" * 100_000 + "]" * 100_000
    with pytest.raises(InputError) as exc:
        bounded_json.loads(text, "x.json", "header")
    assert exc.value.line() == "x.json: header: JSON nested 100000 levels deep (limit 64)"
    assert bounded_json.loads('{"a": "[[[[{{{{"}', "x.json") == {"a": "[[[[{{{{"}  # brackets in strings


def test_config_asking_for_more_layers_than_the_checkpoint_holds_lists_what_it_holds(tmp_path: Path) -> None:
    """The spec is bounded by the checkpoint: 10**4 configured layers of a 2-layer checkpoint plan no more
    checks than its 21 tensors allow (before: 90,000 key checks, and for 10**9 a spec built for ever)."""
    path = tmp_path / "params.json"
    path.write_text(json.dumps(lingua(n_layers=10**4)))
    session_plan = plan(GOOD, path, Options())
    try:
        assert session_plan.session is not None
        tensors = len(session_plan.session.manifest.tensors)
        assert len(session_plan.session.spec.tensors) <= 9 * tensors + 3
        assert len(session_plan.checks) < 100 * tensors
    finally:
        session_plan.close()


# Far above what the CLI needs on this 2-layer checkpoint, far below what a spec of 10**9 layers takes.
ADDRESS_SPACE = 3 << 30


def _limited_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess under ``ADDRESS_SPACE`` (few malloc arenas and threads: the limit is on
    reserved address space)."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ckptcheck", *args], capture_output=True, text=True, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE)))


def test_config_with_a_billion_layers_is_a_config_fail_not_a_spec_built_forever(tmp_path: Path) -> None:
    """n_layers 10**9 with a 2-layer checkpoint: config[n_layers] FAIL, exit 1 (before: the spec grew at
    ~90 MB/s until memory ran out).  Run under an address-space limit, so a regression fails, not hogs."""
    path = tmp_path / "params.json"
    path.write_text(json.dumps(lingua(n_layers=10**9)))
    done = _limited_cli("check", GOOD, "--model-config", str(path))
    assert done.returncode == 1, done.stderr
    assert "FAIL   config[n_layers]" in done.stdout
    assert "config field model.n_layers is 1000000000 but the weights imply 2" in done.stdout


def test_convert_with_a_config_max_seqlen_of_the_wrong_type_is_one_line(tmp_path: Path) -> None:
    """convert --to hf wrote max_position_embeddings with int(max_seqlen): a string was a ValueError, exit 3."""
    path = tmp_path / "params.json"
    path.write_text(json.dumps(lingua(max_seqlen="8k")))
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["convert", GOOD, str(tmp_path / "out"), "--to", "hf", "--model-config", str(path)])
    assert (code, err.getvalue().strip()) == (
        2, f"ckptcheck: error: {path}: field model.max_seqlen: must be an integer, got '8k'")
    assert not (tmp_path / "out").exists()


def _resaved(tmp_path: Path, reshape: Any) -> Path:
    """The bundled checkpoint saved again with torch.save, each tensor replaced by an empty one of the shape
    ``reshape(key, shape)`` gives (zero elements: the file stays small whatever the shape says)."""
    import torch

    from ckptcheck.formats import open_checkpoint

    ckpt = open_checkpoint(GOOD)
    try:
        state = {k: torch.empty(reshape(k, list(info.shape)), dtype=torch.bfloat16)
                 for k, info in ckpt.manifest.tensors.items()}
    finally:
        ckpt.close()
    path = tmp_path / "consolidated.pth"
    torch.save(state, path)
    return path


# A hang guard, not a timing assertion: the fixed code answers in seconds, the old one looped for hours.
HANG_GUARD_S = 300


def test_head_split_search_is_bounded_by_the_largest_head_size_not_the_declared_rows(tmp_path: Path) -> None:
    """A zero-element wq declaring 2**32 rows (wk 2**31) with a config whose heads multiply to them: the
    unverifiable head split listed its alternatives by trying every divisor of 2**31 (hours); now head sizes
    up to the largest any model has."""
    rows = {"attention.wq.weight": 2**32, "attention.wk.weight": 2**31}
    ckpt = _resaved(tmp_path, lambda k, s: [next((r for role, r in rows.items() if k.endswith(role)), s[0]), 0]
                    if k.endswith(tuple(rows)) else s)
    config = tmp_path / "params.json"
    config.write_text(json.dumps(lingua(head_dim=2**16, n_heads=2**16, n_kv_heads=2**15)))
    done = subprocess.run([sys.executable, "-m", "ckptcheck", "check", str(ckpt), "--model-config", str(config),
                           "--format", "json"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 1, done.stderr
    verdicts = {c["id"]: c for c in json.loads(done.stdout)["checks"]}
    heads = verdicts["config[n_heads]"]
    assert heads["status"] == "skip"
    assert "has 4294967296 rows: 65536 × 65536 or 131072 × 32768 or 262144 × 16384" in heads["message"]


def test_weights_with_a_zero_size_dimension_fail_the_config_check_without_a_crash(tmp_path: Path) -> None:
    """Every tensor's 32 (dim) made 0: the weights imply dim 0, and the config repair divided by it
    (ZeroDivisionError, exit 3, in check and inspect).  Now config[dim] fails, saying no config edit helps."""
    ckpt = _resaved(tmp_path, lambda k, s: [0 if n == 32 else n for n in s])
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["check", str(ckpt), "--model-config", str(CONFIGS / "lingua_params.json"), "--format", "json"])
    assert code == 1, err.getvalue()
    verdicts = {c["id"]: c for c in json.loads(out.getvalue())["checks"]}
    assert verdicts["config[dim]"]["status"] == "fail"
    assert verdicts["config[dim]"]["message"] == ("config field model.dim is 32 but the weights imply 0 "
                                                  "(tok_embeddings.weight [128, 0])")
    assert verdicts["config[dim]"]["repair"].startswith("no config describes weights with a zero-size dimension")
    with redirect_stdout(out), redirect_stderr(err):
        assert main(["inspect", str(ckpt)]) == 0


def test_forward_diff_with_a_config_that_does_not_fit_the_weights_is_one_line(tmp_path: Path) -> None:
    """diff --forward reshapes by the config's heads: a config of dim 64 for dim-32 weights was a RuntimeError
    from view (exit 3); now the first tensor whose shape is not the config's is named."""
    config = tmp_path / "params.json"
    config.write_text(json.dumps(lingua(dim=64)))
    import io
    from contextlib import redirect_stderr, redirect_stdout

    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(["diff", GOOD, GOOD, "--forward", "--model-config", str(config)])
    assert (code, err.getvalue().strip()) == (
        2, f"ckptcheck: error: {GOOD}: tok_embeddings.weight: has shape [128, 32] but the config gives [128, 64]: "
           "cannot run the reference forward")


def test_roundtrip_with_a_config_of_more_layers_than_the_checkpoint_refuses_to_build_it(tmp_path: Path) -> None:
    """The round trip's ranks built the config's model on the meta device: 10**9 layers never finished (each
    rank growing without bound).  Now each rank refuses the config in one line naming the field."""
    config = tmp_path / "params.json"
    config.write_text(json.dumps(lingua(n_layers=10**9)))
    done = _limited_cli("roundtrip", GOOD, "--model-config", str(config))
    assert done.returncode == 1, done.stderr
    assert (f"rank 0 failed in phase build: InputError: {config}: field model.n_layers: 1000000000 layers, but the "
            "checkpoint holds 21 entries: it cannot be this model") in done.stdout


def test_unterminated_string_of_escaped_quotes_is_measured_in_one_pass(tmp_path: Path) -> None:
    """The depth scan skips strings; an unterminated one made every later escaped quote a new start, rescanning
    to the end each time (400 KB of \\" took an hour).  Now it is one pass, and the line is JSON's own."""
    config = tmp_path / "params.json"
    config.write_text('{"model": "' + '\\"' * 200_000)
    done = subprocess.run([sys.executable, "-m", "ckptcheck", "check", GOOD, "--model-config", str(config)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"ckptcheck: error: {config}: line 1 column 11: invalid JSON: Unterminated string starting at")


def test_a_head_fix_never_proposes_an_odd_head_size(tmp_path: Path) -> None:
    """dim 64 / n_heads 32 for weights of 32 q rows: the fix took q rows / n_heads = 1 as the head size and
    advised head_dim = 1, a config that is itself refused (odd).  Now the first even candidate, 2."""
    config = tmp_path / "params.json"
    config.write_text(json.dumps(lingua(dim=64, n_heads=32, n_kv_heads=16)))
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["check", GOOD, "--model-config", str(config), "--format", "json"]) == 1
    repairs = {c["id"]: c["repair"] for c in json.loads(out.getvalue())["checks"]}
    assert repairs["config[n_heads]"] == (f"set model.n_heads = 16 and model.n_kv_heads = 8 and model.head_dim = 2 "
                                          f"in {config}, if the weights are the model you meant")
