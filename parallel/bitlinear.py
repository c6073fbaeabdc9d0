"""Ternary BitLinear layers (MatMul-free LM / BitNet b1.58) as megatron-core tensor-parallel linears.

    y = RMSNorm(x)  ->  x̃ = int8 absmax per token  ->  out = x̃ · W̃ᵀ,  W̃ = ternary absmean per tensor

TP-exact: a shard must quantize exactly as the whole logical layer would.
- The weight scale γ = mean|W| is over the WHOLE logical matrix: every layer all-reduces its local
  Σ|W| and element count across the TP group (column- and row-parallel alike).
- A row-parallel layer sees a slice of the hidden dim, so its RMSNorm (Σx², and Σ(g·w·x) in the
  backward) and its activation absmax are all-reduced per token; its norm weight is sharded.
- A column-parallel layer sees the whole input on every rank: its norm runs redundantly, and the
  gradient w.r.t. the normalized input is all-reduced before the norm's backward (where megatron's
  copy-to-TP-region would all-reduce the input gradient) so the replicated norm weight gets the
  full gradient on every rank.

Two implementations of the same function, picked by `model.bitlinear_fused`:
- fused (default): one autograd Function over kernels/bitlinear.py. It saves the input, the int8
  weight codes and two fp32 numbers per token; the backward recomputes the quantized activation.
  The matmul multiplies the integer codes (exact in bf16, fp32 accumulation) and applies γ / s after.
- unfused: the reference's autograd graph in plain torch (norm, fake-quantized activation and weight
  via detach-STE, F.linear), which keeps every intermediate. The benchmark's baseline and a test oracle.

`PackedBitLinear` is the inference form: 2-bit packed codes + γ, int8 × ternary matmul
(kernels/ternary_matmul.py). It is built from the latent weights (`from_trained`) or empty for an
exported checkpoint; dequantized weights are never re-quantized (the absmean of {−γ, 0, γ} is not γ).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from kernels import bitlinear as kb
from kernels.ternary_matmul import pack_ternary, ternary_matmul
from parallel.tensor_parallel import ColumnLinear, RowLinear, all_reduce_tp


class Reductions:
    """The TP reductions of one layer, handed to the kernels as callables (kernels know no groups).
    `sharded_input`: row-parallel (per-token statistics span the ranks) vs column-parallel."""

    def __init__(self, sharded_input: bool):
        self.group = ps.get_tensor_model_parallel_group()
        self.size = ps.get_tensor_model_parallel_world_size()
        self.sharded_input = sharded_input and self.size > 1

    def _sum(self, *ts: torch.Tensor) -> None:
        for t in ts:
            torch.distributed.all_reduce(t, group=self.group)

    def weight(self, abs_sum: torch.Tensor, count: torch.Tensor) -> None:
        if self.size > 1:
            self._sum(abs_sum, count)

    def stats(self, sumsq: torch.Tensor, amax: torch.Tensor) -> None:
        self._sum(sumsq)
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=self.group)

    def dot(self, dot: torch.Tensor) -> None:
        self._sum(dot)

    def grad_input(self, grad_y: torch.Tensor) -> torch.Tensor:
        """Column-parallel: each rank's output shard contributes to the replicated input's gradient."""
        if self.size > 1 and not self.sharded_input:
            self._sum(grad_y)
        return grad_y

    @property
    def row_stats(self):
        return self.stats if self.sharded_input else None

    @property
    def row_dot(self):
        return self.dot if self.sharded_input else None


class BitLinearFunction(torch.autograd.Function):
    """out = x̃ W̃ᵀ for x [tokens, d_in], with straight-through gradients; see the module docstring
    for what is saved."""

    @staticmethod
    def forward(ctx, x2, norm_weight, weight, eps: float, n: int, red: Reductions):
        dtype = x2.dtype
        codes, scale, rstd = kb.rmsnorm_quant(x2, norm_weight, eps, n=n, reduce=red.row_stats)
        w_codes, gamma = kb.weight_codes(weight, reduce=red.weight)
        # integer codes times integer codes: exact in bf16 inputs with fp32 accumulation; the scaling
        # runs in fp32 inside the in-place multiply, no fp32 copy of the output
        out = F.linear(codes.to(dtype), w_codes.to(dtype))
        out.mul_((gamma / scale)[:, None])
        ctx.save_for_backward(x2, norm_weight, w_codes, gamma, scale, rstd)
        ctx.n, ctx.red, ctx.w_dtype = n, red, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, norm_weight, w_codes, gamma, scale, rstd = ctx.saved_tensors
        dtype = x2.dtype
        g = grad_out.to(dtype)
        # STE: the gradient w.r.t. the quantized activation is the one w.r.t. the normalized input;
        # kept in the activation dtype, like megatron's input-gradient all-reduce
        grad_y = ctx.red.grad_input((g @ w_codes.to(dtype)).mul_(gamma))
        grad_x, grad_norm = kb.rmsnorm_backward(x2, norm_weight, rstd, grad_y, n=ctx.n, reduce=ctx.red.row_dot)
        # recompute x̃ (int8 codes from the saved input) instead of having stored it
        x_q = kb.dequantize_rows(kb.quantize_rows(x2, norm_weight, rstd, scale), scale, dtype)
        grad_w = g.t() @ x_q  # STE: W̃'s gradient goes to the latent weight
        return grad_x, grad_norm.to(norm_weight.dtype), grad_w.to(ctx.w_dtype), None, None, None


def fake_quant_reference(x, norm_weight, weight, eps: float, n: int, red: Reductions):
    """The unfused reference: the same function as BitLinearFunction, as a plain autograd graph."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    xf = x.float()
    sumsq = xf.pow(2).sum(-1, keepdim=True)
    if red.sharded_input:
        # every rank's rstd scales its own slice: the gradient of each addend is the sum over ranks
        # (torch's differentiable all-reduce; megatron's reduce region passes the gradient through)
        sumsq = dist_nn.all_reduce(sumsq, group=red.group)
    y = (xf * torch.rsqrt(sumsq / n + eps) * norm_weight.float()).to(x.dtype)
    if not red.sharded_input:  # (identity at TP=1)
        y = copy_to_tensor_model_parallel_region(y)  # all-reduces the gradient of the replicated y
    with torch.no_grad():
        amax = y.float().abs().amax(-1, keepdim=True)
        if red.sharded_input:
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=red.group)
        s = 127.0 / amax.clamp(min=1e-5)
        x_q = ((y.float() * s).round().clamp(-128, 127) / s).to(x.dtype)
        w_codes, gamma = kb.weight_codes(weight, reduce=red.weight)
        w_q = (w_codes.float() * gamma).to(weight.dtype)
    x_ste = y + (x_q - y).detach()
    w_ste = weight + (w_q - weight).detach()
    return F.linear(x_ste, w_ste)


