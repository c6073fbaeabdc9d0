"""Pipeline parallelism: DeepSpeed's pipeline engine over the flat layer list, megatron-core's TP
layers inside each stage.

The grid: megatron-core's parallel_state orders ranks tp fastest, then dp, then pp; DeepSpeed's
`PipeModelDataParallelTopology` (axes pipe, data, model) gives the same rank to the same coordinate,
so both libraries see one TP x DP x PP grid (checked in `topology`). Stages cut the layer list where
the estimated costs balance (pretrain/pipeline.py: layer_costs), not by layer count: a block inside a
subsampled level runs on a fraction of the tokens.
"""
from __future__ import annotations

from typing import Literal

import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state as ps

Partition = Literal["cost", "uniform", "parameters"]


def topology() -> PipeModelDataParallelTopology:
    """DeepSpeed's view of megatron-core's grid; refuses to go on if the two disagree on this rank."""
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dp = ps.get_data_parallel_world_size()
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    coord = topo.get_coord(torch.distributed.get_rank())
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
    if (coord.pipe, coord.data, coord.model) != mine:
        raise RuntimeError(f"DeepSpeed's grid puts this rank at (pipe, data, model) = {tuple(coord)}, "
                           f"megatron-core's at {mine}")
    return topo


def partition(costs: list[float], blocks: list[bool], stages: int, method: Partition, params: list[int]) -> list[int]:
    """Stage boundaries [0, b1, ..., len(costs)] over the layer list: contiguous runs balancing the
    estimated `costs` ('cost'), the block count ('uniform') or `params` ('parameters').

    The units cut are blocks (`blocks` marks them), each with the small layers in front of it (the
    embedding, a `(` or `)`); the final norm and head join the last block. So every stage holds at
    least one block -- DeepSpeed's ZeRO reduces the grad norm per parameter group over all stages,
    so each stage needs the same groups (weights with and without decay) -- and a cheap layer is
    never a stage of its own."""
    n_blocks = sum(blocks)
    if stages > n_blocks:
        raise ValueError(f"{stages} pipeline stages for {n_blocks} blocks: every stage needs at least one block")
    block_ids = [i for i, is_block in enumerate(blocks) if is_block]
    starts = [0] + [i + 1 for i in block_ids[:-1]]  # each unit starts right after the previous block
    ends = [*starts[1:], len(costs)]
    weights = {"cost": costs, "uniform": [1.0 if b else 0.0 for b in blocks], "parameters": params}[method]
    units = [sum(weights[a:b]) for a, b in zip(starts, ends)]
    # partition_balanced wants integers: scale so the smallest nonzero weight stays >= 1
    scale = 1.0 / max(min((w for w in units if w > 0), default=1.0), 1e-12)
    cut = ds_utils.partition_balanced(weights=[max(1, round(w * scale)) for w in units], num_parts=stages)
    return [starts[u] if u < len(starts) else len(costs) for u in cut]


class Pipeline(PipelineModule):
    """DeepSpeed's PipelineModule with Frugal's partition: boundaries from `partition`, and a
    start-up printout of each stage's layers and estimated cost share."""

    def __init__(self, layers, *, costs: list[float], blocks: list[bool], names: list[str], method: Partition,
                 loss_fn):
        import deepspeed

        # DeepSpeed's comm layer wraps the existing torch.distributed world (PipelineModule asks it
        # for ranks before deepspeed.initialize would set it up)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        self._costs, self._blocks, self._names, self._method = costs, blocks, names, method
        super().__init__(layers=layers, topology=topology(), loss_fn=loss_fn, partition_method=method)

    def _partition_layers(self, method="cost"):
        # a (Tied)LayerSpec here holds its prebuilt module as its argument (pretrain/pipeline.py: Prebuilt)
        modules = [getattr(layer, "module_args", (layer,))[0] for layer in self._layer_specs]
        params = [sum(p.numel() for p in m.parameters()) for m in modules]
        self.parts = partition(self._costs, self._blocks, self.num_stages, self._method, params)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
        if self.global_rank == 0:
            print(describe_partition(self.parts, self._costs, self._names, self._method), flush=True)



def describe_partition(parts: list[int], costs: list[float], names: list[str], method: str) -> str:
    total = sum(costs)
    lines = [f"pipeline partition ({method}), {len(parts) - 1} stages, estimated cost per stage:"]
    for s in range(len(parts) - 1):
        a, b = parts[s], parts[s + 1]
        lines.append(f"  stage {s}: {100 * sum(costs[a:b]) / total:5.1f}%  layers {a}-{b - 1}: {' '.join(names[a:b])}")
    return "\n".join(lines)
