"""Split-KV decode attention: the Triton kernel against its reference, the reference against SDPA.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); on a CUDA machine the same tests run the compiled kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.decode_attention as da

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(da.triton is None, reason="triton is not installed")


def _inputs(b, h, kvh, cap, hd, lengths, *, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, hd, generator=gen)
    k = torch.randn(b, kvh, cap, hd, generator=gen)
    v = torch.randn(b, kvh, cap, hd, generator=gen)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    return [t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), v.to(dtype), lengths)]


# (b, h, kvh, cap, hd, lengths): ragged rows incl. length 1 and length == cap; cap=200 is not a
# multiple of BLOCK_N (64) nor of the split size
CASES = {
    "mha": (3, 4, 4, 200, 64, [1, 200, 77]),
    "gqa": (3, 8, 2, 200, 64, [200, 1, 130]),
    "gqa_g3_hd128": (2, 6, 2, 200, 128, [65, 200]),  # group of 3: padded query tile
}


@pytest.mark.parametrize("case", ["mha", "gqa"])
def test_reference_matches_sdpa_on_valid_prefix(case):
    """Ground truth: per row and query head, SDPA (fp64) over the kv head j // group, keys [:length]."""
    b, h, kvh, cap, hd, lengths = CASES[case]
    q, k, v, lens = _inputs(b, h, kvh, cap, hd, lengths)
    out = da.decode_attention_reference(q, k, v, lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    for r, n in enumerate(lengths):
        for j in range(h):
            kv = j // (h // kvh)
            want = F.scaled_dot_product_attention(q[r, j].double(), k[r, kv, :n].double(), v[r, kv, :n].double())
            torch.testing.assert_close(out[r, j].double(), want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])  # 8 on cap 200: splits that start past cap
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, num_splits):
    b, h, kvh, cap, hd, lengths = CASES[case]
    q, k, v, lens = _inputs(b, h, kvh, cap, hd, lengths)
    out = da.decode_attention(q, k, v, lens, use_triton=True, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, da.decode_attention_reference(q, k, v, lens), atol=1e-5, rtol=1e-5)


# bf16 is a GPU check: Triton's CPU interpreter multiplies bf16 tl.dot operands as raw bits
BF16_ON_GPU = pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="GPU check")])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, BF16_ON_GPU])
def test_triton_half_precision(dtype):
    """16-bit inputs: the kernel rounds the probabilities to the input dtype for the second dot."""
    b, h, kvh, cap, hd, lengths = CASES["gqa"]
    q, k, v, lens = _inputs(b, h, kvh, cap, hd, lengths, dtype=dtype)
    out = da.decode_attention(q, k, v, lens, use_triton=True, num_splits=3)
    assert out.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out, da.decode_attention_reference(q, k, v, lens), atol=tol, rtol=tol)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
def test_garbage_past_length_never_changes_output(use_triton):
    b, h, kvh, cap, hd, lengths = CASES["gqa"]
    q, k, v, lens = _inputs(b, h, kvh, cap, hd, lengths)
    clean = da.decode_attention(q, k, v, lens, use_triton=use_triton, num_splits=3 if use_triton else None)
    visible = torch.arange(cap, device=DEVICE)[None, :] < lens[:, None]
    visible = visible[:, None, :, None]
    for garbage in (float("nan"), float("inf"), 1e30):
        k_bad = torch.where(visible, k, garbage)
        v_bad = torch.where(visible, v, -garbage)
        dirty = da.decode_attention(q, k_bad, v_bad, lens, use_triton=use_triton,
                                    num_splits=3 if use_triton else None)
        assert torch.equal(dirty, clean), garbage


@needs_triton
def test_split_heuristic():
    # batch 1, 8 kv heads, long cache: enough splits for ~2 programs per SM, capped at MAX_SPLITS
    assert da._num_splits(8, 32768, 132) == 33
    assert da._num_splits(1, 32768, 132) == da.MAX_SPLITS
    # short cache: never splits shorter than MIN_SPLIT_KEYS
    assert da._num_splits(8, 200, 132) == 2
    assert da._num_splits(8, 1, 132) == 1
    # a large batch fills the GPU with one split
    assert da._num_splits(64 * 8, 32768, 132) == 1


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_follows_device_lengths():
    """One capture serves every decode step: only the lengths tensor changes between replays."""
    b, h, kvh, cap, hd = 2, 32, 8, 4096, 128
    q, k, v, lens = _inputs(b, h, kvh, cap, hd, [1, 1], dtype=torch.bfloat16)
    da.decode_attention(q, k, v, lens)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, k, v, lens)
    for new in ([1, 4096], [700, 33], [4096, 2049]):
        lens.copy_(torch.tensor(new))
        graph.replay()
        torch.testing.assert_close(out, da.decode_attention_reference(q, k, v, lens), atol=2e-2, rtol=2e-2)
