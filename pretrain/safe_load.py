"""Loading checkpoint files without running pickled code.

torch.load with weights_only=False (what DeepSpeed 0.19 hard-codes in its checkpoint engine and in
zero_to_fp32) rebuilds any object a pickle names, i.e. runs code from the file. Every load of a
checkpoint in Frugal goes through `safe_load`: weights_only=True, which rebuilds tensors, builtins and
an explicit allow-list of plain data classes, and refuses anything else (pickle.UnpicklingError).
DeepSpeed's own loads are routed through it while they run (`safe_engine_loads`, `safe_torch_load`).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

_torch_load = torch.load  # the real one: safe_torch_load swaps torch.load for a while


# What DeepSpeed's files and the RNG files hold besides tensors and builtins (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints of ZeRO stages 0-3, fp32 and
# bf16): plain data classes, no code runs when they are rebuilt.
def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(file, map_location=None):
    """torch.load that only rebuilds tensors, builtins and the _safe_globals allow-list (never runs code)."""
    with torch.serialization.safe_globals(_safe_globals()):
        return _torch_load(file, map_location=map_location, weights_only=True)



@contextlib.contextmanager
def safe_torch_load(transform=None):
    """For DeepSpeed code that calls torch.load(weights_only=False) itself (zero_to_fp32, the
    universal-checkpoint converter): every torch.load in the block is a safe one. `transform`, if
    given, is applied to what each load returns (the caller's view of the files; they are unchanged)."""
    def load(file, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_safe_globals()):
            out = _torch_load(file, *args, **kwargs)
        return transform(out) if transform is not None else out

    torch.load = load
    try:
        yield
    finally:
        torch.load = _torch_load


@contextlib.contextmanager
def safe_engine_loads(engine):
    """DeepSpeed's checkpoint engine calls torch.load(weights_only=False); route it through safe_load."""
    ce = engine.checkpoint_engine
    ce.load = lambda path, map_location=None: safe_load(path, map_location=map_location)
    try:
        yield
    finally:
        del ce.load  # back to the class's method
