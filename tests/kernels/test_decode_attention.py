"""Split-KV decode attention: the Triton kernel against its reference, the reference against SDPA.

Without a GPU the kernels run under Triton's interpreter. @triton.jit picks interpreter or compiler
when it decorates: at the import of kernels.decode_attention, and of triton itself (its own tl.max /
tl.sum helpers are jitted), so TRITON_INTERPRET=1 must be set before triton is first imported. Triton
also reads it again at launch, so an autouse fixture keeps it set during each test. It is set only
around the import and inside this module's tests: it does not leak into other test modules or their
subprocesses. Where another module imported triton first (pretrain imports this kernel), the
interpreter cannot run in this process, and one test reruns this file in a fresh one instead.
On a CUDA machine it is never set and the same tests run the compiled kernels.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REPO, run, subprocess_env

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# can the Triton tests run in this process: compiled on CUDA, or triton not yet imported uninterpreted
IN_PROCESS = CUDA or os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules


def _import_kernels():
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("kernels.decode_attention")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


da = _import_kernels()


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


PREIMPORTED = "triton was imported before TRITON_INTERPRET=1: test_triton_in_fresh_process runs this"


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton")
    if not IN_PROCESS:
        pytest.skip(PREIMPORTED)


@pytest.mark.skipif(IN_PROCESS, reason="the Triton tests run in this process")
def test_triton_in_fresh_process():
    pytest.importorskip("triton")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-rs"]
    proc = run(cmd, env=subprocess_env(TRITON_INTERPRET="1"), cwd=REPO, timeout=300)
    assert proc.returncode == 0 and PREIMPORTED not in proc.stdout, proc.stdout


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


@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])  # 8 on cap 200: splits that start past cap
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(needs_triton, case, num_splits):
    b, h, kvh, cap, hd, lengths = CASES[case]
    q, k, v, lens = _inputs(b, h, kvh, cap, hd, lengths)
    out = da.decode_attention(q, k, v, lens, use_triton=True, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, da.decode_attention_reference(q, k, v, lens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(needs_triton, dtype):
    """16-bit inputs: the kernel rounds the probabilities to the input dtype for the second dot."""
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("the triton interpreter multiplies bf16 tl.dot operands as raw bits")
    b, h, kvh, cap, hd, lengths = CASES["gqa"]
    q, k, v, lens = _inputs(b, h, kvh, cap, hd, lengths, dtype=dtype)
    out = da.decode_attention(q, k, v, lens, use_triton=True, num_splits=3)
    assert out.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out, da.decode_attention_reference(q, k, v, lens), atol=tol, rtol=tol)


@pytest.mark.parametrize("use_triton", [False, True])
def test_garbage_past_length_never_changes_output(request, use_triton):
    if use_triton:
        request.getfixturevalue("needs_triton")
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


def test_split_heuristic(needs_triton):
    # batch 1, 8 kv heads, long cache: enough splits for ~2 programs per SM, capped at MAX_SPLITS
    assert da._num_splits(8, 32768, 132) == 33
    assert da._num_splits(1, 32768, 132) == da.MAX_SPLITS
    # short cache: never splits shorter than MIN_SPLIT_KEYS
    assert da._num_splits(8, 200, 132) == 2
    assert da._num_splits(8, 1, 132) == 1
    # a large batch fills the GPU with one split
    assert da._num_splits(64 * 8, 32768, 132) == 1


def test_dispatch(monkeypatch):
    """use_triton=None: Triton on CUDA or under TRITON_INTERPRET=1 (where triton is installed)."""
    calls = []
    monkeypatch.setattr(da, "_decode_attention_triton", lambda *a: calls.append(a) or a[0])
    q, k, v, lens = _inputs(*CASES["mha"])
    has_triton = da.triton is not None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    da.decode_attention(q, k, v, lens, use_triton=False)
    assert len(calls) == 0
    da.decode_attention(q, k, v, lens)
    assert len(calls) == int(CUDA and has_triton)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    da.decode_attention(q, k, v, lens)
    assert len(calls) == int(CUDA and has_triton) + int(has_triton)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_follows_device_lengths(needs_triton):
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
