"""The LLaMA block ('T' in a structure string): pre-RMSNorm attention and SwiGLU, both residual."""
from __future__ import annotations

import math
import torch.nn as nn

from pretrain.models.attention import Attention
from pretrain.models.elastic import branch, local_widths, slice_choice
from pretrain.models.layers import RMSNorm
from pretrain.models.mlp import SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, cfg, spec, *, layer_id: int, n_blocks: int):
        super().__init__()
        self.layer_id = layer_id  # index into the generation caches
        out_std = cfg.init_std / math.sqrt(2 * n_blocks)  # residual-branch outputs scaled (GPT-2)
        fused = cfg.fused_kernels
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, fused=fused)
        elastic = cfg.elastic.enabled
        # an exported Flextron sub-network has its own width per block (cfg.block_*)
        self.attn = Attention(cfg.d_model, cfg.block_heads(layer_id), cfg.block_kv_heads(layer_id), spec=spec,
                              init_std=cfg.init_std, out_std=out_std, head_dim=cfg.head_dim, elastic=elastic,
                              fused=fused, backend=cfg.attention_backend)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, fused=fused)
        self.mlp = SwiGLU(cfg.d_model, cfg.block_ffn(layer_id), spec=spec, init_std=cfg.init_std, out_std=out_std,
                          elastic=elastic, fused=fused)
        if elastic:  # this rank's share of each offered width (elastic.py)
            self.mlp_widths = local_widths(cfg.elastic.ffn_widths(cfg.ffn_hidden), spec.tp_size)
            self.head_groups = local_widths(cfg.elastic.head_groups(cfg.kv_heads), spec.tp_size)

    @staticmethod
    def train_flops(cfg, r: float = 1.0, layer: int = 0) -> float:
        """Forward + backward FLOPs per input token when the block sees a fraction r of the tokens:
        its matmuls on r·s tokens, each attending over r·s (trainer.flops_per_token)."""
        d, hd, heads = cfg.d_model, cfg.head_dim, cfg.block_heads(layer)
        matmul = 2 * d * heads * hd + 2 * d * cfg.block_kv_heads(layer) * hd + 3 * d * cfg.block_ffn(layer)
        return r * (6 * matmul + 12 * heads * hd * r * cfg.seq_len)

    def forward(self, p):
        if p.hidden.numel() == 0:  # inside a SUBLLM level that kept no token on this call: nothing to do
            return p
        cache = p.caches[self.layer_id] if p.caches is not None else None
        experts = p.experts[self.layer_id] if p.experts is not None else None
        mlp_choice, mlp_gate, heads_choice, heads_gate = slice_choice(p.elastic, self.layer_id)
        if heads_choice is None and cache is None and experts is None:  # training, plain forward
            return p._replace(hidden=self._dense(p.hidden, *p.rope))
        if heads_choice is None:  # the plain block, generating
            h = p.hidden + self.attn(self.attn_norm(p.hidden), p.rope, cache, p.rows, p.active)
            return p._replace(hidden=h + self.mlp(self.mlp_norm(h), experts, p.rows))
        # a Flextron sub-network (training): each branch on the chosen first units, times its gate
        cos, sin = p.rope
        attn = lambda x, cos, sin, groups: self.attn(self.attn_norm(x), (cos, sin), groups=groups)  # noqa: E731
        h = p.hidden + branch(attn, (p.hidden, cos, sin), heads_choice, heads_gate, self.head_groups)
        mlp = lambda x, width: self.mlp(self.mlp_norm(x), width=width)  # noqa: E731
        return p._replace(hidden=h + branch(mlp, (h,), mlp_choice, mlp_gate, self.mlp_widths))

    @property
    def _dense(self):
        """`dense`, or its torch.compile'd form once `training.compile` set one (fused.compile_blocks)."""
        return self.__dict__.get("compiled_dense", self.dense)

    def dense(self, x, cos, sin):
        """The plain block on plain tensors (no payload, cache or sub-network): what torch.compile
        compiles, since dynamo cannot trace the Payload NamedTuple (an internal error in torch 2.11)."""
        h = x + self.attn(self.attn_norm(x), (cos, sin))
        return h + self.mlp(self.mlp_norm(h))

    def new_cache(self, batch: int, max_len: int, *, dtype, device):
        from pretrain.models.attention import KVCache

        return KVCache(batch, self.attn.kv_heads, max_len, self.attn.head_dim, dtype=dtype, device=device)