class _BitMixin:
    """Shared by both TP directions: the input norm, the choice of implementation."""

    def _init_bit(self, d_in: int, local_in: int, *, eps: float, fused: bool, sharded_input: bool):
        self.eps, self.fused, self.n = eps, fused, d_in
        self.red = Reductions(sharded_input)
        self.norm_weight = nn.Parameter(torch.ones(local_in))  # RMSNorm weight of the input (full precision)
        if sharded_input:  # a slice of the row-parallel input dim: sharded with it, re-shards by splitting
            set_tensor_model_parallel_attributes(self.norm_weight, True, 0, 1)

    def _bit(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return fake_quant_reference(x, self.norm_weight, weight, self.eps, self.n, self.red)
        out = BitLinearFunction.apply(x.reshape(-1, x.shape[-1]), self.norm_weight, weight, self.eps, self.n,
                                      self.red)
        return out.view(*x.shape[:-1], -1)


class BitColumnLinear(_BitMixin, ColumnLinear):
    """Ternary column-parallel linear: replicated input (and norm), output sharded by rows of W."""

    def __init__(self, in_features: int, out_features: int, *, init_std: float, eps: float = 1e-8,
                 fused: bool = True, skip_weight: bool = False):
        if skip_weight:
            raise ValueError("a ternary head cannot be tied to the embedding (set model.quantize_head=false)")
        super().__init__(in_features, out_features, init_std=init_std)
        self._init_bit(in_features, in_features, eps=eps, fused=fused, sharded_input=False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self._bit(x, self.weight)


class BitRowLinear(_BitMixin, RowLinear):
    """Ternary row-parallel linear: input (and norm) sharded along the hidden dim, output all-reduced."""

    def __init__(self, in_features: int, out_features: int, *, init_std: float, eps: float = 1e-8,
                 fused: bool = True):
        super().__init__(in_features, out_features, init_std=init_std)
        self._init_bit(in_features, self.input_size_per_partition, eps=eps, fused=fused, sharded_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: the partial sums' all-reduce, nothing for autograd
            return all_reduce_tp(self._bit(x, self.weight))
        return reduce_from_tensor_model_parallel_region(self._bit(x, self.weight))


class PackedBitLinear(nn.Module):
    """Inference form of a BitLinear shard: 2-bit codes (4 per byte) + γ; int8 × ternary matmul."""

    def __init__(self, local_in: int, local_out: int, *, n: int, eps: float, sharded_input: bool):
        super().__init__()
        self.n, self.eps, self.local_in = n, eps, local_in
        self.red = Reductions(sharded_input)
        self.norm_weight = nn.Parameter(torch.ones(local_in), requires_grad=False)
        self.register_buffer("packed", torch.zeros(local_out, (local_in + 3) // 4, dtype=torch.uint8))
        self.register_buffer("gamma", torch.ones((), dtype=torch.float32))

    @classmethod
    def from_trained(cls, layer: _BitMixin) -> "PackedBitLinear":
        """Quantize a trained layer's latent weight once (TP-exact γ) and pack its codes."""
        w = layer.weight.detach()
        out = cls(w.shape[1], w.shape[0], n=layer.n, eps=layer.eps, sharded_input=layer.red.sharded_input)
        codes, gamma = kb.weight_codes(w.float(), reduce=layer.red.weight)
        out.packed = pack_ternary(codes).to(w.device)
        out.gamma = gamma.to(w.device)
        out.norm_weight.data = layer.norm_weight.detach().clone()
        return out

    def _apply(self, fn, recurse=True):
        # `.to(bf16)` casts floating buffers; γ stays fp32 (the codes are uint8 and never cast)
        super()._apply(fn, recurse)
        self.gamma = self.gamma.float()
        return self

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        codes, scale, _ = kb.rmsnorm_quant(x2, self.norm_weight, self.eps, n=self.n, reduce=self.red.row_stats)
        out = ternary_matmul(codes, scale, self.packed, self.gamma, out_dtype=x.dtype)
        if self.red.sharded_input:  # partial sums of a row-parallel layer
            torch.distributed.all_reduce(out, group=self.red.group)
        return out.view(*x.shape[:-1], -1)

    def nbytes(self) -> int:
        return self.packed.numel() + 4 + self.norm_weight.numel() * self.norm_weight.element_size()


def pack_bitlinears(model: nn.Module, *, quantize: bool = True) -> int:
    """Replace every BitLinear of a model by its packed inference form, in place; returns how many.
    quantize=False: empty packed layers of the same shapes, to load an export into."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, _BitMixin)]
    for parent, name, child in targets:
        if quantize:
            packed = PackedBitLinear.from_trained(child)
        else:
            out_f, in_f = child.weight.shape
            packed = PackedBitLinear(in_f, out_f, n=child.n, eps=child.eps, sharded_input=child.red.sharded_input)
        setattr(parent, name, packed)
    return len(targets)
