"""Small building blocks: RMSNorm and rotary position embedding."""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.models import fused as fused_ops


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32. Replicated on every tensor-parallel rank.
    fused: one compiled kernel when training on a GPU (pretrain/models/fused.py)."""

    def __init__(self, dim: int, eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = fused_ops.fused(fused_ops.rms_norm, x) if self.fused else fused_ops.rms_norm
        return fn(x, self.weight, self.eps)


class Rotary(nn.Module):
    """RoPE in the rotate-half (GPT-NeoX) layout, driven by explicit token positions.

    Positions are given per token rather than implied by the index, so a token keeps its
    original position wherever it travels (KV-cache decoding; SUBLLM's subsampled levels).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, s] -> (cos, sin) each [b, 1, s, head_dim], broadcast over heads."""
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # [b, s, hd/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """x [b, h, s, hd]; rotate pairs (i, i + hd/2). fused: one compiled kernel when training on a GPU."""
    fn = fused_ops.fused(fused_ops.rotary, x, cos) if fused else fused_ops.rotary
    return fn(x, cos, sin)
