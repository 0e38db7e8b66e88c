"""``diff``: two checkpoints compared key by key after mapping names and rotary layouts, streaming."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .bits import bit_view, unravel
from .configs import ModelConfig, load_config
from .convert.plan import build_plan
from .convert.stream import ChunkSource, row_ranges
from .errors import InputError
from .formats import open_checkpoint
from .llama import FORWARD_LIMITS, forward_bytes
from .manifest import natural_key
from .naming import map_keys



@dataclass
class KeyDiff:
    key: str  # as A names it
    status: str  # equal, different, missing_in_a, missing_in_b, shape, dtype
    detail: str = ""
    max_abs: float | None = None
    first_index: list[int] | None = None


@dataclass
class ForwardDiff:
    tokens: int
    max_abs: float
    max_logit: float
    tolerance: float

    @property
    def equal(self) -> bool:
        return self.max_abs <= self.tolerance


@dataclass
class DiffReport:
    a: str
    b: str
    keys: list[KeyDiff]
    forward: ForwardDiff | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return all(k.status == "equal" for k in self.keys) and (self.forward is None or self.forward.equal)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "equal": self.equal, "notes": self.notes,
                "keys": [k.__dict__ for k in self.keys],
                "forward": None if self.forward is None else {**self.forward.__dict__, "equal": self.forward.equal}}


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str], *, config: str | os.PathLike[str] | None = None,
         atol: float = 0.0, rtol: float = 0.0, forward: bool = False, tokens: int = 16, seed: int = 0) -> DiffReport:
    """Compare B against A.  Bitwise unless a tolerance is given; q/k compared in A's layout."""
    from .engine import resolve_config_path

    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(None, flag, f"{value} is not a tolerance: give a finite number >= 0")
    if forward and not 1 <= tokens <= FORWARD_LIMITS["tokens"]:
        raise InputError(None, "--tokens", f"{tokens} tokens: give 1 to {FORWARD_LIMITS['tokens']} (the forward "
                         "pass holds [tokens, vocab] logits and a [tokens, tokens] attention map)")

    config_path = resolve_config_path(a, config) or resolve_config_path(b, None)
    cfg = load_config(config_path) if config_path else None
    report = DiffReport(str(a), str(b), [])
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        map_a = map_keys(ca.manifest.tensors)
        if map_a.scheme.rotary != map_keys(cb.manifest.tensors).scheme.rotary and cfg is None:
            raise InputError(b, None, "the two checkpoints use different rotary layouts; pass --model-config so "
                             "q/k can be compared per head")
        plan_b = build_plan(cb.manifest, naming=map_a.scheme, config=cfg)
        # B's tensors, named and laid out as A holds them
        b_moves = {m.dst_key: m for m in plan_b.moves}
        a_keys = {(map_a.scheme.from_canonical(c) if c and not map_a.scheme.is_custom else k): k
                  for k, c in ((k, map_a.canonical.get(k)) for k in ca.manifest.tensors) if k not in map_a.buffers}
        source_b = ChunkSource(cb, measure_casts=False)
        for name in sorted(set(a_keys) | set(b_moves), key=natural_key):
            if name not in a_keys:
                report.keys.append(KeyDiff(name, "missing_in_a", f"only {b} has it"))
                continue
            if name not in b_moves:
                report.keys.append(KeyDiff(name, "missing_in_b", f"only {a} has it"))
                continue
            report.keys.append(_compare(ca, a_keys[name], source_b, b_moves[name], name, atol, rtol))
        if forward:
            if cfg is None:
                raise InputError(a, None, "--forward needs the model's config: pass --model-config")
            if any(k.status == "shape" for k in report.keys):  # not the same model: the keys say where
                report.notes.append("forward not run: the two checkpoints' tensors have different shapes")
            else:
                report.forward = _forward(ca, cb, cfg, tokens, seed, atol, rtol)
    for key, why in plan_b.dropped:
        report.notes.append(f"{b}: {key} not compared ({why})")
    return report


