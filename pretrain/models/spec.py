"""Layer specs: which implementation fills a block's linears (megatron-core's ModuleSpec idea).

A block asks `spec.column(d_in, d_out)` for a layer whose output is split across tensor-parallel
ranks and `spec.row(d_in, d_out)` for one whose input is split; it never names a concrete class.
`model.linear` picks the spec, so ternary or elastic linears plug in without touching the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class LayerSpec:
    column: Callable[..., nn.Module]  # (d_in, d_out, *, init_std) -> output-sharded linear
    row: Callable[..., nn.Module]  # (d_in, d_out, *, init_std) -> input-sharded linear, output reduced
    embedding: Callable[..., nn.Module]  # (vocab, d, *, init_std) -> vocab-sharded embedding
    tp_size: int
    tp_rank: int


def dense_spec() -> LayerSpec:
    from parallel import tensor_parallel as tp

    return LayerSpec(column=tp.ColumnLinear, row=tp.RowLinear, embedding=tp.VocabEmbedding,
                     tp_size=tp.tp_size(), tp_rank=tp.tp_rank())


SPECS: dict[str, Callable[[], LayerSpec]] = {"dense": dense_spec}


def layer_spec(linear: str) -> LayerSpec:
    return SPECS[linear]()
