"""What every kernel module shares: the choice between its Triton kernel and its torch reference,
and the GPU's size for launch heuristics.

``use_triton=None`` (production): the Triton kernel on CUDA tensors where triton is installed, the
reference otherwise -- on a CPU even when Triton's interpreter is on, since generation on a CPU must
not crawl through it. ``use_triton=True`` on the CPU runs the kernel under the interpreter (tests:
TRITON_INTERPRET=1 before triton is imported, see tests/conftest.py).
"""
from __future__ import annotations

import torch

try:  # CPU production installs have no triton: everything falls back to the reference
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def use_triton(flag: bool | None, t: torch.Tensor, name: str) -> bool:
    """Resolve a kernel's ``use_triton`` argument for input tensor ``t`` (``name``: for the error)."""
    if flag is None:
        return triton is not None and t.is_cuda
    if flag and triton is None:
        raise RuntimeError(f"{name}(use_triton=True) needs triton, which is not installed")
    return flag


_NUM_SMS: dict[torch.device, int] = {}


@torch.compiler.assume_constant_result  # torch.compile (a compiled decode step) bakes it in: no graph break
def num_sms(device: torch.device) -> int:
    if device not in _NUM_SMS:
        # interpreter: pretend to be an H100/H200 so launch shapes match the GPU's
        cuda = device.type == "cuda"
        _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 132
    return _NUM_SMS[device]
