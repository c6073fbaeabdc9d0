"""Every parameter's tensor-parallel layout, told to DeepSpeed's universal checkpoint.

DeepSpeed's converter (`ds_to_universal`) joins each parameter's TP shards into one full tensor, and
its universal loader cuts that tensor again for the current TP rank. Left alone, both guess the layout
from the parameter's NAME (regex categories; anything unmatched is concatenated on dim 0), which is
wrong for Frugal's replicated norms, row-parallel weights (split on dim 1) and Flextron's round-robin
units. DeepSpeed 0.19 also takes an exact description per parameter, an affine map: which block of
the full tensor each rank holds, as strided views. `describe` writes one for every parameter from the
attributes parallel/elastic_layout.py reads (`tensor_model_parallel`, `partition_dim`, `elastic_unit`):

* `model.universal_checkpoint_info` (DeepSpeed saves it in every checkpoint's model-state files): the
  maps at the layout the checkpoint is WRITTEN at; the converter joins the shards with them;
* `param.ds_autotp_universal_checkpoint_meta`: the map at the layout the run LOADS at; the universal
  loader (ZeRO 1/2, and ZeRO-3 before it cuts the DP partition) takes this rank's shard with it.

The full tensor is the logical (TP=1) one, so one conversion loads at any TP size, and at any DP size.
"""
from __future__ import annotations

import contextlib
import re

import torch
from deepspeed.checkpoint.affine import (AFFINE_MAP_FORMAT_VERSION, AffinePiece, ParamAffineMap,
                                         contiguous_split_map, replicated_map)
from deepspeed.checkpoint.constants import (AFFINE_MAP, AFFINE_MAP_PARAMS, AFFINE_MAP_VERSION, DS_AUTOTP_UC_META,
                                            UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)

from parallel.elastic_layout import layout_of, logical_shape


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def round_robin_map(shape: tuple[int, ...], dim: int, unit: int, tp_size: int) -> ParamAffineMap:
    """Units of `unit` rows (dim 0) or columns (dim 1) dealt round-robin: rank r holds units r, r+T,
    r+2T, ... in slot order -- one strided view of the full tensor per rank."""
    slots = shape[dim] // unit // tp_size
    shard = (*shape[:dim], slots * unit, *shape[dim + 1:])
    src, dst = _row_major(shape), _row_major(shard)
    piece_shape = (*shape[:dim], slots, unit, *shape[dim + 1:])
    # the slot axis steps over T units of the full tensor, one unit of the shard
    src_strides = (*src[:dim], tp_size * unit * src[dim], src[dim], *src[dim + 1:])
    dst_strides = (*dst[:dim], unit * dst[dim], dst[dim], *dst[dim + 1:])
    pieces = {r: [AffinePiece(piece_shape, r * unit * src[dim], src_strides, 0, dst_strides, [r])]
              for r in range(tp_size)}
    return ParamAffineMap(logical_shape=shape, shard_shapes={r: shard for r in range(tp_size)},
                          pieces_by_rank=pieces)


def affine_map(param: torch.Tensor, tp_size: int) -> ParamAffineMap:
    """How `param` (this rank's shard, full shape still allocated) lies in its logical tensor at
    `tp_size` ranks."""
    shape = logical_shape(param, tp_size)
    sharded, dim, unit = layout_of(param)
    if not sharded:
        return replicated_map(shape, tp_size)
    if unit is None:
        return contiguous_split_map(shape, [shape[dim] // tp_size] * tp_size, dim)
    return round_robin_map(shape, dim, unit, tp_size)


def describe(model: torch.nn.Module, tp_size: int) -> None:
    """Attach the layout descriptions (module docstring) to `model` and its parameters. Call before
    DeepSpeed's initialize: ZeRO-3 then replaces each parameter's data by its partition."""
    maps = {name: affine_map(p, tp_size).to_dict() for name, p in model.named_parameters()}
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        AFFINE_MAP: {AFFINE_MAP_VERSION: AFFINE_MAP_FORMAT_VERSION,
                     AFFINE_MAP_PARAMS: {re.escape(name) + "$": m for name, m in maps.items()}},
    })
    for name, p in model.named_parameters():
        sharded, dim, _ = layout_of(p)
        setattr(p, DS_AUTOTP_UC_META, {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            "partition_dim": dim if sharded else None, "replicated": not sharded,
            "logical_shape": list(logical_shape(p, tp_size)), "conversion": {"affine_map": maps[name]}})


@contextlib.contextmanager
def universal_loading():
    """Around DeepSpeed's universal load: its ZeRO-3 path asks `deepspeed.utils.groups` for the
    tensor-parallel group (before cutting the DP partition), which only DeepSpeed's AutoTP sets up;
    lend it megatron-core's for the load, and only for the load (elsewhere DeepSpeed reads the grid
    through the mpu, parallel/zero.py)."""
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps

    before = groups._TENSOR_MODEL_PARALLEL_GROUP
    groups._TENSOR_MODEL_PARALLEL_GROUP = ps.get_tensor_model_parallel_group()
    try:
        yield
    finally:
        groups._TENSOR_MODEL_PARALLEL_GROUP = before
