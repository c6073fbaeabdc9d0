"""Ternary matmul: 2-bit packing, the reference against an fp64 ground truth, the Triton kernel
against the reference (bit for bit, fp32 and bf16 output: both sum integers exactly and round the
scaled result the same way).

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); on a CUDA machine the same tests run the compiled kernels.
"""
from __future__ import annotations

import pytest
import torch

import kernels.ternary_matmul as tm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(tm.triton is None, reason="triton is not installed")

# K=601: not a multiple of 4 (a partial last byte), nor of either BLOCK_K (256 decode, 128 GEMM), and
# long enough for several K blocks and K splits; N=200: not a multiple of BLOCK_N (64 / 128).
# M: decode (1, 3: the reference's lookup-table and unpack paths), GEMM (17, 40: 64-row tiles; 130:
# one partial 256-row tile)
K, N = 601, 200
MS = [1, 3, 17, 40, 130]


def _inputs(m, k=K, n=N, *, seed=0, lead=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    x[0, :8] = torch.tensor([-128, 127, -128, 127, -128, 127, -128, 127], dtype=torch.int8)  # extremes
    scale = torch.rand(m, generator=gen) * 10 + 0.05
    codes = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    gamma = torch.tensor(0.0123, dtype=torch.float32)
    if lead is not None:
        x, scale = x.reshape(*lead, k), scale.reshape(lead)
    return [t.to(DEVICE) for t in (x, scale, codes, gamma)]


def _truth(x, scale, codes, gamma):
    """fp64: (X @ C^T) * gamma / s, every step exact but the division."""
    acc = x.reshape(-1, x.shape[-1]).double() @ codes.double().T
    y = acc * gamma.double() / scale.reshape(-1, 1).double()
    return y.reshape(*x.shape[:-1], codes.shape[0])


@pytest.mark.parametrize("k", [1, 4, 7, 601])
def test_pack_round_trip(k):
    codes = torch.randint(-1, 2, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    packed = tm.pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-k // 4))
    assert tm.packed_nbytes(packed) == 5 * -(-k // 4)
    out = tm.unpack_ternary(packed, k)
    assert out.dtype == torch.int8 and torch.equal(out, codes)


def test_pack_layout_and_padding():
    """Byte j holds k = 4j..4j+3 in bits 0-1, 2-3, 4-5, 6-7 as c + 1; padding is code 0."""
    codes = torch.tensor([[-1, 0, 1, 1, -1, 1]], dtype=torch.int8)
    packed = tm.pack_ternary(codes)
    assert packed.tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 0 | 2 << 2 | 1 << 4 | 1 << 6]]
    assert tm.pack_ternary(torch.zeros(1, 4, dtype=torch.int64)).item() == 0x55  # any int dtype


@pytest.mark.parametrize("bad", [2, -2, 127])
def test_pack_rejects_non_ternary(bad):
    codes = torch.zeros(3, 9, dtype=torch.int8)
    codes[1, 4] = bad
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        tm.pack_ternary(codes)
    with pytest.raises(ValueError, match="integer"):
        tm.pack_ternary(torch.zeros(3, 9))


@pytest.mark.parametrize("m", MS)
def test_reference_matches_fp64(m):
    x, scale, codes, gamma = _inputs(m)
    packed = tm.pack_ternary(codes)
    want = _truth(x, scale, codes, gamma)
    y32 = tm.ternary_matmul_reference(x, scale, packed, gamma, out_dtype=torch.float32)
    assert y32.dtype == torch.float32 and torch.equal(y32, want.float())
    y16 = tm.ternary_matmul_reference(x, scale, packed, gamma)  # bf16 by default
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, want.float().bfloat16())  # fp32, then bf16
    torch.testing.assert_close(y16.double(), want, atol=0, rtol=2**-8)
    # a float gamma is taken as fp32, like the tensor
    assert torch.equal(tm.ternary_matmul_reference(x, scale, packed, 0.0123, out_dtype=torch.float32), y32)


def test_reference_leading_dims():
    x, scale, codes, gamma = _inputs(6, lead=(2, 3))
    y = tm.ternary_matmul(x, scale, tm.pack_ternary(codes), gamma, out_dtype=torch.float32, use_triton=False)
    assert y.shape == (2, 3, N) and torch.equal(y, _truth(x, scale, codes, gamma).float())


def test_shape_errors():
    x, scale, codes, gamma = _inputs(3)
    packed = tm.pack_ternary(codes)
    with pytest.raises(ValueError, match="K=600"):
        tm.ternary_matmul(x[:, :600], scale, packed, gamma)  # 150 bytes, not the 151 stored
    with pytest.raises(ValueError, match="one scale per row"):
        tm.ternary_matmul(x, scale[:2], packed, gamma)


@needs_triton
@pytest.mark.parametrize("split_k", [None, 1, 3])  # None: the heuristic (2 splits for K=601 here)
@pytest.mark.parametrize("m", MS)
def test_triton_matches_reference(m, split_k):
    x, scale, codes, gamma = _inputs(m, seed=m)
    packed = tm.pack_ternary(codes)
    ref32 = tm.ternary_matmul_reference(x, scale, packed, gamma, out_dtype=torch.float32)
    y32 = tm.ternary_matmul(x, scale, packed, gamma, out_dtype=torch.float32, use_triton=True, split_k=split_k)
    assert y32.shape == (m, N) and y32.dtype == torch.float32
    assert torch.equal(y32, ref32)
    # bf16: the kernel rounds to nearest even by hand (the interpreter's own cast truncates), so
    # this is exact too, on the CPU as on the GPU
    y16 = tm.ternary_matmul(x, scale, packed, gamma, use_triton=True, split_k=split_k)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, ref32.bfloat16())


@needs_triton
def test_triton_even_k_and_leading_dims():
    """K a multiple of BLOCK_K (the unmasked loop), rows given as [2, 2, K], gamma a float."""
    x, scale, codes, gamma = _inputs(4, k=512, n=72, lead=(2, 2))
    packed = tm.pack_ternary(codes)
    y = tm.ternary_matmul(x, scale, packed, 0.0123, out_dtype=torch.float32, use_triton=True)
    assert y.shape == (2, 2, 72)
    assert torch.equal(y, tm.ternary_matmul_reference(x, scale, packed, gamma, out_dtype=torch.float32))


@needs_triton
def test_split_heuristic():
    # batch-1 decode of a 5632 x 2048 layer: 88 N tiles on 132 SMs -> 4 splits (352 programs)
    assert tm._split_k(88, 2048, 132) == 4
    assert tm._split_k(40, 8192, 132) == tm.MAX_SPLIT_K == 4  # 14 wanted: capped
    assert tm._split_k(40, 1024, 132) == 2  # never splits shorter than MIN_SPLIT_K
    assert tm._split_k(176, 2048, 132) == 1  # the output tiles fill the GPU already
    assert tm._config(1)["BLOCK_M"] == 16 and tm._config(512)["BLOCK_M"] == 256


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 16, 512])
def test_triton_realistic_shape_on_gpu(m):
    x, scale, codes, gamma = _inputs(m, k=2048, n=5632)
    packed = tm.pack_ternary(codes)
    ref = tm.ternary_matmul_reference(x, scale, packed, gamma, out_dtype=torch.float32)
    assert torch.equal(ref, _truth(x, scale, codes, gamma).float())
    assert torch.equal(tm.ternary_matmul(x, scale, packed, gamma, out_dtype=torch.float32), ref)
    y16 = tm.ternary_matmul(x, scale, packed, gamma)  # bf16: the same fp32 values, rounded
    assert torch.equal(y16, ref.to(torch.bfloat16))
