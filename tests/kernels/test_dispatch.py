"""Every kernel entry point dispatches through kernels/dispatch.py: use_triton=None runs the Triton
kernel on CUDA tensors (where triton is installed) and the reference on the CPU even under the
interpreter (generation on a CPU must not crawl through it); use_triton=False always the reference."""
from __future__ import annotations

import pytest
import torch

from kernels import bitlinear as bl
from kernels import decode_attention as da
from kernels import dispatch
from kernels import scan as sc
from kernels import ternary_matmul as tm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _codes():
    return torch.randint(-1, 2, (8, 16), generator=torch.Generator().manual_seed(1), dtype=torch.int8)


# entry point -> (module, its reference's name, a call with use_triton=flag on small valid inputs)
ENTRIES = {
    "decode_attention": (da, "decode_attention_reference", lambda flag: da.decode_attention(
        _rand(2, 4, 1, 16), _rand(2, 4, 32, 16), _rand(2, 4, 32, 16),
        torch.tensor([5, 32], device=DEVICE), use_triton=flag)),
    "linear_scan": (sc, "linear_scan_reference", lambda flag: sc.linear_scan(
        _rand(2, 10, 8).sigmoid(), _rand(2, 10, 8), use_triton=flag)),
    "ternary_matmul": (tm, "ternary_matmul_reference", lambda flag: tm.ternary_matmul(
        _codes().to(DEVICE), torch.ones(8, device=DEVICE), tm.pack_ternary(_codes()).to(DEVICE), 0.5,
        use_triton=flag)),
    "rmsnorm_quant": (bl, "rmsnorm_quant_reference", lambda flag: bl.rmsnorm_quant(
        _rand(2, 8), _rand(8), 1e-8, use_triton=flag)),
    "rmsnorm_backward": (bl, "rmsnorm_backward_reference", lambda flag: bl.rmsnorm_backward(
        _rand(2, 8), _rand(8), torch.ones(2, device=DEVICE), _rand(2, 8), use_triton=flag)),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_entry_points_dispatch(entry, monkeypatch):
    module, reference, call = ENTRIES[entry]
    calls = []
    real = getattr(module, reference)
    monkeypatch.setattr(module, reference, lambda *a, **k: calls.append(1) or real(*a, **k))
    call(False)
    assert len(calls) == 1
    call(None)
    assert len(calls) == (1 if CUDA and dispatch.triton is not None else 2)


def test_use_triton_rules(monkeypatch):
    cpu = torch.zeros(1)
    assert dispatch.use_triton(None, cpu, "k") is False  # the CPU: the reference, interpreter or not
    assert dispatch.use_triton(False, cpu, "k") is False
    monkeypatch.setattr(dispatch, "triton", None)
    with pytest.raises(RuntimeError, match=r"k\(use_triton=True\) needs triton"):
        dispatch.use_triton(True, cpu, "k")
