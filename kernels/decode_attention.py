"""Decode-step attention over a ragged, preallocated KV cache (flash-decoding / split-KV).

Computes, for one new query token per row, ``softmax(q k^T / sqrt(hd)) v`` over the first
``lengths[r]`` keys of row r of a cache preallocated to ``cap`` positions. Query head j reads kv
head ``j // (h // kvh)`` (grouped-query attention). The softmax accumulates in fp32.

Why split-KV: a decode step has one query per (row, head), so a kernel with one program per
(row, kv head) launches only b*kvh programs -- 8 at batch 1 with 8 kv heads, on a GPU with 132 SMs.
Splitting each row's keys into chunks gives (b*kvh*splits) programs that each reduce one chunk to a
partial (max, sum, unnormalised acc); a second small kernel merges the partials (log-sum-exp).

Why ``lengths`` is read on the device: the step is meant to be captured once in a CUDA graph and
replayed for every generated token. Replay cannot change launch shapes, so the grid is sized from
``cap`` (static) and each program reads its row's length from device memory, skipping or masking
keys past it; no host sync, no ``.item()``, nothing shaped by the lengths' values.
"""
from __future__ import annotations

import math

import torch

from kernels import dispatch

try:  # CPU production installs have no triton: everything falls back to the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

BLOCK_N = 64  # keys per inner iteration
MIN_SPLIT_KEYS = 128  # a split below this spends more on its partial write/merge than on keys
MAX_SPLITS = 64


