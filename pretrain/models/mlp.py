"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, *, spec, init_std: float, out_std: float):
        super().__init__()
        # gate and up are separate column linears so each TP shard holds matching neuron rows
        # (neuron i's gate row, up row and down column live on the same rank).
        self.gate = spec.column(d_model, hidden, init_std=init_std)
        self.up = spec.column(d_model, hidden, init_std=init_std)
        self.down = spec.row(hidden, d_model, init_std=out_std)

    def forward(self, x: torch.Tensor, experts=None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """experts: GRIFFIN's per-sequence neurons during generation (griffin.Experts): scored on
        the prompt (prefill), then the only neurons each decoded token uses."""
        if experts is not None and experts.ready:
            return experts.decode(x)
        z = F.silu(self.gate(x)) * self.up(x)
        if experts is not None:
            experts.observe(z, rows)
        return self.down(z)
