"""What the config attack on issue 11 found: every dimension, witness and number a config states is judged
by one rule, and what ckptcheck itself writes passes ckptcheck's own check."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptcheck.cli import main


def _meta_state(dim: int, n_layers: int, q_rows: int, kv_rows: int, vocab: int, ffn: int, *,
                dtype: torch.dtype = torch.bfloat16, tied: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    sd = {"tok_embeddings.weight": r(vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd |= {p + "attention.wq.weight": r(q_rows, dim), p + "attention.wk.weight": r(kv_rows, dim),
               p + "attention.wv.weight": r(kv_rows, dim), p + "attention.wo.weight": r(dim, q_rows),
               p + "feed_forward.w1.weight": r(ffn, dim), p + "feed_forward.w2.weight": r(dim, ffn),
               p + "feed_forward.w3.weight": r(ffn, dim),
               p + "attention_norm.weight": torch.ones(dim, dtype=dtype), p + "ffn_norm.weight": torch.ones(dim, dtype=dtype)}
    sd["norm.weight"] = torch.ones(dim, dtype=dtype)
    sd["output.weight"] = sd["tok_embeddings.weight"] if tied else r(vocab, dim)
    return sd


def _meta_folder(folder: Path, state: dict[str, torch.Tensor], params: dict[str, object]) -> Path:
    folder.mkdir(parents=True)
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def _limited_cli(*args: str, address_space: int) -> subprocess.CompletedProcess[str]:
    """The CLI in a process whose address space is capped: an allocation past the bound fails, not the machine."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run([sys.executable, "-m", "ckptcheck", *args], capture_output=True, text=True,
                          preexec_fn=limit, timeout=600)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(("dtype", "theta"), [(torch.float16, 1e6), (torch.float16, 5e5), (torch.bfloat16, 1e6)])
def test_fp16_rope_freqs_of_the_right_theta_pass(tmp_path: Path, dtype: torch.dtype, theta: float,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # head_dim 128 as in every Llama; computed in float32 as Meta's model does, then cast with the state dict:
    # at theta >= ~2e5 the last fp16 frequencies are subnormal, where a relative tolerance fails.
    sd = _meta_state(256, 1, 256, 256, 64, 768, dtype=dtype)
    sd["rope.freqs"] = (1.0 / (theta ** (torch.arange(0, 128, 2).float() / 128))).to(dtype)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    params = {"dim": 256, "n_layers": 1, "n_heads": 2, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
              "norm_eps": 1e-5, "rope_theta": theta, "vocab_size": 64}
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert main(["check", str(tmp_path), "-v"]) == 0
    assert f"PASS   config[rope_theta]  rope_theta = {theta}, as the values of rope.freqs [64] show" in capsys.readouterr().out
    # one ulp off is still the stored value of that theta; another theta is not
    params["rope_theta"] = theta * 1.01
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert main(["check", str(tmp_path), "-v"]) == 1
    assert "FAIL   config[rope_theta]" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--head-dim", "1"], ["--n-heads", "128"], ["--n-kv-heads", "32"]])
def test_inspect_refuses_an_odd_head_size(tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """dim 128, 128 q rows and 32 kv rows: head_dim 1 fits the rows, but is odd; the params.json written was then
    refused by ckptcheck's own check.  Every head size accepted goes through the one rule (head_size_error)."""
    ckpt = tmp_path / "consolidated.00.pth"
    torch.save(_meta_state(128, 2, 128, 32, 256, 384), ckpt)
    assert main(["inspect", str(ckpt), "--params", "lingua", *flags]) == 2
    assert capsys.readouterr().err.strip() == (f"ckptcheck: error: {ckpt}: the head split does not fit the weights: "
                                               "head_dim 1 is odd: rotary embeddings turn pairs of dimensions")


def test_head_fix_advice_never_proposes_an_odd_head_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """wq 30 rows, wk 15: the fix fell back to gcd(30, 15) = 15 and advised head_dim = 15, which the config
    loader then refuses.  No even head size splits 15 rows: the advice says so instead."""
    ckpt = tmp_path / "consolidated.pth"
    torch.save(_meta_state(32, 2, 30, 15, 64, 96), ckpt)
    config = tmp_path / "params.json"
    config.write_text(json.dumps({"model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
                                            "multiple_of": 32, "norm_eps": 1e-05}}))
    assert main(["check", str(ckpt), "--model-config", str(config), "--format", "json"]) == 1
    repairs = {c["id"]: c["repair"] for c in json.loads(capsys.readouterr().out)["checks"]}
    assert repairs["config[n_heads]"] == repairs["config[n_kv_heads]"] == (
        "no even head size splits layers.0.attention.wq.weight's 30 rows and layers.0.attention.wk.weight's 15 rows "
        "into heads: the weights are no rotary attention a config can describe")


def test_inspect_meta_params_of_tied_weights_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Meta's params.json has no weight_tying: inspect --params meta wrote one without it for tied weights (exit
    0), and ckptcheck's own check then failed config[tie_embeddings].  Refused like head_dim and biases."""
    ckpt = tmp_path / "consolidated.pth"
    torch.save(_meta_state(32, 2, 32, 16, 128, 96, tied=True), ckpt)
    assert main(["inspect", str(ckpt), "--params", "meta", "--n-heads", "4"]) == 2
    assert _error_line(capsys) == (
        f"ckptcheck: error: {ckpt}: no params.json written: the output weight is the embedding (tied), and Meta's "
        "params.json has no weight_tying field (its Llama has its own output weight): use --params lingua")
    # what lingua's params.json states, ckptcheck's own check accepts
    assert main(["inspect", str(ckpt), "--params", "lingua", "--n-heads", "4"]) == 0
    (tmp_path / "params.json").write_text(capsys.readouterr().out)
    assert main(["check", str(ckpt)]) == 0