def _compare(ca, a_key: str, source_b: ChunkSource, move, name: str, atol: float, rtol: float) -> KeyDiff:
    import torch

    info = ca.manifest.tensors[a_key]
    if info.shape != move.shape:
        return KeyDiff(name, "shape", f"A {list(info.shape)}, B {list(move.shape)}")
    exact = atol == 0 and rtol == 0
    if info.dtype != move.src_dtype and exact:
        return KeyDiff(name, "dtype", f"A {info.dtype}, B {move.src_dtype} (pass --atol/--rtol to compare values)")
    worst = 0.0
    first: list[int] | None = None
    for start, stop in row_ranges(move):
        got_a = ca.load(a_key) if not info.shape else ca.read_rows(a_key, start, stop)
        got_b = source_b.read(move, start, stop)
        x, y = got_a.double().reshape(-1), got_b.double().reshape(-1)
        if exact and got_a.dtype == got_b.dtype:
            bad = bit_view(got_a) != bit_view(got_b)
        else:
            bad = ~torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
        if not bool(bad.any()):
            continue
        # Two NaNs with different payload bits differ bitwise but by no amount: not an infinite difference.
        delta = (x - y).abs().nan_to_num(nan=math.inf).masked_fill(x.isnan() & y.isnan(), 0.0)
        worst = max(worst, float(delta[bad].max()))
        if first is None:
            flat = int(bad.nonzero()[0, 0]) + start * (info.numel // max(1, info.shape[0]) if info.shape else 1)
            first = unravel(flat, info.shape)
    if first is None:
        return KeyDiff(name, "equal")
    what = f"max abs difference {worst:.6g}" if worst else "only NaN payload bits differ"
    return KeyDiff(name, "different", f"{what} at first index {first}", worst, first)


def _forward(ca, cb, cfg: ModelConfig, n: int, seed: int, atol: float, rtol: float) -> ForwardDiff:
    import torch

    from .llama import streaming_logits

    if cfg.vocab_size is None:  # left to the tokenizer: A's embedding gives it, and B's must have as many rows
        embedding = ca.manifest.tensors.get(map_keys(ca.manifest.tensors).stored_for("tok_embeddings.weight") or "")
        if embedding is None or len(embedding.shape) != 2:
            raise InputError(ca.manifest.path, "tok_embeddings.weight", "missing or not a matrix, and the "
                             "config leaves the vocabulary to the tokenizer: cannot run the reference forward")
        cfg = dataclasses.replace(cfg, vocab_size=embedding.shape[0])
    vocab = cfg.vocab_size
    assert vocab is not None
    need = forward_bytes(cfg, n, vocab)
    if need > FORWARD_LIMITS["bytes"]:
        raise InputError(None, "--tokens", f"{n} tokens: the reference forward would hold {need >> 20} MiB besides "
                         f"the weights ({cfg.n_heads} heads' [tokens, tokens] scores one at a time, [tokens, {vocab}] "
                         f"logits), over its limit of {FORWARD_LIMITS['bytes'] >> 20} MiB: give fewer tokens")
    tokens = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        la, lb = streaming_logits(ca, cfg, tokens), streaming_logits(cb, cfg, tokens)
    max_logit = float(la.abs().max())
    # float32 arithmetic on the same weights in another order: allow 1e-4 of the logits' scale.
    tolerance = atol + (rtol or 1e-4) * max_logit
    return ForwardDiff(n, float((la - lb).abs().max()), max_logit, tolerance)


def render(report: DiffReport) -> str:
    from tabulate import tabulate

    lines = [f"A  {report.a}", f"B  {report.b}", ""]
    rows = [[k.status, k.key, k.detail] for k in report.keys if k.status != "equal"]
    if rows:
        lines.append(tabulate(rows, headers=["status", "key", "detail"], tablefmt="simple"))
        lines.append("")
    lines += report.notes
    equal = sum(k.status == "equal" for k in report.keys)
    lines.append(f"{equal} of {len(report.keys)} tensors equal" + ("" if equal == len(report.keys) else
                 f", {len(report.keys) - equal} differ"))
    if report.forward is not None:
        f = report.forward
        lines.append(f"forward: {f.tokens} tokens, max |logit A - logit B| = {f.max_abs:.3g} "
                     f"(logits up to {f.max_logit:.3g}; tolerance {f.tolerance:.3g}) -> "
                     + ("same" if f.equal else "DIFFERENT"))
    lines.append("EQUAL" if report.equal else "DIFFERENT")
    return "\n".join(lines) + "\n"

