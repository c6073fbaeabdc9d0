"""GRIFFIN's selected neurons for a ternary GLU (HGRN-Bit, a ternary LLaMA): slice the codes, keep the scale.

A ternary SwiGLU (parallel/bitlinear.py) computes, per token x [d]:

    x̃, s = int8absmax(RMSNorm_gate(x))           the gate's own input norm, per-token scale s
    g = (x̃ · C_gateᵀ) · γ_gate / s               C ∈ {−1, 0, 1}^[d_ff, d], γ = mean|W| of the whole matrix
    u   likewise with the up layer's norm, codes and γ;   z = silu(g) ⊙ u                 [d_ff]
    z̃, s_z = int8absmax(RMSNorm_down(z))         rstd = 1/√(Σ_i z_i² / d_ff + eps), absmax of z·w_down
    y = (z̃ · C_downᵀ) · γ_down / s_z

Decoding with neurons E is exactly this model with z_i = 0 for i ∉ E, computed on E alone:
- gate/up: the input x is not sliced, so its codes and scale are the full layer's; only the rows E of
  C are multiplied, times the WHOLE layer's γ. The scale is kept, never recomputed on the subset: the
  absmean of a subset is another number and would rescale every selected neuron.
- down: the zeros add nothing to Σz² nor to the absmax, so the norm over d_ff is Σ over E divided by
  the logical d_ff (the layer's `n`), with the norm weights E; then the columns E of C_down, times γ_down.
- tensor parallelism: gate/up are column-parallel (replicated input: nothing to reduce); the down's
  Σz² and absmax are all-reduced over the ranks (the layer's `red.row_stats`), then its partial sums,
  as the row-parallel layer does.

Storage, per sequence of the batch (b rows), 2-bit packed as kernels/ternary_matmul.py packs: gate/up
codes [b, k, ⌈d/4⌉] (a row gather of the layer's packed rows), down codes [b, d, ⌈k/4⌉] (re-packed
along k: the columns E are not contiguous in the layer's bytes), the down's norm weights [b, k] and
the three γ. That is b · density of the packed FF; decode multiplies them with the int8 × ternary
kernel, one row at a time (static shapes, no host sync: CUDA graphs capture it).

Magnitude baseline (and SUBLLM's fallback): ‖C_gate,i‖·‖C_up,i‖ on the codes the model computes with;
each γ is a common factor of its matrix, so it does not change the ranking. The norms are √(nonzero
count): integers under the root, so ties are common; topk breaks them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import bitlinear as kb
from kernels.ternary_matmul import pack_ternary, ternary_matmul, unpack_ternary
from parallel.bitlinear import PackedBitLinear, _BitMixin


def is_ternary(linear) -> bool:
    """A latent BitLinear (fused or not) or its packed inference form."""
    return isinstance(linear, (_BitMixin, PackedBitLinear))


def codes_of(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out_local, in_local], γ fp32 0-dim) that `layer` computes with: quantized from the
    latent weight exactly as BitLinearFunction does (γ over the whole logical matrix: a TP collective),
    or unpacked from a packed layer. A transient full int8 copy: select time only, freed by the caller."""
    if isinstance(layer, PackedBitLinear):
        return unpack_ternary(layer.packed, layer.local_in), layer.gamma
    return kb.weight_codes(layer.weight.detach(), reduce=layer.red.weight)


def packed_rows(layer, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """index [b, k] -> (the rows `index` of the layer's packed codes, uint8 [b, k, ⌈d_in/4⌉], γ)."""
    if isinstance(layer, PackedBitLinear):  # rows are whole bytes: gather them as they are
        return layer.packed[index], layer.gamma
    codes, gamma = codes_of(layer)
    return pack_ternary(codes[index]), gamma


def input_codes(layer, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's own RMSNorm + int8 absmax quantization of its (whole) input x2 [m, d]: codes, scale."""
    codes, scale, _ = kb.rmsnorm_quant(x2, layer.norm_weight, layer.eps, n=layer.n, reduce=layer.red.row_stats)
    return codes, scale


class TernaryRows:
    """Each sequence's selected neurons of a ternary GLU, packed (module docstring); `decode` is the GLU on them."""

    def __init__(self, mlp, index: torch.Tensor):
        self.gate_layer, self.up_layer, self.down_layer = mlp.gate, mlp.up, mlp.down  # norms, eps, n, reductions
        self.gate, g_gate = packed_rows(mlp.gate, index)  # [b, k, ⌈d/4⌉]
        self.up, g_up = packed_rows(mlp.up, index)
        # the down's columns E: its whole int8 codes exist once, transiently (a packed layer has to unpack
        # them to re-pack along k), and are freed when this returns; only the [b, d, ⌈k/4⌉] slices stay
        codes, g_down = codes_of(mlp.down)  # [d, f_local]
        self.down = pack_ternary(codes.t()[index].transpose(1, 2))  # [b, k, d] -> [b, d, k] -> packed
        del codes
        self.down_norm = mlp.down.norm_weight.detach()[index]  # [b, k]: the norm weights of the neurons E
        self.gamma = torch.stack([g_gate, g_up, g_down]).float()  # the whole layers' scales, kept

    @staticmethod
    @torch.no_grad()
    def magnitude(mlp) -> torch.Tensor:
        """[d_ff/T]: ‖C_gate,i‖·‖C_up,i‖ on the ternary codes (γ is common to a matrix: no effect on ranks)."""
        return codes_of(mlp.gate)[0].float().norm(dim=1) * codes_of(mlp.up)[0].float().norm(dim=1)

    def _glu_half(self, layer, packed: torch.Tensor, gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, d] -> [b, s, k]: each row's selected outputs of the gate or up layer."""
        b, s, d = x.shape
        codes, scale = input_codes(layer, x.reshape(b * s, d))  # the full layer's input codes
        codes, scale = codes.view(b, s, d), scale.view(b, s)
        return torch.stack([ternary_matmul(codes[r], scale[r], packed[r], gamma, out_dtype=x.dtype)
                            for r in range(b)])

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, d] -> the GLU output [b, s, d] with each row's own neurons (all-reduced over TP)."""
        z = F.silu(self._glu_half(self.gate_layer, self.gate, self.gamma[0], x)) \
            * self._glu_half(self.up_layer, self.up, self.gamma[1], x)  # [b, s, k]
        down = self.down_layer
        # the down's norm over all d_ff neurons (the unselected ones are zeros): Σz² and absmax over E,
        # reduced over the TP shards, divided by the logical n. The fused kernel takes one norm-weight
        # vector; each row has its own, so the plain-torch reference (the same arithmetic) runs it
        codes, scale, _ = kb.rmsnorm_quant_reference(z, self.down_norm[:, None, :], down.eps, down.n,
                                                     down.red.row_stats)
        out = torch.stack([ternary_matmul(codes[r], scale[r], self.down[r], self.gamma[2], out_dtype=x.dtype)
                           for r in range(x.shape[0])])
        if down.red.sharded_input:  # partial sums of the row-parallel layer
            torch.distributed.all_reduce(out, group=down.red.group)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down, self.down_norm, self.gamma))
