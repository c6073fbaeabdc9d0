"""Where each logical unit of an elastic (Flextron) model lives under tensor parallelism.

An elastic layer is made of units -- an MLP neuron (a gate/up row and a down column), an attention
query group (a KV head with its query heads) -- kept in importance order: a sub-network of width k
uses the FIRST k units. The model marks such a parameter with `param.elastic_unit = n`: along its
`partition_dim` it is a run of consecutive units of n rows (dim 0) or n columns (dim 1).

megatron-core splits a weight contiguously (rank r holds units [r·U/T, (r+1)·U/T)), so the first k
units would all sit on the first ranks: a sub-network would leave the other ranks idle. Elastic
parameters are dealt ROUND-ROBIN instead: logical unit j lives on rank j mod T, in local slot
floor(j / T). Every rank then holds an equal share of every prefix, and the global first k units
(k a multiple of T) are exactly the first k/T local slots on every rank: a sub-network is a
contiguous local slice, with no communication beyond the layer's usual one.

The LOGICAL order (the TP=1 tensor) is what is independent of T: the same seed gives the same logical
model at any TP size (`deal_round_robin`), and a weights-only folder holds the logical state. A
training checkpoint holds each rank's PHYSICAL shard (DeepSpeed's per-rank files), so loading it at
another TP size goes logical first (`logical_state_dict`) and then to this rank (`local_state_dict`).
Parameters without `elastic_unit` keep megatron's contiguous split; those without
`tensor_model_parallel` are replicated.

Everything here except `deal_round_robin` is pure tensor reshaping with no process group.
"""
from __future__ import annotations

from typing import Any

import torch


