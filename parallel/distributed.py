"""Process-group setup: torch.distributed (nccl on GPU, gloo on CPU) + megatron-core parallel_state.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the environment) and as a plain
single process (a world of one on a free local port), so generation and tests need no launcher.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the (tensor x data x pipeline) grid."""

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    pp_size: int = 1
    pp_rank: int = 0

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous of processes started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """This process's global rank before any process group exists (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(tensor_parallel: int = 1, *, pipeline_parallel: int = 1, timeout_s: float = 600.0) -> Layout:
    """Initialize torch.distributed and megatron-core's parallel_state; idempotent."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            from parallel.cpu_shim import apply_cpu_shim

            apply_cpu_shim()
            backend = "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))

    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                     pipeline_model_parallel_size=pipeline_parallel)
    elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != \
            (tensor_parallel, pipeline_parallel):
        raise RuntimeError("parallel_state already initialized with another tensor- or pipeline-parallel size")

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return Layout(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
    )


@contextlib.contextmanager
def local_world():
    """A world of one inside this process, for building a model only to inspect it (the scaling
    planner counts parameters on the meta device): gloo over an in-memory store, so no port and
    no RANK/MASTER_* variables leak into the subprocesses a caller starts. No-op if a world exists."""
    if dist.is_initialized():
        yield
        return
    if not torch.cuda.is_available():
        from parallel.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        yield
    finally:
        destroy_distributed()


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_true(flag: bool) -> bool:
    """True iff `flag` holds on every rank (one tiny all-reduce)."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t)
    return int(t.item()) == 0


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
