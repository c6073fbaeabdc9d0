"""BitLinear kernels: hand-checked quantization, the Triton kernels against their references, the
backward against autograd, and the tensor-parallel split (stats combined by ``reduce``).

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); on a CUDA machine the same tests run the compiled kernels.
"""
from __future__ import annotations

import pytest
import torch

import kernels.bitlinear as bl

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(bl.triton is None, reason="triton is not installed")
BOTH = pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
EPS = 1e-6


def _dyadic(*shape, seed=0, dtype=torch.float32):
    """Random nonzero multiples of 1/16 up to 4: exact in bf16, and their squares sum exactly in
    fp32 in any order, so the kernel's row sums equal torch's bit for bit and codes can be compared
    exactly (with arbitrary floats a one-ulp sum difference may flip a code at a rounding tie)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(1, 65, shape, generator=gen) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
    return (k / 16).to(dtype).to(DEVICE)


def _weight(d, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (1 + 0.25 * torch.randn(d, generator=gen)).to(DEVICE)


def _randn(*shape, seed=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


# ---------------------------------------------------------------- hand-checked quantization

@BOTH
def test_hand_checked_row(use_triton):
    # sum(x^2)/4 = 5.3125/4 = 1.328125; eps = 4 - 1.328125 makes rstd exactly 1/2, so
    # max|y| = 2 * 0.5 = 1, scale = 127, and codes = round(x * 63.5) = round([31.75, -63.5, 15.875, 127])
    x = torch.tensor([[0.5, -1.0, 0.25, 2.0]], device=DEVICE)
    codes, scale, rstd = bl.rmsnorm_quant(x, torch.ones(4, device=DEVICE), 2.671875, use_triton=use_triton)
    assert codes.dtype == torch.int8 and scale.dtype == rstd.dtype == torch.float32
    assert codes.tolist() == [[32, -64, 16, 127]]  # -63.5: a tie, to the even -64
    assert rstd.tolist() == [0.5] and scale.tolist() == [127.0]
    deq = bl.dequantize_rows(codes, scale, torch.float32)
    torch.testing.assert_close(deq, torch.tensor([[32, -64, 16, 127]], device=DEVICE) / 127.0)


@BOTH
def test_round_half_to_even_and_saturation(use_triton):
    # rstd = scale = 1: the codes are round(x) clamped to [-128, 127]
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 126.5, 127.5, 300.0, -300.0, -128.5, 0.49999997]],
                     device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    codes = bl.quantize_rows(x, torch.ones(x.shape[-1], device=DEVICE), one, one, use_triton=use_triton)
    assert codes.tolist() == [[0, 2, 2, 0, -2, 4, 126, 127, 127, -128, -128, 0]]
    assert codes.tolist() == torch.round(x).clamp(-128, 127).to(torch.int8).tolist()  # torch.round agrees


@BOTH
def test_tiny_and_zero_rows_clamp_absmax(use_triton):
    """max|y| below 1e-5 is clamped: the scale stays 127/1e-5 and small values keep small codes."""
    x = torch.tensor([[1e-9] * 6, [0.0] * 6], device=DEVICE)
    codes, scale, rstd = bl.rmsnorm_quant(x, torch.ones(6, device=DEVICE), EPS, use_triton=use_triton)
    torch.testing.assert_close(scale, torch.full((2,), 127 / 1e-5, device=DEVICE))
    torch.testing.assert_close(rstd, torch.full((2,), 1000.0, device=DEVICE))
    # 1e-9 * rstd (~1000) * 1.27e7 = 12.7
    assert codes.tolist() == [[13] * 6, [0] * 6]


# ---------------------------------------------------------------- Triton against the references

@needs_triton
@DTYPES
@pytest.mark.parametrize("shape", [(3, 5, 200), (64, 128)])  # 200: not a power of two
def test_rmsnorm_quant_triton_matches_reference(shape, dtype):
    x, w = _dyadic(*shape, dtype=dtype), _weight(shape[-1])
    codes, scale, rstd = bl.rmsnorm_quant(x, w, EPS, use_triton=True)
    ref_codes, ref_scale, ref_rstd = bl.rmsnorm_quant_reference(x, w, EPS)
    assert codes.shape == x.shape and scale.shape == rstd.shape == x.shape[:-1]
    # same arithmetic in the same order on exact row sums: bit for bit, not merely close
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale) and torch.equal(rstd, ref_rstd)
    # every row's largest |x*w| lands on the edge of the range
    assert (codes.abs().amax(-1) == 127).all()
    # and the codes dequantize to y = x * rstd * w within half a step
    y = x.float() * rstd[..., None] * w
    err = (bl.dequantize_rows(codes, scale, torch.float32) - y).abs() * scale[..., None]
    assert (err <= 0.5 + 1e-4).all()


@needs_triton
@DTYPES
def test_row_stats_and_quantize_rows_triton_match_reference(dtype):
    x, w = _randn(4, 3, 200, dtype=dtype), _weight(200)
    sumsq, amax = bl.row_stats(x, w, use_triton=True)
    ref_sumsq, ref_amax = bl.row_stats_reference(x, w)
    assert sumsq.shape == amax.shape == x.shape[:-1] and sumsq.dtype == amax.dtype == torch.float32
    torch.testing.assert_close(sumsq, ref_sumsq)
    assert torch.equal(amax, ref_amax)  # a max is exact in any order
    rstd, scale = _randn(4, 3, seed=5).abs() + 0.5, _randn(4, 3, seed=6).abs() * 40 + 10
    codes = bl.quantize_rows(x, w, rstd, scale, use_triton=True)
    assert torch.equal(codes, bl.quantize_rows_reference(x, w, rstd, scale))  # per element: exact
    assert codes.min() == -128 and codes.max() == 127  # this scale saturates both ends


@needs_triton
@DTYPES
@pytest.mark.parametrize("sms", [132, 1])  # 1 SM: 2 programs loop over 4 row blocks each
def test_rmsnorm_backward_triton_matches_reference(dtype, sms, monkeypatch):
    monkeypatch.setattr(bl.dispatch, "num_sms", lambda device: sms)
    x, w, gy = _randn(8, 16, 200, dtype=dtype), _weight(200), _randn(8, 16, 200, seed=3, dtype=dtype)
    _, _, rstd = bl.rmsnorm_quant_reference(x, w, EPS)
    gx, gw = bl.rmsnorm_backward(x, w, rstd, gy, use_triton=True)
    ref_gx, ref_gw = bl.rmsnorm_backward_reference(x, w, rstd, gy)
    assert gx.dtype == dtype and gx.shape == x.shape and gw.dtype == torch.float32 and gw.shape == (200,)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gw, ref_gw, atol=1e-4, rtol=1e-4)  # 128-row sums in another order


@BOTH
def test_rmsnorm_backward_matches_autograd(use_triton):
    """Ground truth: autograd of y = x * rsqrt(mean(x^2) + eps) * w in float64."""
    x, w, gy = _randn(6, 5, 200), _weight(200), _randn(6, 5, 200, seed=3)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w64
    y.backward(gy.double())
    _, _, rstd = bl.rmsnorm_quant(x, w, EPS, use_triton=use_triton)
    gx, gw = bl.rmsnorm_backward(x, w, rstd, gy, use_triton=use_triton)
    torch.testing.assert_close(gx.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), w64.grad, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- tensor parallelism via ``reduce``

@BOTH
def test_split_columns_with_reduce_equals_unsplit(use_triton):
    """Two row-parallel ranks simulated in one process: each holds half the columns; its reduce adds
    (max-es) the other half's stats, as an all-reduce would. Codes, scale, rstd equal the unsplit
    call's, and the halves' gradients are the unsplit gradients' halves."""
    d = 200
    x, w, gy = _dyadic(4, 8, d), _weight(d), _randn(4, 8, d, seed=3)
    halves = (slice(0, d // 2), slice(d // 2, d))
    codes, scale, rstd = bl.rmsnorm_quant(x, w, EPS, use_triton=use_triton)
    gx, gw = bl.rmsnorm_backward(x, w, rstd, gy, use_triton=use_triton)
    stats = [bl.row_stats(x[..., s], w[s], use_triton=use_triton) for s in halves]
    dots = [(gy[..., s] * w[s] * x[..., s]).sum(-1) for s in halves]
    for rank, s in enumerate(halves):
        other_sumsq, other_amax = stats[1 - rank]

        def reduce_stats(sumsq, amax):
            sumsq.add_(other_sumsq)
            torch.maximum(amax, other_amax, out=amax)

        c, sc, r = bl.rmsnorm_quant(x[..., s], w[s], EPS, n=d, reduce=reduce_stats, use_triton=use_triton)
        assert torch.equal(c, codes[..., s]) and torch.equal(sc, scale) and torch.equal(r, rstd)
        g, gw_half = bl.rmsnorm_backward(x[..., s], w[s], r, gy[..., s], n=d,
                                         reduce=lambda dot: dot.add_(dots[1 - rank]), use_triton=use_triton)
        torch.testing.assert_close(g, gx[..., s])
        torch.testing.assert_close(gw_half, gw[s])


# ---------------------------------------------------------------- ternary weights

def test_weight_codes_hand_checked():
    # mean|W| = 8/4 = 2: W/gamma = [1, -1, 0.5, -1.5] -> round half to even [1, -1, 0, -2] -> clamp
    codes, gamma = bl.weight_codes(torch.tensor([[2.0, -2.0], [1.0, -3.0]], device=DEVICE))
    assert gamma.dim() == 0 and gamma.dtype == torch.float32 and gamma.item() == 2.0
    assert codes.dtype == torch.int8 and codes.tolist() == [[1, -1], [0, -1]]
    # mean|W| = 2.85/4 = 0.7125: W/gamma ~ [0.42, -1.26, 0.07, 2.25]
    codes, gamma = bl.weight_codes(torch.tensor([[0.3, -0.9], [0.05, 1.6]], device=DEVICE))
    assert gamma.item() == pytest.approx(0.7125) and codes.tolist() == [[0, -1], [0, 1]]
    _, gamma = bl.weight_codes(torch.full((3, 3), 1e-8, device=DEVICE))
    assert gamma.item() == pytest.approx(1e-5)  # clamped


@DTYPES
def test_weight_codes_random_and_reduce_over_shards(dtype):
    w = _randn(48, 40, seed=4, dtype=dtype)
    codes, gamma = bl.weight_codes(w)
    assert codes.shape == w.shape and codes.dtype == torch.int8
    torch.testing.assert_close(gamma, w.float().abs().mean())
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    assert torch.equal(codes, (w.float() / gamma).round().clamp(-1, 1).to(torch.int8))
    # two shards (as a tensor-parallel split holds them) summing abs_sum and count across "ranks"
    shards = (w[:20], w[20:])
    sums = [(s.float().abs().sum(), torch.tensor(float(s.numel()), device=DEVICE)) for s in shards]
    for rank, shard in enumerate(shards):
        other_sum, other_count = sums[1 - rank]

        def reduce(abs_sum, count):
            abs_sum.add_(other_sum)
            count.add_(other_count)

        shard_codes, shard_gamma = bl.weight_codes(shard, reduce=reduce)
        torch.testing.assert_close(shard_gamma, gamma)
        assert torch.equal(shard_codes, codes[:20] if rank == 0 else codes[20:])
