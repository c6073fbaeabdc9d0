"""GRIFFIN: decode with the feed-forward neurons the prompt activated most, chosen per sequence.

Training-free (arXiv 2404.01365). While the prompt is prefilled, every GLU layer sees
    z_t = act(x_t W_gateᵀ) ⊙ (x_t W_upᵀ)                 [d_ff] per prompt token t
and scores neuron i of the sequence by  s_i = ‖ (z_t,i / ‖z_t‖₂)_t ‖₂  (each token's activation
vector normalized, then each neuron's norm over the prompt). The top-k neurons, k = density · d_ff,
are then the layer's FF for every decoded token of that sequence; the prompt itself used the full FF.

Tensor parallelism: a rank holds d_ff/T neurons (gate/up rows, down columns). ‖z_t‖ spans all
shards (the per-token sums of squares are all-reduced), then each rank keeps its own top-(k/T):
shards stay balanced. With megatron's contiguous sharding that is the top-(k/T) of each contiguous
block of neurons, which can differ from the global top-k of TP=1; with Flextron's round-robin
layout the two coincide (see docs/griffin.md).

Batch > 1: every sequence has its own neurons. After the prefill each sequence's selected rows are
gathered once into compact buffers [b, k/T, d] (b · density of the FF weights; the full weights are
never copied) that every decode step multiplies with a batched GEMM: static tensors, so the CUDA-graph
decode step replays them. Baselines: static weight magnitude ‖W_gate,i‖·‖W_up,i‖ and random.

What "the selected weights" are depends on the GLU's linears: dense rows here (`DenseRows`), a ternary
GLU's 2-bit packed codes with the whole layers' scales in griffin_ternary.py (`TernaryRows`). Each kind
gathers them (`kind(mlp, index)`), ranks by magnitude (`kind.magnitude(mlp)`) and decodes on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("griffin", "magnitude", "random")


@dataclass
class FFSelection:
    density: float = 1.0  # fraction of FF neurons each decoded token uses; 1.0 = the full model
    method: str = "griffin"  # griffin (prompt-selected) | magnitude | random (the paper's baselines)
    seed: int = 0  # for method=random

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"FF density must be in (0, 1], got {self.density}")
        if self.method not in METHODS:
            raise ValueError(f"FF selection method must be one of {METHODS}, got {self.method!r}")

    @property
    def active(self) -> bool:
        return self.density < 1.0


def neuron_scores(z: torch.Tensor) -> torch.Tensor:
    """z [b, s, d_ff/T] (this rank's neurons) -> Σ_t (z_t,i / ‖z_t‖)² [b, d_ff/T] in fp32: GRIFFIN's
    s_i squared (same top-k), with ‖z_t‖ over every shard of the neuron dimension."""
    from parallel.tensor_parallel import all_reduce_tp

    z2 = z.float().square()
    token_sumsq = all_reduce_tp(z2.sum(dim=-1, keepdim=True))  # [b, s, 1]: ‖z_t‖² over all shards
    return (z2 / token_sumsq.clamp_min(torch.finfo(torch.float32).tiny)).sum(dim=1)


class DenseRows:
    """Each row's selected neurons of a dense GLU: gate/up rows and down columns, compact [b, k, d] each."""

    def __init__(self, mlp, index: torch.Tensor):
        self.gate, self.up = mlp.gate.weight[index], mlp.up.weight[index]  # [f, d] -> [b, k, d]
        self.down = mlp.down.weight.t()[index]  # [d, f] -> [b, k, d]: down's columns as rows

    @staticmethod
    def magnitude(mlp) -> torch.Tensor:
        return mlp.gate.weight.float().norm(dim=1) * mlp.up.weight.float().norm(dim=1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        from parallel.tensor_parallel import all_reduce_tp

        h = F.silu(torch.bmm(x, self.gate.transpose(1, 2))) * torch.bmm(x, self.up.transpose(1, 2))
        return all_reduce_tp(torch.bmm(h, self.down))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


def weights_kind(mlp):
    """How a GLU's selected weights are held: by the kind of its linears."""
    from pretrain.models.griffin_ternary import TernaryRows, is_ternary

    return TernaryRows if is_ternary(mlp.gate) else DenseRows


class Experts:
    """One GLU layer's selected neurons for a batch of sequences during generation.

    observe(z, rows) accumulates prompt scores at prefill; select(mlp) picks each row's neurons and
    gathers their weights; decode(x) is then the layer's forward for one token per row."""

    def __init__(self, batch: int, ffn_local: int, sel: FFSelection, *, layer: int, device):
        self.sel, self.layer = sel, layer
        self.k = max(1, round(sel.density * ffn_local))  # per rank: balanced shards
        self.scores = torch.zeros(batch, ffn_local, dtype=torch.float32, device=device)
        self.index: torch.Tensor | None = None  # [b, k] selected local neurons, ascending
        self.weights = None  # the selected weights (DenseRows or TernaryRows), after select

    @property
    def ready(self) -> bool:
        return self.index is not None

    def observe(self, z: torch.Tensor, rows: torch.Tensor | None) -> None:
        if self.sel.method == "griffin" and z.shape[1]:
            s = neuron_scores(z)
            if rows is None:
                self.scores += s
            else:
                self.scores.index_add_(0, rows.to(s.device), s)

    @torch.no_grad()
    def select(self, mlp, index: torch.Tensor | None = None) -> None:
        """Choose each row's k neurons (or take `index` [b, k], local neuron ids) and gather their
        gate/up rows and down columns."""
        if index is None:
            index = self.ranking(mlp).topk(self.k, dim=1).indices
        self.index = index.to(self.scores.device).sort(dim=1).values
        self.weights = weights_kind(mlp)(mlp, self.index)
        self.scores = None  # prompt scores are not needed once the neurons are chosen

    @torch.no_grad()
    def ranking(self, mlp) -> torch.Tensor:
        """[b, d_ff/T]: what the method ranks this rank's neurons by, per row (before `select`)."""
        b, f = self.scores.shape
        if self.sel.method == "random":  # a fixed stream per (seed, layer, rank), a different draw per row
            from parallel.tensor_parallel import tp_rank

            gen = torch.Generator().manual_seed(self.sel.seed * 1_000_003 + self.layer * 101 + tp_rank())
            return torch.rand(b, f, generator=gen).to(self.scores.device)
        magnitude = weights_kind(mlp).magnitude(mlp).to(self.scores.device).expand(b, f)
        if self.sel.method == "magnitude":
            return magnitude
        # a SUBLLM level may keep none of a prompt's tokens: that row falls back to magnitude
        return torch.where((self.scores > 0).any(dim=1, keepdim=True), self.scores, magnitude)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, d] -> the GLU output with each row's own neurons (all-reduced over TP)."""
        return self.weights.decode(x)

    def nbytes(self) -> int:
        """Bytes the selection holds: the selected weights and the indexes (0 before select)."""
        if self.weights is None:
            return 0
        return self.weights.nbytes() + self.index.numel() * self.index.element_size()
