"""The Llama-family ``nn.Module`` the round trip shards: Meta/lingua parameter names and layout.

Parameter names are ckptcheck's canonical keys (``layers.0.attention.wq.weight``), so its state dict is
what lingua and Meta checkpoints hold.  The forward pass reuses ``llama``'s functions, so the module and
the streamed reference forward compute the same thing.
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import ModelConfig
from .llama import apply_rotary, attention, rms_norm, rotary_angles


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.float(), self.weight.float(), self.eps).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        seq, c = x.shape[0], self.cfg
        q = apply_rotary(self.wq(x).view(seq, c.n_heads, c.head_dim), angles, "interleaved")
        k = apply_rotary(self.wk(x).view(seq, c.n_kv_heads, c.head_dim), angles, "interleaved")
        return self.wo(attention(q, k, self.wv(x).view(seq, c.n_kv_heads, c.head_dim)))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), angles)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only Llama; ``tie_embeddings`` makes ``output.weight`` the embedding's Parameter."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("the config leaves vocab_size to the tokenizer: set it to build the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        angles = rotary_angles(tokens.shape[0], self.cfg.head_dim, self.cfg.rope_theta).to(self.norm.weight.device)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, angles)
        return self.output(self.norm(h))
