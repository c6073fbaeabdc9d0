"""The HGRN-Bit block ('H' in a structure string): the MatMul-free LM's MLGRU token mixer and GLU
channel mixer, both residual, with pre-RMSNorm (docs/matmulfree.md).

    f_t = σ(x_t W_f)        c_t = SiLU(x_t W_c)        h_t = f_t ⊙ h_{t−1} + (1 − f_t) ⊙ c_t
    g_t = σ(x_t W_g)        o_t = (g_t ⊙ h_t) W_o                          (MLGRU, the paper's eq.)
    GLU(x) = W_down (SiLU(x W_gate) ⊙ x W_up)

Every W is a linear from the layer spec: ternary BitLinear under `model.linear: ternary` (each owns
the RMSNorm of its input), dense otherwise. The recurrence is element-wise per channel, so tensor
parallelism splits the channels: W_f, W_c, W_g are column-parallel, each rank scans its own channels,
and W_o is row-parallel. Training scans the whole sequence in parallel (kernels/scan.py);
generation carries h (O(d) per layer, no KV cache) and advances it one token at a time.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.scan import linear_scan, recurrent_step
from pretrain.models.layers import RMSNorm
from pretrain.models.mlp import SwiGLU


class RecurrentState:
    """The MLGRU state of one layer during generation: h [b, channels_local], fp32 whatever the model's
    dtype (it accumulates over the whole sequence). Its size does not grow with the sequence."""

    def __init__(self, batch: int, channels: int, *, device):
        self.h = torch.zeros(batch, channels, dtype=torch.float32, device=device)

    def start_decode(self, max_steps: int) -> None:  # a fixed-size state: nothing to trim or move
        pass

    def nbytes(self) -> int:
        return self.h.numel() * self.h.element_size()


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 for element-wise backward math (bf16 stays bf16 only in storage)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _GateInputs(torch.autograd.Function):
    """(f_pre, c_pre) -> (a, b) = (σ(f_pre), (1 − σ(f_pre)) ⊙ SiLU(c_pre)), the scan's inputs. Saves
    a (which the scan keeps anyway: one tensor) and c_pre; autograd would also keep 1 − f and SiLU(c)."""

    @staticmethod
    def forward(ctx, f_pre, c_pre):
        a = torch.sigmoid(f_pre)
        ctx.save_for_backward(a, c_pre)
        return a, (1 - a) * F.silu(c_pre)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        a, c = (upcast(t) for t in ctx.saved_tensors)
        grad_a = torch.zeros_like(a) if grad_a is None else upcast(grad_a)
        grad_b = torch.zeros_like(a) if grad_b is None else upcast(grad_b)
        sig_c = torch.sigmoid(c)
        silu_c = c * sig_c
        grad_f = (grad_a - grad_b * silu_c) * a * (1 - a)
        grad_c = grad_b * (1 - a) * sig_c * (1 + c * (1 - sig_c))
        dtype = ctx.saved_tensors[1].dtype
        return grad_f.to(dtype), grad_c.to(dtype)


def gate_inputs(f_pre: torch.Tensor, c_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled():
        return _GateInputs.apply(f_pre, c_pre)
    a = torch.sigmoid(f_pre)
    return a, (1 - a) * F.silu(c_pre)


class MLGRU(nn.Module):
    def __init__(self, d_model: int, *, spec, init_std: float, out_std: float):
        super().__init__()
        self.channels = d_model // spec.tp_size  # this rank's channels of h
        self.f = spec.column(d_model, d_model, init_std=init_std)  # forget gate
        self.c = spec.column(d_model, d_model, init_std=init_std)  # candidate state
        self.g = spec.column(d_model, d_model, init_std=init_std)  # output gate
        self.o = spec.row(d_model, d_model, init_std=out_std)

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None, rows: torch.Tensor | None = None,
                active: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, s, d]. With a state: x's rows are state rows `rows` (None = all); `active` (device
        bool [b]) marks a decode step, advanced in place (CUDA-graph safe) for the active rows."""
        a, b = gate_inputs(self.f(x), self.c(x))  # f_t and (1 − f_t) ⊙ c_t
        if state is not None and active is not None:  # one token per row: h ← f ⊙ h + (1 − f) ⊙ c
            h = recurrent_step(state.h, a[:, 0], b[:, 0], active=active)[:, None].to(x.dtype)  # fp32 state
        else:
            h0 = None if state is None else (state.h if rows is None else state.h[rows.to(state.h.device)])
            h, h_last = linear_scan(a, b, h0)
            if state is not None:
                if rows is None:
                    state.h.copy_(h_last)
                else:
                    state.h.index_copy_(0, rows.to(state.h.device), h_last.float())
        return self.o(torch.sigmoid(self.g(x)) * h)


class HGRNBlock(nn.Module):
    def __init__(self, cfg, spec, *, layer_id: int, n_blocks: int):
        super().__init__()
        self.layer_id = layer_id  # index into the generation states
        out_std = cfg.init_std / math.sqrt(2 * n_blocks)
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MLGRU(cfg.d_model, spec=spec, init_std=cfg.init_std, out_std=out_std)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden, spec=spec, init_std=cfg.init_std, out_std=out_std)

    @staticmethod
    def train_flops(cfg, r: float = 1.0, layer: int = 0) -> float:
        """W_f, W_c, W_g, W_o and the GLU; the recurrence is O(d) per token (no attention term)."""
        return r * 6 * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.ffn_hidden)

    def forward(self, p):
        if p.hidden.numel() == 0:  # inside a SUBLLM level that kept no token on this call
            return p
        state = p.caches[self.layer_id] if p.caches is not None else None
        h = p.hidden + self.mixer(self.mixer_norm(p.hidden), state, p.rows, p.active)
        experts = p.experts[self.layer_id] if p.experts is not None else None
        h = h + self.mlp(self.mlp_norm(h), experts, p.rows)
        return p._replace(hidden=h)

    def new_cache(self, batch: int, max_len: int, *, dtype, device) -> RecurrentState:
        return RecurrentState(batch, self.mixer.channels, device=device)
