"""Linear recurrence h_t = a_t * h_{t-1} + b_t: the Triton kernels and the chunked torch reference
against the obvious per-timestep loop, forward and backward, plus the one-token decode step.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported), which runs tl.associative_scan one element at a time in Python: shapes
stay tiny, and block_d=16 makes D=20 span two channel blocks, the second one partial.
"""
from __future__ import annotations

import pytest
import torch

import kernels.scan as sc

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(sc.triton is None, reason="triton is not installed")

B, D, BLOCK_D = 2, 20, 16  # D is not a multiple of BLOCK_D


def _inputs(b, t, d, *, seed=0, dtype=torch.float32, h0=True, grad=False):
    """a in (0, 1) like a forget gate, b and h0 standard normal."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.sigmoid(torch.randn(b, t, d, generator=gen, dtype=torch.float64))
    x = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    s = torch.randn(b, d, generator=gen, dtype=torch.float64) if h0 else None
    out = [a.to(DEVICE, dtype), x.to(DEVICE, dtype), None if s is None else s.to(DEVICE, torch.float32)]
    return [v.requires_grad_() if grad and v is not None else v for v in out]


def _f64(*tensors):
    """Detached fp64 leaf copies: the ground truth runs in fp64 on the same values."""
    return [None if v is None else v.detach().double().requires_grad_() for v in tensors]


# T=100 with CHUNK=64: a full chunk then a partial one; chunk=16: seven carries; T=1: one step
SEQ = [(100, None), (1, None), (100, 16)]


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("t", [100, 64, 1])
def test_reference_matches_naive(t, with_h0):
    a, b, h0 = _f64(*_inputs(B, t, D, h0=with_h0))
    h, last = sc.linear_scan_reference(a, b, h0)
    want_h, want_last = sc.linear_scan_naive(a, b, h0)
    assert h.shape == a.shape and h.dtype == a.dtype and last.shape == (B, D)
    torch.testing.assert_close(h, want_h, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(last, want_last, atol=1e-12, rtol=1e-12)
    # and autograd through both agrees
    g_h, g_last = torch.randn_like(h), torch.randn_like(last)
    leaves = [v for v in (a, b, h0) if v is not None]
    got = torch.autograd.grad((h * g_h).sum() + (last * g_last).sum(), leaves)
    want = torch.autograd.grad((want_h * g_h).sum() + (want_last * g_last).sum(), leaves)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


def test_reference_is_stable_for_any_a():
    """a with exact zeros, negatives and values > 1: no division by cumulative products, no logs."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(B, 100, D, generator=gen, dtype=torch.float64) * 1.2
    a[:, ::7] = 0.0
    b = torch.randn(B, 100, D, generator=gen, dtype=torch.float64)
    h, last = sc.linear_scan_reference(a, b)
    want_h, want_last = sc.linear_scan_naive(a, b)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, want_h, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(last, want_last, atol=1e-12, rtol=1e-12)


@needs_triton
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("t,chunk", SEQ)
def test_triton_forward_matches_naive(t, chunk, with_h0):
    a, b, h0 = _inputs(B, t, D, h0=with_h0)
    h, last = sc.linear_scan(a, b, h0, use_triton=True, chunk=chunk, block_d=BLOCK_D)
    assert h.shape == a.shape and h.dtype == a.dtype and last.dtype == torch.float32
    want_h, want_last = sc.linear_scan_naive(*_f64(a, b, h0))
    torch.testing.assert_close(h.double(), want_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.double(), want_last, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("t,chunk", SEQ)
def test_triton_backward_matches_autograd_of_naive(t, chunk, with_h0):
    a, b, h0 = _inputs(B, t, D, h0=with_h0, grad=True)
    h, last = sc.linear_scan(a, b, h0, use_triton=True, chunk=chunk, block_d=BLOCK_D)
    ref = _f64(a, b, h0)
    want_h, want_last = sc.linear_scan_naive(*ref)
    gen = torch.Generator().manual_seed(2)
    g_h = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    g_last = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    leaves = [v for v in (a, b, h0) if v is not None]
    got = torch.autograd.grad((h * g_h.float()).sum() + (last * g_last.float()).sum(), leaves)
    want = torch.autograd.grad((want_h * g_h).sum() + (want_last * g_last).sum(),
                               [v for v in ref if v is not None])
    for name, x, y in zip("a b h0".split(), got, want):
        assert x.dtype == torch.float32, name
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5, msg=name)


@needs_triton
def test_triton_backward_with_one_output_used():
    """Only h_last (or only h) feeds the loss: the missing output gradient counts as zeros."""
    a, b, h0 = _inputs(B, 100, D, grad=True)
    ref = _f64(a, b, h0)
    for pick in (0, 1):
        out = sc.linear_scan(a, b, h0, use_triton=True, block_d=BLOCK_D)[pick]
        got = torch.autograd.grad(out.sum(), (a, b, h0))
        want = torch.autograd.grad(sc.linear_scan_naive(*ref)[pick].sum(), ref)
        for x, y in zip(got, want):
            torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
