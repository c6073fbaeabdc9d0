"""Make megatron-core and DeepSpeed run on a CPU-only machine with gloo.

Applied by `parallel.distributed.init_distributed` only when CUDA is absent; on a GPU box this
module is never called. Everything that pretends CUDA exists lives here and nowhere else:

- megatron-core allocates communication buffers with `device=torch.cuda.current_device()`:
  answer "cpu".
- megatron-core's RNG tracker forks the *CUDA* generator (`_get_cuda_rng_state`, `_set_cuda_rng_state`,
  `torch.cuda.manual_seed` inside `CudaRNGStatesTracker.add`): route them to the CPU generator.
- megatron-core's pipeline schedules build `torch.zeros(..., device="cuda")` literals: map a
  "cuda" device argument of `torch.zeros` inside that module to "cpu".
- DeepSpeed's CPU accelerator JIT-compiles a shared-memory comm op at init (~40 s on 2 cores):
  mark it incompatible so DeepSpeed falls back to plain torch.distributed.
"""
from __future__ import annotations

import functools
import os

import torch

_applied = False


def _cpu_device() -> str:
    return "cpu"


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Same bookkeeping as megatron's tracker; states are CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _patch_megatron_schedules() -> None:
    try:
        from megatron.core.pipeline_parallel import schedules
    except ImportError:  # pipeline schedules are optional for the TP-only foundation
        return

    class _TorchOnCpu:
        """`torch` as seen by megatron's schedules module, with device='cuda' mapped to cpu."""

        def __getattr__(self, name):
            attr = getattr(torch, name)
            if name in ("zeros", "ones", "empty", "tensor", "full"):

                @functools.wraps(attr)
                def on_cpu(*args, **kwargs):
                    if str(kwargs.get("device", "")).startswith("cuda"):
                        kwargs["device"] = "cpu"
                    return attr(*args, **kwargs)

                return on_cpu
            return attr

    schedules.torch = _TorchOnCpu()


def _patch_deepspeed() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    # deepspeed.comm.torch.build_shm_op returns None for an incompatible builder.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def apply_cpu_shim() -> None:
    """Idempotent. Call before building any megatron-core layer on a machine without CUDA."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_shim() is for machines without CUDA")
    torch.cuda.current_device = _cpu_device
    _patch_megatron_rng()
    _patch_megatron_schedules()
    _patch_deepspeed()
    _applied = True