def round_robin_index(n_units: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The logical unit ids that `tp_rank` holds, in local slot order: rank, rank+T, rank+2T, ..."""
    return torch.arange(tp_rank, n_units, tp_size, dtype=torch.long)


def layout_of(param_like) -> tuple[bool, int, int | None]:
    """(sharded?, partition dim, unit size or None for megatron's contiguous split)."""
    if not getattr(param_like, "tensor_model_parallel", False):
        return False, 0, None
    return True, int(param_like.partition_dim), getattr(param_like, "elastic_unit", None)


def _split(logical: torch.Tensor, dim: int, unit: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    size = logical.shape[dim]
    if unit is None:
        if size % tp_size:
            raise ValueError(f"dim {dim} of size {size} does not split over {tp_size} tensor-parallel ranks")
        return logical.chunk(tp_size, dim=dim)[tp_rank].contiguous()
    if size % unit or (size // unit) % tp_size:
        raise ValueError(f"dim {dim} of size {size} is not a whole number of units of {unit} dealt evenly "
                         f"over {tp_size} tensor-parallel ranks")
    x = logical.movedim(dim, 0)
    rest = x.shape[1:]
    # [slot, rank, unit, ...]: unit j = slot·T + rank, so rank r's units are column r, in slot order
    units = x.reshape(size // unit // tp_size, tp_size, unit, *rest)[:, tp_rank]
    return units.reshape(-1, *rest).movedim(0, dim).contiguous()


def _join(shards: list[torch.Tensor], dim: int, unit: int | None) -> torch.Tensor:
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"the tensor-parallel shards differ in shape: {[tuple(s.shape) for s in shards]}")
    if unit is None:
        return torch.cat(shards, dim=dim)
    size = shards[0].shape[dim]
    if size % unit:
        raise ValueError(f"a shard's dim {dim} of size {size} is not a whole number of units of {unit}")
    local = [s.movedim(dim, 0) for s in shards]
    rest = local[0].shape[1:]
    # stack as [slot, rank, unit, ...]: flattening slot-major puts unit slot·T + rank at its logical place
    stacked = torch.stack([s.reshape(size // unit, unit, *rest) for s in local], dim=1)
    return stacked.reshape(-1, *rest).movedim(0, dim).contiguous()


def shard(logical: torch.Tensor, param_like, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's shard of a logical (TP=1) tensor laid out like `param_like`: round-robin in units
    of `elastic_unit`, megatron's contiguous split without one, the whole tensor if replicated."""
    sharded, dim, unit = layout_of(param_like)
    if not sharded or tp_size == 1:
        return logical
    return _split(logical, dim, unit, tp_rank, tp_size)


def unshard(shards: list[torch.Tensor], param_like) -> torch.Tensor:
    """The logical tensor from every rank's shard (in rank order); inverse of `shard`."""
    sharded, dim, unit = layout_of(param_like)
    if not sharded or len(shards) == 1:
        return shards[0]
    return _join(shards, dim, unit)


@torch.no_grad()
def deal_round_robin(model: torch.nn.Module) -> None:
    """Right after building an elastic model at TP > 1: megatron gave each rank a contiguous slice of
    one seeded master weight; gather the slices of every elastic parameter, rebuild the logical tensor
    and keep this rank's round-robin share, in place. The same seed then gives the same logical model
    at any TP size. Collective over the TP group; identity at TP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_size = ps.get_tensor_model_parallel_world_size()
    if tp_size == 1:
        return
    tp_rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    # NCCL gathers device tensors only; the model may still be on the CPU right after building
    comm = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for _, param in sorted(model.named_parameters()):  # the same order on every rank
        sharded, dim, unit = layout_of(param)
        if not sharded or unit is None:
            continue
        local = param.data.to(comm).contiguous()
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(parts, local, group=group)
        logical = _join(parts, dim, None)  # megatron's contiguous split of the master weight
        param.data.copy_(_split(logical, dim, unit, tp_rank, tp_size).to(param.device))


def logical_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def logical_state_dict(shards: list[dict[str, Any]], model: torch.nn.Module, *,
                       round_robin: bool = True) -> dict[str, Any]:
    """The logical (TP=1) state dict from the module state dicts of every rank of a checkpoint saved
    at TP = len(shards), in rank order. How each entry was split is read from `model`'s parameter of
    the same name; other entries (buffers, extra state) are taken from shard 0. round_robin=False:
    the shards were written by a non-elastic model (megatron's contiguous split for every parameter),
    e.g. a dense checkpoint loaded into an elastic model."""
    if not shards:
        raise ValueError("no checkpoint shards given")
    params = dict(model.named_parameters())
    out = {}
    for name, value in shards[0].items():
        param = params.get(name)
        if param is None or len(shards) == 1:
            out[name] = value
            continue
        missing = [r for r, s in enumerate(shards) if name not in s]
        if missing:
            raise ValueError(f"{name}: absent from the checkpoint shard(s) of tensor-parallel rank(s) {missing}")
        sharded, dim, unit = layout_of(param)
        if not sharded:
            out[name] = value
            continue
        try:
            out[name] = _join([s[name] for s in shards], dim, unit if round_robin else None)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out


def local_state_dict(logical: dict[str, Any], model: torch.nn.Module, tp_rank: int, tp_size: int) -> dict[str, Any]:
    """This rank's share of a logical state dict, laid out like `model`'s parameters; inverse of
    `logical_state_dict`. Each parameter's logical shape must fit the model's (checked here, where a
    wrong shape would otherwise fail as an obscure split error)."""
    params = dict(model.named_parameters())
    out = {}
    for name, value in logical.items():
        param = params.get(name)
        if param is None:
            out[name] = value
            continue
        expected = logical_shape(param, tp_size)
        if tuple(value.shape) != expected:
            raise ValueError(f"{name}: the checkpoint has shape {tuple(value.shape)}, the model {expected} "
                             "(full, unsharded shapes)")
        sharded, dim, unit = layout_of(param)
        out[name] = _split(value, dim, unit, tp_rank, tp_size) if sharded and tp_size > 1 else value
    return out
