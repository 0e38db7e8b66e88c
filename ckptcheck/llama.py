"""A reference Llama forward pass, streamed one layer at a time, in either rotary convention.

Each checkpoint is run in the convention its naming implies (Meta/lingua/torchtitan rotate interleaved
pairs, Hugging Face rotates halves), on its own tensors as stored.  Two checkpoints of the same model
then give the same logits only if every q/k permutation between them was done right: the one error
that shapes cannot show.  Everything is computed in float32; one layer's weights are loaded at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .configs import ModelConfig
from .errors import InputError
from .naming import map_keys, role_of
from .spec import role_shapes

if TYPE_CHECKING:
    import torch

    from .formats import Checkpoint


# The reference forward's bounds: what it holds besides the weights (one layer's, as float32) grows with
# tokens^2 (one head's causal scores at a time) and tokens x vocab (both checkpoints' logits), so it is
# computed from the config before anything runs (``forward_bytes``).
FORWARD_LIMITS = {"tokens": 4096, "bytes": 1 << 30}


def forward_bytes(cfg: ModelConfig, tokens: int, vocab: int) -> int:
    """The most bytes the forward of ``tokens`` tokens holds besides the weights, for two checkpoints compared:
    one head's scores, their mask and softmax; each side's hidden states, FFN activations and logits; and the
    difference of the logits."""
    f32 = 4
    scores = tokens * tokens * (3 * f32 + 1)
    hidden = tokens * (2 * cfg.dim + cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
                       + 3 * cfg.ffn_dim) * f32
    logits = 4 * tokens * vocab * f32  # A's, B's, their difference and its absolute value
    return scores + hidden + logits


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary_angles(seq_len: int, head_dim: int, theta: float) -> torch.Tensor:
    """[seq_len, head_dim // 2] angles: position times each pair's frequency."""
    import torch

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs).float()


def apply_rotary(x: torch.Tensor, angles: torch.Tensor, convention: str) -> torch.Tensor:
    """Rotate [seq, heads, head_dim] by ``angles``; "interleaved" pairs (2i, 2i+1), "half" pairs (i, i+hd/2)."""
    import torch

    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    if convention == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    if convention == "half":
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    raise ValueError(f"unknown rotary convention {convention!r}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over [seq, heads, hd] with grouped KV heads; returns [seq, heads * hd].  One head at a
    time, so the scores held are [seq, seq], not [heads, seq, seq] (``forward_bytes``)."""
    import torch

    groups = q.shape[1] // k.shape[1]
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1)
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        scores = (q[:, h] @ k[:, h // groups].T) / q.shape[-1] ** 0.5
        out[:, h] = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v[:, h // groups]
    return out.reshape(q.shape[0], -1)


def streaming_logits(ckpt: Checkpoint, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [seq, vocab] of ``tokens`` under the checkpoint's own naming and rotary convention."""
    import torch.nn.functional as F

    mapping = map_keys(ckpt.manifest.tensors)
    if mapping.scheme.is_custom:
        raise InputError(ckpt.manifest.path, None, "keys follow no Llama-family scheme: no reference forward")
    convention = mapping.scheme.rotary
    shapes = role_shapes(cfg)

    def load(canonical: str, stored: str):
        """The stored tensor, once its shape is the config's: the forward reshapes by the config's heads."""
        shape, want = ckpt.manifest.tensors[stored].shape, shapes[role_of(canonical)]
        if len(shape) != len(want) or any(w not in (None, s) for s, w in zip(shape, want, strict=False)):
            raise InputError(ckpt.manifest.path, stored, f"has shape {list(shape)} but the config gives "
                             f"{[s if s is not None else 'vocab' for s in want]}: cannot run the reference forward")
        return ckpt.load(stored).float()

    def w(canonical: str):
        stored = mapping.stored_for(canonical)
        if stored is None:
            if canonical == "output.weight":
                return w("tok_embeddings.weight")  # tied
            raise InputError(ckpt.manifest.path, canonical, "missing: cannot run the reference forward")
        return load(canonical, stored)

    def linear(x, weight: str):
        """x @ W.T, plus the projection's bias when the checkpoint has one (attention_bias, mlp_bias)."""
        out = x @ w(weight).T
        bias_key = weight.removesuffix(".weight") + ".bias"
        bias = mapping.stored_for(bias_key)
        return out if bias is None else out + load(bias_key, bias)

    h = F.embedding(tokens, w("tok_embeddings.weight"))
    seq = tokens.shape[0]
    angles = rotary_angles(seq, cfg.head_dim, cfg.rope_theta)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w(p + "attention_norm.weight"), cfg.norm_eps)
        q = linear(x, p + "attention.wq.weight").view(seq, cfg.n_heads, cfg.head_dim)
        k = linear(x, p + "attention.wk.weight").view(seq, cfg.n_kv_heads, cfg.head_dim)
        v = linear(x, p + "attention.wv.weight").view(seq, cfg.n_kv_heads, cfg.head_dim)
        q, k = apply_rotary(q, angles, convention), apply_rotary(k, angles, convention)
        h = h + linear(attention(q, k, v), p + "attention.wo.weight")
        x = rms_norm(h, w(p + "ffn_norm.weight"), cfg.norm_eps)
        gated = F.silu(linear(x, p + "feed_forward.w1.weight")) * linear(x, p + "feed_forward.w3.weight")
        h = h + linear(gated, p + "feed_forward.w2.weight")
    return rms_norm(h, w("norm.weight"), cfg.norm_eps) @ w("output.weight").T
