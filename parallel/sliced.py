"""Sliced tensor-parallel linears: a Flextron sub-network's matmuls on the first k units of a shard.

A sub-network of width k uses the first k/T local units of each rank's weight (the round-robin layout
of parallel/elastic_layout.py makes those the global top-k), so its GEMMs are simply smaller: the
weight is a view, never copied or masked. The communication is megatron-core's, as in its TP layers:
a column slice's input gradient is all-reduced over the TP group, a row slice's output is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel as mtp


def column_slice(x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """x [.., d] (replicated) -> x W[:rows]ᵀ, this rank's first `rows` output units (stays sharded)."""
    return F.linear(mtp.copy_to_tensor_model_parallel_region(x), weight[:rows])


def row_slice(h: torch.Tensor, weight: torch.Tensor, cols: int) -> torch.Tensor:
    """h [.., cols] (this rank's first `cols` input units) -> h W[:, :cols]ᵀ summed over the TP group.
    The column slice is a strided view: the GEMM reads it in place (leading dimension = full width)."""
    return mtp.reduce_from_tensor_model_parallel_region(F.linear(h, weight[:, :cols]))
