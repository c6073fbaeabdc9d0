"""Fused elementwise ops for training (`model.fused_kernels`): RMSNorm, RoPE and SwiGLU's product.

Each op is written once in plain torch (the reference, used on the CPU and when the knob is off)
and, on CUDA tensors with the knob on, run through torch.compile: Inductor turns each function into
one generated Triton kernel forward and one backward, where eager torch launches 3-10 kernels
and keeps fp32 intermediates (the upcast input of a norm, both halves of the rotation) alive for
the backward. Only pure tensor functions are compiled, never the linears around them, so the
megatron-core TP layers, DeepSpeed's hooks and CUDA-graph decoding see plain tensors either way.
The math (fp32 inside, the input dtype out) is the reference's; results agree to rounding.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).type_as(x)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, hd]; rotate pairs (i, i + hd/2) (the rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@functools.cache
def _compiled(fn):
    # dynamic=None: static shapes first, one dynamic recompile if the shapes change (SUBLLM's levels
    # see a different token count every step), never a recompile per shape
    return torch.compile(fn, fullgraph=True)


def fused(fn, *tensors: torch.Tensor):
    """`fn` itself, or its compiled form when training on a GPU: Inductor's CPU path needs a C++
    toolchain and brings nothing to the CPU tests, and inference (no grad) keeps the eager op that
    the decode step's CUDA graphs and its own torch.compile already handle."""
    if torch.is_grad_enabled() and all(t.is_cuda for t in tensors):
        return _compiled(fn)
    return fn


def compile_blocks(model) -> None:
    """torch.compile each LLaMA block's training forward (`training.compile`): Inductor fuses the
    elementwise work between the matmuls (norms, RoPE, SwiGLU, residual adds) across op boundaries.
    Blocks, not the whole network: one compiled graph serves all identical blocks, and the embedding,
    head and loss (megatron's vocab-parallel functions) stay eager. Blocks without a `dense` forward
    (HGRN-Bit) stay eager."""
    for block in model.blocks():
        if hasattr(block, "dense"):
            block.__dict__["compiled_dense"] = torch.compile(block.dense)
