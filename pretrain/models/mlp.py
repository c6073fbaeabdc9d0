"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _SiluMul(torch.autograd.Function):
    """silu(gate) ⊙ up, saving only its two inputs (autograd would also keep silu(gate)): the
    backward recomputes the sigmoid, a few element-wise ops against a [tokens, hidden] tensor."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        dtype = gate.dtype
        gate, up, grad = (upcast(t) for t in (gate, up, grad))
        sig = torch.sigmoid(gate)
        grad_gate = grad * up * sig * (1 + gate * (1 - sig))
        return grad_gate.to(dtype), (grad * gate * sig).to(dtype)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 for element-wise backward math (bf16 stays bf16 only in storage)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SiluMul.apply(gate, up) if torch.is_grad_enabled() else F.silu(gate) * up


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
        z = silu_mul(self.gate(x), self.up(x))
        if experts is not None:
            experts.observe(z, rows)
        return self.down(z)