def test_scan_continues_from_h_last(use_triton):
    """Prefill in two pieces: [0:T1] then [T1:T] from h0 = h_last equals one scan of [0:T]."""
    a, b, h0 = _inputs(B, 100, D)
    kw = dict(use_triton=use_triton, block_d=BLOCK_D) if use_triton else dict(use_triton=False)
    full, full_last = sc.linear_scan(a, b, h0, **kw)
    t1 = 37  # both pieces start mid-chunk relative to the whole sequence
    first, mid = sc.linear_scan(a[:, :t1], b[:, :t1], h0, **kw)
    second, last = sc.linear_scan(a[:, t1:], b[:, t1:], mid, **kw)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last, full_last, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step_shape", ["bd", "b1d"])
def test_recurrent_step_matches_scan(step_shape, dtype):
    a, b, h0 = _inputs(B, 50, D, dtype=dtype)
    want_h, want_last = sc.linear_scan(a, b, h0, use_triton=False)
    state = h0.clone()
    ptr = state.data_ptr()
    for t in range(a.shape[1]):
        sl = slice(t, t + 1) if step_shape == "b1d" else t
        out = sc.recurrent_step(state, a[:, sl], b[:, sl])
        assert out is state and state.data_ptr() == ptr and state.dtype == torch.float32
        torch.testing.assert_close(state.to(dtype), want_h[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, want_last, atol=1e-5, rtol=1e-5)


def test_recurrent_step_active_mask():
    a, b, h0 = _inputs(3, 1, D)
    active = torch.tensor([True, False, True], device=DEVICE)
    state = h0.clone()
    out = sc.recurrent_step(state, a, b, active=active)
    assert out is state
    assert torch.equal(state[1], h0[1])  # inactive: bit-identical
    torch.testing.assert_close(state[[0, 2]], (a[:, 0] * h0 + b[:, 0])[[0, 2]])


@needs_triton
def test_triton_bf16_matches_reference():
    """16-bit inputs: both accumulate in fp32 and round h once; grad_a in the kernel uses the saved
    bf16 h (the reference differentiates through fp32 h), so grads agree to bf16 tolerance."""
    a, b, h0 = _inputs(B, 100, D, dtype=torch.bfloat16, grad=True)
    h, last = sc.linear_scan(a, b, h0, use_triton=True, block_d=BLOCK_D)
    ref = [v.detach().clone().requires_grad_() for v in (a, b, h0)]
    want_h, want_last = sc.linear_scan_reference(*ref)
    assert h.dtype == torch.bfloat16 and last.dtype == torch.float32
    torch.testing.assert_close(h, want_h, atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(last, want_last, atol=1e-5, rtol=1e-5)
    g_h = torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    got = torch.autograd.grad((h * g_h).float().sum() + last.sum(), (a, b, h0))
    want = torch.autograd.grad((want_h * g_h).float().sum() + want_last.sum(), ref)
    for name, x, y in zip("a b h0".split(), got, want):
        assert x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, atol=3e-2, rtol=3e-2, msg=name)


@needs_triton
def test_block_d_heuristic():
    assert sc._block_d(16, 2048) == sc.MAX_BLOCK_D  # 512 programs at 64 wide: enough
    assert sc._block_d(8, 2048) == 32  # 256 would be just under TARGET_PROGRAMS
    assert sc._block_d(1, 2048) == sc.MIN_BLOCK_D  # batch 1: narrow tiles for more programs
    assert sc._block_d(512, 20) == 32  # never much wider than D


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_at_training_shape(dtype):
    """Compiled kernels (associative_scan lowered for real, default tile heuristic) at an MLGRU-like
    shape, forward and backward against the reference."""
    a, b, h0 = _inputs(4, 2048, 1024, dtype=dtype, grad=True)
    h, last = sc.linear_scan(a, b, h0)
    ref = [v.detach().clone().requires_grad_() for v in (a, b, h0)]
    want_h, want_last = sc.linear_scan_reference(*ref)
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(h, want_h, atol=tol, rtol=tol)
    torch.testing.assert_close(last, want_last, atol=1e-4, rtol=1e-4)
    g_h = torch.randn_like(h)
    got = torch.autograd.grad((h * g_h).float().sum() + last.sum(), (a, b, h0))
    want = torch.autograd.grad((want_h * g_h).float().sum() + want_last.sum(), ref)
    for name, x, y in zip("a b h0".split(), got, want):
        torch.testing.assert_close(x, y, atol=max(tol, 1e-4) * 3, rtol=max(tol, 1e-4) * 3, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_recurrent_step_cuda_graph_replay():
    """One capture serves every decode step: only the step inputs change between replays."""
    a, b, h0 = _inputs(4, 8, 256, dtype=torch.bfloat16)
    state, a_in, b_in = h0.clone(), a[:, 0].clone(), b[:, 0].clone()
    active = torch.tensor([True, True, False, True], device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sc.recurrent_step(state, a_in, b_in, active=active)
    want = h0.clone()
    for t in range(a.shape[1]):
        a_in.copy_(a[:, t])
        b_in.copy_(b[:, t])
        graph.replay()
        want[active] = a[active, t].float() * want[active] + b[active, t].float()
        torch.testing.assert_close(state, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(state[2], h0[2])
