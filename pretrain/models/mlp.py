"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models import fused as fused_ops


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, *, spec, init_std: float, out_std: float, elastic: bool = False,
                 fused: bool = False):
        super().__init__()
        self.fused = fused  # silu(gate) * up as one compiled kernel in training (pretrain/models/fused.py)
        # gate and up are separate column linears so each TP shard holds matching neuron rows
        # (neuron i's gate row, up row and down column live on the same rank).
        self.gate = spec.column(d_model, hidden, init_std=init_std)
        self.up = spec.column(d_model, hidden, init_std=init_std)
        self.down = spec.row(hidden, d_model, init_std=out_std)
        if elastic:  # Flextron: one unit = one neuron, dealt round-robin over TP ranks (parallel/elastic_layout.py)
            for w in (self.gate.weight, self.up.weight, self.down.weight):
                w.elastic_unit = 1

    def forward(self, x: torch.Tensor, experts=None, rows: torch.Tensor | None = None,
                width: int | None = None) -> torch.Tensor:
        """experts: GRIFFIN's per-sequence neurons during generation (griffin.Experts): scored on
        the prompt (prefill), then the only neurons each decoded token uses.
        width: a Flextron sub-network's neurons on this rank, the first `width` (None = all)."""
        if width is not None and width < self.gate.weight.shape[0]:
            from parallel.sliced import column_slice, row_slice

            z = F.silu(column_slice(x, self.gate.weight, width)) * column_slice(x, self.up.weight, width)
            return row_slice(z, self.down.weight, width)
        if experts is not None and experts.ready:
            return experts.decode(x)
        g, u = self.gate(x), self.up(x)
        z = fused_ops.fused(fused_ops.swiglu, g, u)(g, u) if self.fused else fused_ops.swiglu(g, u)
        if experts is not None:
            experts.observe(z, rows)
        return self.down(z)
