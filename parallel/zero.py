"""DeepSpeed wiring: the megatron-core grid handed to DeepSpeed as an `mpu`, the engine config, and
ZeRO stage 0-3 over the data-parallel group only.

DeepSpeed asks the `mpu` for its groups; answering from megatron-core's parallel_state means both
libraries describe the same grid, so ZeRO shards optimizer state across data-parallel replicas
and never across tensor-parallel shards, and the global grad norm is reduced over the
model-parallel group (DeepSpeed skips TP-replicated parameters on TP rank > 0 by the
`tensor_model_parallel` attribute megatron-core sets).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from megatron.core import parallel_state as ps


class MegatronMPU:
    """The subset of the Megatron-LM `mpu` API that DeepSpeed calls."""

    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    # "model parallel" in DeepSpeed's vocabulary = tensor x pipeline
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return torch.distributed.get_rank(group=ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return torch.distributed.get_world_size(group=ps.get_model_parallel_group())

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        return torch.distributed.get_process_group_ranks(ps.get_data_parallel_group())


def engine_config(*, micro_batch: int, grad_accum: int, zero_stage: int, bf16: bool, grad_clip: float,
                  pipeline: bool = False) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage in (1, 2):
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},  # ZeRO-1/2 skip non-finite steps
        "zero_allow_untested_optimizer": True,  # torch AdamW as a client optimizer
        "steps_per_print": 2**62,  # our own logging
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
        # the caller runs backward per micro-batch and step() once per global batch (the trainer
        # decides on skipping a non-finite step before DeepSpeed's boundary logic would run)
        "managed_gradient_accumulation": False,
    }
    if pipeline:
        # train_batch runs the micro-batches and the step itself, with DeepSpeed's accumulation
        config["managed_gradient_accumulation"] = True
        # the boundary tuple holds several tensors that need gradients: DeepSpeed's partitioning of
        # activations over TP ranks handles one only, so each TP rank sends its (replicated) copy
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return config


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, config: dict):
    import deepspeed

    from parallel.universal_layout import describe

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # each parameter's TP layout, for universal checkpoints (resume at another TP or DP size); before
    # initialize, which under ZeRO-3 swaps every parameter's data for its partition
    describe(model, ps.get_tensor_model_parallel_world_size())
    from deepspeed.pipe import PipelineModule

    # a PipelineModule brings its own grid (parallel/pipeline.py checks it equals megatron-core's)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config,
        mpu=None if isinstance(model, PipelineModule) else MegatronMPU(), dist_init_required=False,
    )
    if config["zero_optimization"]["stage"] == 3 and hasattr(model, "external_parameters"):
        # ZeRO-3 gathers a partitioned parameter only around the module that owns it; a module
        # that borrows one (the tied head) must say so.
        for module, param in model.external_parameters():
            deepspeed.zero.register_external_parameter(module, param)
    return engine


def skip_step(engine) -> None:
    """End a step whose gradients are non-finite without touching weights or optimizer state.

    ZeRO-1/2 reduce gradients into partition buffers of their own: DeepSpeed's overflow path is
    the one thing that reliably clears them, so `step()` runs, sees the non-finite gradient norm
    and skips the update (`check_grad_overflow` is on for bf16, see `engine_config`). ZeRO-3 and
    stage 0 have no such check for fp32/bf16, but their `zero_grad` resets the accumulation, so the
    next backward starts from scratch.
    """
    if engine.zero_optimization_stage() in (1, 2):
        engine.step()
        if engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step with non-finite gradients")
    else:
        engine.optimizer.zero_grad(set_to_none=True)
