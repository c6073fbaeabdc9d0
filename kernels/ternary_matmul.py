"""Ternary (MatMul-free LM) linear layers for inference: 2-bit packed weights, int8 activations.

A ternary layer holds weight codes C in {-1, 0, 1} ([N, K]: out x in features) and one fp32 scale
gamma; activations arrive quantized per row to int8 codes X [M, K] with fp32 scales s (x ~ X / s).
The layer computes ``y[m, n] = (sum_k X[m, k] * C[n, k]) * gamma / s[m]``.

Why packed: decoding reads every weight once per generated token, so large layers are bound by
weight bytes. Two bits per code (four codes a byte) is 1/8 of bf16's bytes, and the kernel never
writes a dequantized copy: it unpacks each tile in registers to int8 and multiplies int8 x int8 ->
int32 on the tensor cores (exact integer sums), scaling by gamma / s only in the epilogue.

Packing layout (``pack_ternary``): code c is stored as c + 1 in {0, 1, 2}; byte j of row n holds
k = 4j, 4j+1, 4j+2, 4j+3 in bits 0-1, 2-3, 4-5, 6-7. K is padded to a multiple of 4 with code 0, so
a row is ceil(K / 4) bytes. Why this plain order rather than a K-interleaved one: it is independent of
the kernel's BLOCK_K (a block-interleaved layout would tie stored weights to one config and pad K to
it), the kernel's tile of BLOCK_K / 4 bytes is one contiguous load, and the four 2-bit planes are put
back in k order in registers (``tl.join`` + ``reshape``, a register-local interleave), so the int8
activation tile stays one contiguous, vectorizable load. Byte 0x55 decodes to four zeros: the
kernel's fill for masked loads.

Exactness: all sums are integers. The Triton kernel accumulates in int32 (|sum| <= 128 * K); the
CPU reference multiplies exact small integers in fp32, exact while every partial sum stays within
2**24, i.e. K <= 2**17 (131072). Both apply the scale in fp64 ((acc * gamma) / s, acc * gamma exact)
and round to fp32 and then to ``out_dtype``, so the two paths agree bit for bit.

Two regimes, one kernel: decode (M <= 16) is a GEMV that streams the weights once -- a 16-row tile
(tl.dot's minimum; rows past M load duplicates of valid rows and are not stored) and 64-wide N tiles,
split over K when the N tiles alone do not fill the GPU, the int32 partials summed by a second
kernel; prefill is a tiled GEMM with grouped tile ordering for L2 reuse of the activation rows.

Where it stands (H200, triton 3.6, per layer in CUDA-graph replays, weights not in L2): decode takes
0.85-1.1x the time of bf16 cuBLAS, which reads 8x the bytes -- at 2-4 MB packed a layer is bound by
launch and DRAM latency and then by the unpacking ALU work, not by bandwidth; prefill (M >= 512)
reaches 200-530 int8 TOPS, 1.4-3x bf16 cuBLAS's time: unpacking each weight tile in registers
(shift, mask, interleave, write to shared memory for the MMA) costs more than the int8 MMA itself.
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

MIN_SPLIT_K = 512  # a K split below this spends more on its int32 partial write/sum than on weights
MAX_SPLIT_K = 4  # H200: 4 splits beat 8 on every decode shape timed (K 2048-8192)
LUT_MAX_ROWS = 2  # reference: the per-activation lookup table beats unpacking up to this many rows
_SHIFTS = (0, 2, 4, 6)


def _codes_of_bytes() -> torch.Tensor:
    """[256, 4] fp32: the four codes each byte value holds, in k order."""
    b = torch.arange(256)
    return torch.stack([((b >> s) & 3) - 1 for s in _SHIFTS], dim=1).float()


_BYTE_CODES = _codes_of_bytes()


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes in {-1, 0, 1} [..., K] -> uint8 [..., ceil(K / 4)] (layout: module docstring)."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"ternary codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and bool(((codes < -1) | (codes > 1)).any()):
        bad = codes[(codes < -1) | (codes > 1)][0].item()
        raise ValueError(f"ternary codes must be in {{-1, 0, 1}}, found {bad}")
    k = codes.shape[-1]
    v = (codes + 1).to(torch.uint8)
    v = torch.nn.functional.pad(v, (0, -k % 4), value=1)  # value 1 = code 0: padding adds nothing
    v = v.reshape(*v.shape[:-1], -1, 4)
    return v[..., 0] | (v[..., 1] << 2) | (v[..., 2] << 4) | (v[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Exact inverse of ``pack_ternary``: uint8 [..., ceil(k / 4)] -> int8 codes [..., k]."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != -(-k // 4):
        raise ValueError(f"expected uint8 [..., {-(-k // 4)}] for k={k}, got {packed.dtype} {list(packed.shape)}")
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    codes = ((packed[..., None] >> shifts) & 3).to(torch.int8) - 1
    return codes.reshape(*packed.shape[:-1], -1)[..., :k]


def packed_nbytes(packed: torch.Tensor) -> int:
    return packed.numel() * packed.element_size()


def _gamma_tensor(gamma, device) -> torch.Tensor:
    """gamma as a 0-dim fp32 tensor on ``device``. A float is rounded to fp32 like a tensor would be;
    torch.full rather than torch.tensor: a fill kernel, not a host copy, so CUDA graphs capture it."""
    if isinstance(gamma, torch.Tensor):
        return gamma.reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), float(gamma), dtype=torch.float32, device=device)


def _check(x_codes, x_scale, packed):
    k = x_codes.shape[-1]
    if x_codes.dtype != torch.int8 or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"expected int8 activations and uint8 [N, K/4] weights, got {x_codes.dtype}, "
                         f"{packed.dtype} {list(packed.shape)}")
    if packed.shape[1] != -(-k // 4):
        raise ValueError(f"activations have K={k} but packed weights hold {packed.shape[1]} bytes a row")
    if x_scale.numel() != math.prod(x_codes.shape[:-1]):  # [...] like x's rows, or flattened [M]
        raise ValueError(f"x_scale {list(x_scale.shape)} must hold one scale per row of {list(x_codes.shape)}")


def ternary_matmul_reference(x_codes, x_scale, packed, gamma, *, out_dtype=torch.bfloat16):
    """Plain torch (the CPU production path). Rows <= LUT_MAX_ROWS: per group of 4 activations a
    table of its dot with all 256 byte values, then one gather per weight byte (no unpacked weight
    matrix: ~4x faster for batch-1 decoding on a CPU). More rows: unpack to fp32 once and one float
    matmul. Both exact (module docstring: K <= 2**17)."""
    _check(x_codes, x_scale, packed)
    lead, k = x_codes.shape[:-1], x_codes.shape[-1]
    n, k4 = packed.shape
    x = torch.nn.functional.pad(x_codes.reshape(-1, k).float(), (0, 4 * k4 - k))  # [M, 4 * k4]
    byte_codes = _BYTE_CODES.to(packed.device)
    if x.shape[0] <= LUT_MAX_ROWS:
        table = (x.reshape(-1, k4, 4) @ byte_codes.T).reshape(x.shape[0], -1)  # [M, k4 * 256]
        idx = packed.int() + torch.arange(k4, dtype=torch.int32, device=packed.device) * 256
        acc = table.index_select(1, idx.reshape(-1)).reshape(-1, n, k4).sum(-1)
    else:
        w = byte_codes.index_select(0, packed.reshape(-1).int()).reshape(n, 4 * k4)
        acc = x @ w.T
    y = acc.double() * _gamma_tensor(gamma, x.device).double() / x_scale.reshape(-1, 1).double()
    return y.float().to(out_dtype).reshape(*lead, n)


def ternary_matmul(x_codes, x_scale, packed, gamma, *, out_dtype=torch.bfloat16,
                   use_triton: bool | None = None, split_k: int | None = None):
    """y [..., N] (out_dtype) = (x_codes [..., K] int8 @ codes(packed) [N, K]^T) * gamma / x_scale [...].
    ``packed`` is uint8 [N, ceil(K / 4)] from ``pack_ternary``; gamma an fp32 0-dim tensor or a float.
    ``use_triton=None``: the Triton kernel on CUDA (where triton is installed), else the reference;
    ``use_triton=True`` on the CPU runs the kernel under Triton's interpreter (tests).
    ``split_k`` overrides the K-split heuristic (tests, tuning)."""
    if not dispatch.use_triton(use_triton, x_codes, "ternary_matmul"):
        return ternary_matmul_reference(x_codes, x_scale, packed, gamma, out_dtype=out_dtype)
    _check(x_codes, x_scale, packed)
    return _ternary_matmul_triton(x_codes, x_scale, packed, gamma, out_dtype, split_k)


def _config(m: int) -> dict:
    """Block sizes by M (fixed configs: no autotuning, which would crawl under the interpreter),
    picked from H200 timings (triton 3.6, K=2048/N=5632 and K=8192/N=2048, CUDA-graph replays).
    Decode: a 16-row tile (tl.dot's minimum), 64-wide N tiles, 128 contiguous weight bytes a row
    per step, the OFFSET_CODES unpack (see the kernel). Prefill: 256 x 128 tiles; a taller M tile
    amortises each unpacked weight tile over more rows (unpacking, not the MMA, bounds the GEMM)."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=512, num_warps=4, num_stages=3, OFFSET_CODES=True)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4, OFFSET_CODES=False)
    return dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, OFFSET_CODES=False)


