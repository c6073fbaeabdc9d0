"""The LLaMA block ('T' in a structure string): pre-RMSNorm attention and SwiGLU, both residual."""
from __future__ import annotations

import math
import torch.nn as nn

from pretrain.models.attention import Attention
from pretrain.models.layers import RMSNorm
from pretrain.models.mlp import SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, cfg, spec, *, layer_id: int, n_blocks: int):
        super().__init__()
        self.layer_id = layer_id  # index into the generation caches
        out_std = cfg.init_std / math.sqrt(2 * n_blocks)  # residual-branch outputs scaled (GPT-2)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, spec=spec, init_std=cfg.init_std,
                              out_std=out_std)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden, spec=spec, init_std=cfg.init_std, out_std=out_std)

    @staticmethod
    def train_flops(cfg, r: float = 1.0) -> float:
        """Forward + backward FLOPs per input token when the block sees a fraction r of the tokens:
        its matmuls on r·s tokens, each attending over r·s (trainer.flops_per_token)."""
        d, hd = cfg.d_model, cfg.head_dim
        matmul = 2 * d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd + 3 * d * cfg.ffn_hidden
        return r * (6 * matmul + 12 * d * r * cfg.seq_len)

    def forward(self, p):
        if p.hidden.numel() == 0:  # inside a SUBLLM level that kept no token on this call: nothing to do
            return p
        cache = p.caches[self.layer_id] if p.caches is not None else None
        h = p.hidden + self.attn(self.attn_norm(p.hidden), p.rope, cache, p.rows, p.active)
        experts = p.experts[self.layer_id] if p.experts is not None else None
        h = h + self.mlp(self.mlp_norm(h), experts, p.rows)
        return p._replace(hidden=h)

    def new_cache(self, batch: int, max_len: int, *, dtype, device):
        from pretrain.models.attention import KVCache

        return KVCache(batch, self.attn.kv_heads, max_len, self.attn.head_dim, dtype=dtype, device=device)
