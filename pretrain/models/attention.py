"""Causal self-attention with GQA, RoPE and an optional KV cache, through PyTorch SDPA."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.layers import apply_rotary


class KVCache:
    """Keys/values of one attention layer for generation: [b, kv_heads_local, max_len, hd]."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = k.shape[2]
        if self.length + s > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {self.length + s} > {self.k.shape[2]} positions")
        self.k[:, :, self.length:self.length + s] = k
        self.v[:, :, self.length:self.length + s] = v
        self.length += s
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, spec, init_std: float, out_std: float):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.heads = n_heads // spec.tp_size  # local (this TP rank's) query heads
        self.kv_heads = n_kv_heads // spec.tp_size  # local KV heads: whole query groups per rank
        # Separate q/k/v keep the logical weight layout TP-independent: shard r of each holds the
        # same contiguous query groups, so a checkpoint re-shards by plain splitting.
        self.q = spec.column(d_model, n_heads * self.head_dim, init_std=init_std)
        self.k = spec.column(d_model, n_kv_heads * self.head_dim, init_std=init_std)
        self.v = spec.column(d_model, n_kv_heads * self.head_dim, init_std=init_std)
        self.o = spec.row(n_heads * self.head_dim, d_model, init_std=out_std)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        if past == 0:
            mask, causal = None, True
        elif s == 1:
            mask, causal = None, False  # one new token attends to everything cached
        else:  # a chunk after a prefix: token i sees cache + new tokens <= i
            t = past + s
            mask = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        gqa = self.heads != self.kv_heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.o(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