def decode_attention_reference(q, k, v, lengths):
    """Plain torch: mask keys >= lengths[r], expand kv heads for GQA, softmax in fp32."""
    b, h, _, hd = q.shape
    kvh, cap = k.shape[1], k.shape[2]
    visible = torch.arange(cap, device=q.device)[None, :] < lengths[:, None]  # [b, cap]
    visible = visible[:, None, :, None]  # [b, 1, cap, 1]
    # zero the invisible cache slots (not just mask scores): 0 * NaN garbage would still be NaN
    k = torch.where(visible, k.float(), 0.0).repeat_interleave(h // kvh, dim=1)
    v = torch.where(visible, v.float(), 0.0).repeat_interleave(h // kvh, dim=1)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(hd)  # [b, h, 1, cap]
    scores = scores.masked_fill(~visible.transpose(-1, -2), float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


def decode_attention(q, k, v, lengths, *, use_triton: bool | None = None, num_splits: int | None = None):
    """Attention of q [b, h, 1, hd] over k/v [b, kvh, cap, hd] limited to lengths [b] (int64, on
    q's device). Returns [b, h, 1, hd] in q's dtype. ``use_triton=None``: the Triton kernel on CUDA
    (where triton is installed), else the reference; ``use_triton=True`` on the CPU runs the kernel
    under Triton's interpreter (tests: TRITON_INTERPRET=1 before triton is imported).
    ``num_splits`` overrides the split heuristic (tests, tuning)."""
    if not dispatch.use_triton(use_triton, q, "decode_attention"):
        return decode_attention_reference(q, k, v, lengths)
    return _decode_attention_triton(q, k, v, lengths, num_splits)


def _num_splits(batch_heads: int, cap: int, num_sms: int) -> int:
    """Enough (row, kv head, split) programs for about two per SM, never more than MAX_SPLITS and
    never splits shorter than MIN_SPLIT_KEYS; large batches already fill the GPU with 1 split."""
    want = triton.cdiv(2 * num_sms, batch_heads)
    return max(1, min(want, MAX_SPLITS, triton.cdiv(cap, MIN_SPLIT_KEYS)))


def _decode_attention_triton(q, k, v, lengths, num_splits=None):
    b, h, one, hd = q.shape
    _, kvh, cap, _ = k.shape
    assert one == 1 and k.shape == v.shape and k.shape[0] == b and k.shape[3] == hd and h % kvh == 0
    assert hd >= 16 and hd & (hd - 1) == 0, f"head dim must be a power of two >= 16, got {hd}"
    assert q.dtype == k.dtype == v.dtype and lengths.dtype == torch.int64 and lengths.shape == (b,)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "the cache's head dim must be contiguous"
    q = q.contiguous()  # small; the cache is never copied
    group = h // kvh
    if num_splits is None:
        num_splits = _num_splits(b * kvh, cap, dispatch.num_sms(q.device))
        # round each split up to whole key blocks, then drop splits that would start past cap
        chunk = triton.cdiv(triton.cdiv(cap, num_splits), BLOCK_N) * BLOCK_N
        num_splits = triton.cdiv(cap, chunk)
    else:
        chunk = triton.cdiv(triton.cdiv(cap, num_splits), BLOCK_N) * BLOCK_N

    # fp32 scratch for the partials; under CUDA-graph capture these come from the graph's pool
    part_m = torch.empty(b, h, num_splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(b, h, num_splits, hd, device=q.device, dtype=torch.float32)
    out = torch.empty(b, h, 1, hd, device=q.device, dtype=q.dtype)

    qk_scale = 1.0 / math.sqrt(hd) * 1.4426950408889634  # fold log2(e) in: exp2 is the fast path
    _split_kernel[(b * kvh, num_splits)](
        q, k, v, lengths, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cap, chunk,
        # a constexpr (one value per head dim, like HD): as a runtime float, torch.compile passes it as
        # fp64, which would promote the scores and break the fp32 loop-carried softmax state
        QK_SCALE=qk_scale, KVH=kvh, G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HD=hd,
        BLOCK_N=BLOCK_N,
        # fp32 inputs: tl.dot would otherwise round through tf32 (~1e-3 error) on the GPU
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    # BLOCK_S >= 16: padded (masked) splits cost nothing and avoid 1-wide tiles when num_splits == 1
    _combine_kernel[(b * h,)](part_m, part_l, part_acc, out, num_splits, HD=hd,
                              BLOCK_S=max(16, triton.next_power_of_2(num_splits)))
    return out


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, Lengths, PartM, PartL, PartAcc,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                      cap, chunk, QK_SCALE: tl.constexpr,
                      KVH: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One (row, kv head, split): all G query heads of the group against keys [start, end)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        row = (pid // KVH).to(tl.int64)  # int64: row * stride overflows int32 on large caches
        kv = (pid % KVH).to(tl.int64)
        length = tl.minimum(tl.load(Lengths + row).to(tl.int32), cap)
        start = split * chunk
        end = tl.minimum(start + chunk, length)  # end <= start: empty split, the loop never runs

        offs_g = tl.arange(0, BLOCK_G)  # G padded up to tl.dot's minimum of 16 rows
        offs_d = tl.arange(0, HD)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < G
        heads = kv * G + offs_g
        q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None], other=0.0)
        k_base = K + row * stride_kb + kv * stride_kh
        v_base = V + row * stride_vb + kv * stride_vh

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HD], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + offs_n
            valid = n < end  # never load past the row's length: that memory may hold anything
            k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
            s = tl.where(valid[None, :], s, float("-inf"))
            # online softmax; each block holds >= 1 valid key, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # partials laid out [b, h, split(, hd)]; an empty split stores (-inf, 0, 0): weight 0 below
        part = (row * (KVH * G) + heads) * num_splits + split
        tl.store(PartM + part, m_i, mask=g_mask)
        tl.store(PartL + part, l_i, mask=g_mask)
        tl.store(PartAcc + part[:, None] * HD + offs_d[None, :], acc, mask=g_mask[:, None])

    @triton.jit
    def _combine_kernel(PartM, PartL, PartAcc, Out, num_splits, HD: tl.constexpr, BLOCK_S: tl.constexpr):
        """One (row, query head): log-sum-exp merge of its splits' partials."""
        pid = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, HD)
        s_mask = offs_s < num_splits
        part = pid * num_splits + offs_s
        m = tl.load(PartM + part, mask=s_mask, other=float("-inf"))
        l = tl.load(PartL + part, mask=s_mask, other=0.0)
        acc = tl.load(PartAcc + part[:, None] * HD + offs_d[None, :], mask=s_mask[:, None], other=0.0)
        m_max = tl.max(m, 0)  # finite: split 0 always holds key 0 (lengths >= 1)
        w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
        out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
        tl.store(Out + pid * HD + offs_d, out.to(Out.dtype.element_ty))