TOKENIZER_VOCAB = {"dim": 128, "multiple_of": 256, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}


def test_diff_forward_of_different_vocabularies_is_the_key_diff_not_a_crash(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """vocab_size -1 leaves the vocabulary to the tokenizer; A has 256 rows, B 200: tokens drawn from the config's
    (absent) vocabulary indexed past B's embedding (IndexError), and the other way the logits' widths differed
    (size mismatch), exit 3 both.  Now the key diff's shape differences answer, exit 1, and the forward is not run."""
    a = _meta_state(128, 2, 128, 128, 256, 512)
    b = {**a, "tok_embeddings.weight": a["tok_embeddings.weight"][:200].clone(),
         "output.weight": a["output.weight"][:200].clone()}
    config = tmp_path / "params.json"
    config.write_text(json.dumps(TOKENIZER_VOCAB))
    for x, y in ((a, b), (b, a)):
        torch.save(x, tmp_path / "x.pth")
        torch.save(y, tmp_path / "y.pth")
        assert main(["diff", str(tmp_path / "x.pth"), str(tmp_path / "y.pth"), "--model-config", str(config),
                     "--forward"]) == 1
        out = capsys.readouterr().out
        assert "forward not run: the two checkpoints' tensors have different shapes" in out
        assert out.rstrip().endswith("DIFFERENT")


def test_diff_forward_of_an_output_wider_than_the_embedding_is_one_line(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Both sides alike, but each output weight has 200 rows for an embedding of 256: with the vocabulary left to
    the tokenizer, the embedding's rows are the vocabulary, and the output weight is refused in one line."""
    a = _meta_state(128, 2, 128, 128, 256, 512)
    a["output.weight"] = a["output.weight"][:200].clone()
    torch.save(a, tmp_path / "a.pth")
    config = tmp_path / "params.json"
    config.write_text(json.dumps(TOKENIZER_VOCAB))
    assert main(["diff", str(tmp_path / "a.pth"), str(tmp_path / "a.pth"), "--model-config", str(config),
                 "--forward"]) == 2
    assert _error_line(capsys) == (f"ckptcheck: error: {tmp_path / 'a.pth'}: output.weight: has shape [200, 128] but "
                                   "the config gives [256, 128]: cannot run the reference forward")


def test_diff_forward_attention_is_bounded_by_one_head(tmp_path: Path) -> None:
    """64 heads of size 2 in a 400 KB checkpoint: the forward held [64, tokens, tokens] scores (256 MiB at 1,024
    tokens, 4 GiB at 4,096) and failed under a 1 GB address space.  Now one head's [tokens, tokens] at a time."""
    ckpt = _meta_folder(tmp_path / "heads", _meta_state(128, 1, 128, 128, 16, 352),
                        {"dim": 128, "n_layers": 1, "n_heads": 64, "n_kv_heads": 64, "vocab_size": 16,
                         "multiple_of": 16, "norm_eps": 1e-05})
    done = _limited_cli("diff", str(ckpt), str(ckpt), "--forward", "--tokens", "1024", address_space=1 << 30)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.rstrip().endswith("EQUAL")


def test_diff_forward_logits_past_the_limit_are_refused_before_running(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """4,096 tokens of a 16,384-word vocabulary: [tokens, vocab] float32 logits for both sides and their difference
    are 1.2 GiB from a 300 KB checkpoint.  The peak is computed from the config before anything runs
    (llama.forward_bytes against llama.FORWARD_LIMITS) and refused in one line."""
    ckpt = _meta_folder(tmp_path / "wide", _meta_state(8, 1, 8, 8, 16384, 32),
                        {"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 16384, "multiple_of": 32})
    assert main(["diff", str(ckpt), str(ckpt), "--forward", "--tokens", "4096"]) == 2
    assert _error_line(capsys) == (
        "ckptcheck: error: --tokens: 4096 tokens: the reference forward would hold 1234 MiB besides the weights (2 "
        "heads' [tokens, tokens] scores one at a time, [tokens, 16384] logits), over its limit of 1024 MiB: give "
        "fewer tokens")
    assert main(["diff", str(ckpt), str(ckpt), "--forward", "--tokens", "64"]) == 0


def test_a_config_ckptcheck_wrote_is_never_a_witness(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """src's params.json states a wrong split (8 x 16 for weights trained as 4 x 32) that nothing confirms.  convert
    wrote it into out/config.json, and checking out against src's params.json then counted that file as an
    independent witness: n_heads, norm_eps and rope_theta PASSED on the config's own word.  Now the written config
    carries the config it was written from (configs.PROVENANCE_KEY), and check never counts it."""
    src = _meta_folder(tmp_path / "src", _meta_state(128, 1, 128, 64, 64, 512),
                       {"dim": 128, "n_layers": 1, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 64,
                        "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0})
    params = src / "params.json"
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf"]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["ckptcheck_written_from"] == str(params)
    capsys.readouterr()
    # (exit 1: naming[meta] fails, the output is named as Hugging Face names it, not as the params.json loads)
    assert main(["check", str(tmp_path / "out"), "--model-config", str(params), "-v"]) == 1
    lines = {line.split()[1]: line.split()[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith(("PASS", "SKIP", "FAIL")) and "config[" in line}
    assert {name: lines[f"config[{name}]"] for name in ("n_heads", "n_kv_heads", "norm_eps", "rope_theta")} == {
        "n_heads": "SKIP", "n_kv_heads": "SKIP", "norm_eps": "SKIP", "rope_theta": "SKIP"}
    # convert may permute back with it: it is the split ckptcheck permuted these rows with, so the round trip
    # restores src's weights bit for bit (a conversion's question is the layout, not whether the config is right)
    out = tmp_path / "out"
    assert main(["convert", str(out), str(tmp_path / "back.pth"), "--to", "torch", "--naming", "meta"]) == 0
    original = torch.load(src / "consolidated.00.pth", weights_only=True)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    # a config ckptcheck wrote with another split confirms nothing
    hf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**hf, "num_attention_heads": 4, "num_key_value_heads": 2}))
    assert main(["convert", str(out), str(tmp_path / "back2.pth"), "--to", "torch", "--naming", "meta",
                 "--model-config", str(params)]) == 2
    assert _error_line(capsys) == (
        f"ckptcheck: error: {out}: permuting q/k rows assumes the config's split (n_heads 8, n_kv_heads 4, head_dim 16), "
        "which nothing in or beside the checkpoint confirms; pass --head-dim 16 if that is the training run's head size")


GOOD = Path(__file__).resolve().parent.parent / "fixtures" / "good"
META_PARAMS = Path(__file__).resolve().parent.parent / "fixtures" / "configs" / "meta_params.json"


def test_a_config_of_many_empty_values_is_refused_before_parsing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """16 MiB of {} (under the old 16 MiB config limit) parsed into 5.6 million dicts: ~877 MiB.  A config is
    a few KB: 1 MiB and 65,536 values and containers at most (configs.JSON_LIMITS), the values counted on the text first."""
    config = tmp_path / "params.json"
    config.write_text('{"x":[' + ",".join(["{}"] * 300_000) + '],"dim":64,"n_layers":2,"n_heads":4,"vocab_size":128}')
    assert main(["check", str(GOOD / "consolidated.pth"), "--model-config", str(config)]) == 2
    assert _error_line(capsys) == f"ckptcheck: error: {config}: 600006 JSON values and containers (limit 65536)"
    config.write_text(json.dumps({**json.loads(META_PARAMS.read_text()), "pad": " " * (2 << 20)}))
    assert main(["check", str(GOOD / "consolidated.pth"), "--model-config", str(config)]) == 2
    assert _error_line(capsys) == (f"ckptcheck: error: {config}: {config.stat().st_size} bytes is too large for "
                                   "config JSON (limit 1048576)")


def test_a_shard_index_has_its_own_larger_limit(tmp_path: Path) -> None:
    """An index lists every tensor: past a config's 1 MiB it is still read (its own limit in configs.JSON_LIMITS)."""
    import shutil

    folder = tmp_path / "hf_sharded"
    shutil.copytree(GOOD / "hf_sharded", folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "metadata": {**data.get("metadata", {}), "note": " " * (2 << 20)}}))
    assert main(["check", str(folder)]) == 0


def test_the_config_under_test_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """corroborate parsed the tested config a second time to tell a copy of it from a witness."""
    from ckptcheck import configs

    read: list[Path] = []
    real = configs.read_json
    monkeypatch.setattr(configs, "read_json", lambda path, *a: read.append(Path(path)) or real(path, *a))
    assert main(["check", str(GOOD / "consolidated.pth"), "--model-config", str(META_PARAMS)]) == 0
    assert read.count(META_PARAMS) == 1


LLAMA31_8B = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
LLAMA31_70B = {"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64, "n_kv_heads": 8,
               "n_layers": 80, "norm_eps": 1e-05, "vocab_size": 128256, "rope_theta": 500000.0, "use_scaled_rope": True}
LLAMA31_8B_TRANSFORMERS5 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "dtype": "bfloat16", "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"},
    "tie_word_embeddings": False, "transformers_version": "5.0.0", "use_cache": True, "vocab_size": 128256}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("params.json", LLAMA31_8B, (4096, 32, 32, 8, 128, 14336, 128256, None)),
    ("params.json", LLAMA31_70B, (8192, 80, 64, 8, 128, 28672, 128256, None)),
    ("config.json", LLAMA31_8B_TRANSFORMERS5, (4096, 32, 32, 8, 128, 14336, 128256, "bfloat16")),
    ("config.json", MISTRAL_7B, (4096, 32, 32, 8, 128, 14336, 32000, "bfloat16")),
])
def test_published_configs_load_as_their_models(tmp_path: Path, name: str, data: dict[str, object],
                                                expected: tuple[object, ...]) -> None:
    """Real published configs (as their repositories ship them) are read without a refusal, as their models."""
    from ckptcheck.configs import LLAMA3_ROPE_SCALING, load_config

    (tmp_path / name).write_text(json.dumps(data))
    cfg = load_config(tmp_path / name)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size,
            cfg.dtype) == expected
    assert cfg.rope_scaling == (None if data is MISTRAL_7B else LLAMA3_ROPE_SCALING)