def _split_k(tiles: int, k: int, num_sms: int) -> int:
    """Split K only when the output tiles alone leave SMs idle: up to four programs per SM (small
    programs: more of them keep more weight bytes in flight), never splits shorter than
    MIN_SPLIT_K, at most MAX_SPLIT_K (each split writes an int32 partial)."""
    if tiles >= num_sms:
        return 1
    return max(1, min(triton.cdiv(4 * num_sms, tiles), MAX_SPLIT_K, triton.cdiv(k, MIN_SPLIT_K)))


def _ternary_matmul_triton(x_codes, x_scale, packed, gamma, out_dtype, split_k=None):
    lead, k = x_codes.shape[:-1], x_codes.shape[-1]
    n, k4 = packed.shape
    x = x_codes.reshape(-1, k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    scale = x_scale.reshape(-1).to(torch.float32).contiguous()
    g = _gamma_tensor(gamma, x.device)
    packed = packed.contiguous()
    cfg = _config(m)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    splits = split_k or _split_k(tiles, k, dispatch.num_sms(x.device))
    # each split a whole number of K blocks; drop splits that would start past K
    chunk = triton.cdiv(triton.cdiv(max(k, 1), splits), bk) * bk
    splits = triton.cdiv(max(k, 1), chunk)
    part = torch.empty(splits, m, n, device=x.device, dtype=torch.int32) if splits > 1 else out
    _ternary_mm_kernel[(tiles, splits)](
        x, scale, packed, g, out, part, m, n, k, k4, x.stride(0), chunk,
        GROUP_M=8, SPLIT=splits > 1, EVEN_K=k % bk == 0, **cfg)
    if splits > 1:
        block = 128
        _splitk_sum_kernel[(m, triton.cdiv(n, block))](part, scale, g, out, m, n, splits, BLOCK_N=block)
    return out.reshape(*lead, n)


if triton is not None:

    @triton.jit
    def _scale_and_cast(acc, s, gamma, out_ty: tl.constexpr):
        """(acc * gamma) / s in fp64 (acc * gamma exact), rounded to fp32, then to the output type:
        the reference's exact sequence, so both paths agree bit for bit. fp64 rather than fp32:
        Triton's fp32 '/' is an approximate division on the GPU; fp64's is IEEE (div.rn.f64)."""
        y = (acc.to(tl.float64) * gamma.to(tl.float64) / s.to(tl.float64)).to(tl.float32)
        if out_ty == tl.bfloat16:
            # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates (and its
            # "rtne" mode rounds half up), so a plain cast would differ from torch's on the CPU
            u = y.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return y.to(out_ty)

    @triton.jit
    def _ternary_mm_kernel(X, XScale, W, Gamma, Out, Part, M, N, K, K4, stride_xm, chunk,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                           OFFSET_CODES: tl.constexpr):
        """One (output tile, K split): int8 activations x ternary weights unpacked in registers."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        # grouped order: GROUP_M row tiles walk the N tiles together, so activation rows stay in L2
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        group_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_m
        pid_n = (pid % width) // group_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows past M / N wrap onto valid ones: unmasked loads (vectorized), only the store is masked
        xm = (rm % M).to(tl.int64)
        wn = (rn % N).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        offs_b = tl.arange(0, BLOCK_K // 4)
        k_start = split * chunk
        k_end = tl.minimum(k_start + chunk, K)
        x_ptrs = X + xm[:, None] * stride_xm + (k_start + offs_k)[None, :]
        w_ptrs = W + wn[:, None] * K4 + (k_start // 4 + offs_b)[None, :]

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        x_sum = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:  # past K: zero activations, and weight bytes 0x55 (four zero codes)
                x = tl.load(x_ptrs, mask=(k0 + offs_k < K)[None, :], other=0)
                b = tl.load(w_ptrs, mask=(k0 // 4 + offs_b < K4)[None, :], other=0x55)
            # the four 2-bit planes (k = 4j + i) hold v = c + 1. OFFSET_CODES multiplies by v itself
            # and subtracts sum_k x at the end (x . c = x . v - sum x): one op less per weight for
            # BLOCK_M adds per k, a gain where BLOCK_M < BLOCK_N (decode), a loss in the GEMM tiles
            if OFFSET_CODES:
                p0 = (b & 3).to(tl.int8)
                p1 = ((b >> 2) & 3).to(tl.int8)
                p2 = ((b >> 4) & 3).to(tl.int8)
                p3 = (b >> 6).to(tl.int8)
                x_sum += tl.sum(x.to(tl.int32), axis=1)
            else:
                p0 = (b & 3).to(tl.int8) - 1
                p1 = ((b >> 2) & 3).to(tl.int8) - 1
                p2 = ((b >> 4) & 3).to(tl.int8) - 1
                p3 = (b >> 6).to(tl.int8) - 1
            # back into k order: join(join(p0, p2), join(p1, p3)) is [BN, BK/4, 2, 2], flat p0 p1 p2 p3
            w = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), [BLOCK_N, BLOCK_K])
            # int8 x int8 -> int32 (int8 MMA on the GPU). The CPU interpreter does the same exactly:
            # np.matmul with an int32 result (checked on triton 3.9), so no float stand-in is needed
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // 4

        if OFFSET_CODES:
            acc -= x_sum[:, None]  # this split's k only: the partials still sum to the whole
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        if SPLIT:  # int32 partial [split, M, N]; integer sums are exact in any order
            base = split.to(tl.int64) * M * N
            tl.store(Part + base + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=mask)
        else:
            s = tl.load(XScale + xm)
            g = tl.load(Gamma)
            y = _scale_and_cast(acc, s[:, None], g, Out.dtype.element_ty)
            tl.store(Out + rm[:, None].to(tl.int64) * N + rn[None, :], y, mask=mask)

    @triton.jit
    def _splitk_sum_kernel(Part, XScale, Gamma, Out, M, N, S, BLOCK_N: tl.constexpr):
        """One (row, N block): sum the splits' int32 partials, then the same epilogue."""
        m = tl.program_id(0).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rn < N
        acc = tl.zeros([BLOCK_N], dtype=tl.int32)
        for s in range(S):
            acc += tl.load(Part + (s * M + m) * N + rn, mask=mask, other=0)
        y = _scale_and_cast(acc, tl.load(XScale + m), tl.load(Gamma), Out.dtype.element_ty)
        tl.store(Out + m * N + rn, y, mask=mask)
