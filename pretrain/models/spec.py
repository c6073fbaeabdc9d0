"""Layer specs: which implementation fills a block's linears (megatron-core's ModuleSpec idea).

A block asks `spec.column(d_in, d_out)` for a layer whose output is split across tensor-parallel
ranks and `spec.row(d_in, d_out)` for one whose input is split; it never names a concrete class.
`model.linear` picks the spec, so ternary (and later elastic) linears plug in without touching the
blocks; `head` fills the LM head (a ternary model may keep it in full precision).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class LayerSpec:
    column: Callable[..., nn.Module]  # (d_in, d_out, *, init_std) -> output-sharded linear
    row: Callable[..., nn.Module]  # (d_in, d_out, *, init_std) -> input-sharded linear, output reduced
    embedding: Callable[..., nn.Module]  # (vocab, d, *, init_std) -> vocab-sharded embedding
    head: Callable[..., nn.Module]  # (d, vocab, *, init_std, skip_weight) -> vocab-sharded logits
    tp_size: int
    tp_rank: int


def dense_spec(cfg) -> LayerSpec:
    from parallel import tensor_parallel as tp

    return LayerSpec(column=tp.ColumnLinear, row=tp.RowLinear, embedding=tp.VocabEmbedding, head=tp.ColumnLinear,
                     tp_size=tp.tp_size(), tp_rank=tp.tp_rank())


def ternary_spec(cfg) -> LayerSpec:
    """BitLinear everywhere but the embedding; the head too unless `model.quantize_head` is off."""
    from parallel import bitlinear as bl
    from parallel import tensor_parallel as tp

    kw = dict(eps=cfg.bitlinear_eps, fused=cfg.bitlinear_fused)
    column = functools.partial(bl.BitColumnLinear, **kw)
    return LayerSpec(column=column, row=functools.partial(bl.BitRowLinear, **kw), embedding=tp.VocabEmbedding,
                     head=column if cfg.quantize_head else tp.ColumnLinear, tp_size=tp.tp_size(), tp_rank=tp.tp_rank())


SPECS: dict[str, Callable[..., LayerSpec]] = {"dense": dense_spec, "ternary": ternary_spec}


def layer_spec(cfg) -> LayerSpec:
    return SPECS[cfg.linear](cfg)