HF_SMALL = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 128}


@pytest.mark.parametrize(("change", "item", "cause"), [
    ({"rope_scaling": {"rope_type": "linear", "factor": True}}, "field rope_scaling.factor",
     "must be a number, got True"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, None], "long_factor": [1.0, 2.0]}},
     "field rope_scaling.short_factor", "must be a number, got None"),
    ({"torch_dtype": None, "dtype": "float99"}, "field dtype", "unknown dtype 'float99'"),
    ({"torch_dtype": "x" * 100}, "field torch_dtype", f"unknown dtype {repr('x' * 100)[:60]}..."),
])
def test_config_values_are_judged_by_their_field(tmp_path: Path, change: dict[str, object], item: str, cause: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A boolean rotary factor and a null in LongRoPE's factors passed; `torch_dtype: null` hid the stated
    `dtype` (transformers 5's name) from the dtype check.  Quoted values are cut in one place (bounded_json.shown)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**HF_SMALL, **change}))
    assert main(["check", str(GOOD / "hf"), "--model-config", str(config)]) == 2
    assert _error_line(capsys) == f"ckptcheck: error: {config}: {item}: {cause}"


def test_a_dtype_stated_under_transformers_5s_name_is_the_config_dtype(tmp_path: Path) -> None:
    from ckptcheck.configs import load_config

    (tmp_path / "config.json").write_text(json.dumps({**HF_SMALL, "torch_dtype": None, "dtype": "float16"}))
    assert load_config(tmp_path / "config.json").dtype == "float16"
