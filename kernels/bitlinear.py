"""BitLinear's input path: RMSNorm fused with per-token int8 activation quantization, its
straight-through backward, and the per-tensor ternary weight quantization (BitNet b1.58 /
MatMul-free LM).

Forward, per row x of length n with learnable RMSNorm weight w::

    rstd  = 1 / sqrt(sum(x^2) / n + eps)        y = x * w * rstd
    scale = 127 / max(max|y|, 1e-5)              codes = clamp(round(y * scale), -128, 127)  (int8)

and the layer multiplies ``codes / scale`` by the ternary weights ``clamp(round(W / gamma), -1, 1)
* gamma`` with ``gamma = mean|W|``. Backward is a straight-through estimator: rounding counts as
identity, so the gradient w.r.t. y goes straight to the RMSNorm backward.

Why one fused kernel: RMSNorm, the absmax and the quantization each read the whole activation; as
separate torch ops they read it ~5 times and write fp32 temporaries of its size. The kernel loads a
row once, keeps it in registers and writes one int8 byte per element plus two floats per row.

Why ``reduce`` is a callable: a row-parallel layer holds only n_local of the n columns, so sum(x^2)
and max|x*w| are partial per rank. They can be combined before rstd is known because rstd > 0 makes
max|y| = max|x*w| * rstd. The caller passes ``reduce`` (an all-reduce of the sums and of the maxes,
in place); the kernels never see a process group, and with ``reduce`` the path is two kernels with
the reduction between them (stats, then codes). The backward likewise reduces its per-row dot.

Why the forward kernels round exactly like the reference (IEEE sqrt/div, no FMA contraction, the
same operation order): codes are integers, so a one-ulp difference in a scale can flip a code at a
rounding tie; with identical arithmetic, kernel and reference agree bit for bit whenever their row
sums agree (always, when the sums are exact).
"""
from __future__ import annotations


import torch

from kernels import dispatch

try:  # CPU production installs have no triton: everything falls back to the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

QMAX = 127.0  # symmetric int8 range for activations (the code -128 only arises from a foreign scale)
MIN_ABSMAX = 1e-5  # an all-zero (or tiny) row would otherwise divide by zero
MIN_GAMMA = 1e-5
MAX_BLOCK_D = 16384  # a row lives in registers; wider rows would spill (LLaMA-70B is 8192)
TILE = 4096  # elements per program tile: small hidden sizes take several rows per program


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [M, D] with a contiguous last dim (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------- references (plain torch)

def row_stats_reference(x, weight):
    x = x.float()
    return (x * x).sum(-1), (x * weight.float()).abs().amax(-1)


def _rstd_scale(sumsq, amax, eps, n):
    """rstd and scale from the (reduced) row stats, rounded exactly as the kernel rounds them: 1/n
    is an fp32 constant; sqrt and reciprocal in fp64, then one rounding to fp32 (torch's fp32 sqrt
    on the CPU is not correctly rounded, and rsqrt is approximate on CUDA); for the scale, reciprocal
    then multiply (what torch does for ``127 / t``)."""
    rstd = (sumsq * (1.0 / n) + eps).double().sqrt().reciprocal().float()
    scale = (amax * rstd).clamp_min(MIN_ABSMAX).reciprocal() * QMAX
    return rstd, scale


def quantize_rows_reference(x, weight, rstd, scale):
    y_scaled = (x.float() * weight.float()) * (rstd * scale)[..., None]
    # clamping first is the same as clamping after (integer bounds), and keeps |v| small
    return y_scaled.clamp_(-QMAX - 1, QMAX).round_().to(torch.int8)  # round: half to even


def rmsnorm_quant_reference(x, weight, eps, n=None, reduce=None):
    n = x.shape[-1] if n is None else n
    sumsq, amax = row_stats_reference(x, weight)
    if reduce is not None:
        reduce(sumsq, amax)  # sum over ranks, max over ranks
    rstd, scale = _rstd_scale(sumsq, amax, eps, n)
    return quantize_rows_reference(x, weight, rstd, scale), scale, rstd


def rmsnorm_backward_reference(x, weight, rstd, grad_y, n=None, reduce=None):
    """d/dx and d/dw of y = x * rstd(x) * w, given grad_y (STE: the gradient w.r.t. y)."""
    n = x.shape[-1] if n is None else n
    x32, dy, rstd = x.float(), grad_y.float(), rstd[..., None]
    g = dy * weight.float()
    dot = (g * x32).sum(-1)
    if reduce is not None:
        reduce(dot)  # sum over ranks: rstd depends on every column
    grad_x = rstd * g - x32 * rstd ** 3 * dot[..., None] / n
    grad_w = (dy * x32 * rstd).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_w


def dequantize_rows(codes, scale, dtype):
    return codes.to(torch.float32).div_(scale[..., None]).to(dtype)


# ---------------------------------------------------------------- public entry points

def row_stats(x, weight, *, use_triton: bool | None = None):
    """(sum over the last dim of x^2, max over the last dim of |x*weight|), fp32 [...]."""
    if not dispatch.use_triton(use_triton, x, "row_stats"):
        return row_stats_reference(x, weight)
    x2 = _rows(x)
    sumsq = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
    amax = torch.empty_like(sumsq)
    grid, meta = _launch(x2)
    if grid[0]:
        _row_stats_kernel[grid](x2, weight, sumsq, amax, x2.shape[0], x2.shape[1], x2.stride(0), **meta)
    return sumsq.view(x.shape[:-1]), amax.view(x.shape[:-1])


def quantize_rows(x, weight, rstd, scale, *, use_triton: bool | None = None):
    """int8 codes clamp(round(x * weight * rstd * scale), -128, 127), rounding half to even."""
    if not dispatch.use_triton(use_triton, x, "quantize_rows"):
        return quantize_rows_reference(x, weight, rstd, scale)
    x2 = _rows(x)
    codes = torch.empty(x2.shape, device=x.device, dtype=torch.int8)
    grid, meta = _launch(x2)
    if grid[0]:
        _quantize_kernel[grid](x2, weight, rstd.reshape(-1).float().contiguous(),
                               scale.reshape(-1).float().contiguous(), codes,
                               x2.shape[0], x2.shape[1], x2.stride(0), **meta)
    return codes.view(x.shape)


def rmsnorm_quant(x, weight, eps, *, n=None, reduce=None, use_triton: bool | None = None):
    """RMSNorm then per-row int8 quantization: (codes int8 [..., D], scale fp32 [...], rstd fp32 [...]).
    ``n``: the logical row length (the full hidden size when x is a tensor-parallel slice);
    ``reduce(sumsq, amax)``: combines the row stats across ranks in place (sum, max)."""
    if not dispatch.use_triton(use_triton, x, "rmsnorm_quant"):
        return rmsnorm_quant_reference(x, weight, eps, n, reduce)
    n = x.shape[-1] if n is None else n
    if reduce is not None:  # the reduction has to sit between stats and codes: two kernels
        sumsq, amax = row_stats(x, weight, use_triton=True)
        reduce(sumsq, amax)
        rstd, scale = _rstd_scale(sumsq, amax, eps, n)
        return quantize_rows(x, weight, rstd, scale, use_triton=True), scale, rstd
    x2 = _rows(x)
    m, d = x2.shape
    codes = torch.empty(x2.shape, device=x.device, dtype=torch.int8)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(scale)
    grid, meta = _launch(x2)
    if grid[0]:
        _rmsnorm_quant_kernel[grid](x2, weight, codes, scale, rstd, m, d, x2.stride(0), 1.0 / n, eps, **meta)
    lead = x.shape[:-1]
    return codes.view(x.shape), scale.view(lead), rstd.view(lead)


def rmsnorm_backward(x, weight, rstd, grad_y, *, n=None, reduce=None, use_triton: bool | None = None):
    """STE backward of y = x * rstd * w: (grad_x in x.dtype, grad_weight fp32 [D]).
    ``reduce(dot)``: sums the per-row dot(grad_y * w, x) across ranks in place."""
    if not dispatch.use_triton(use_triton, x, "rmsnorm_backward"):
        return rmsnorm_backward_reference(x, weight, rstd, grad_y, n, reduce)
    n = x.shape[-1] if n is None else n
    x2, dy2 = _rows(x), _rows(grad_y)
    m, d = x2.shape
    rstd2 = rstd.reshape(-1).float().contiguous()
    grid, meta = _launch(x2)
    dot = None
    if reduce is not None:  # each rank's dot is partial: compute, reduce, then the gradients
        dot = torch.empty(m, device=x.device, dtype=torch.float32)
        if grid[0]:
            _row_dot_kernel[grid](x2, weight, dy2, dot, m, d, x2.stride(0), dy2.stride(0), **meta)
        reduce(dot.view(x.shape[:-1]))  # in place, shaped like the reference's
    # a bounded number of programs, each looping over row blocks: the fp32 grad_weight partials
    # are [programs, D], never [rows, D]
    programs = min(grid[0], 2 * dispatch.num_sms(x.device))
    grad_x = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    partial_w = torch.empty(programs, d, device=x.device, dtype=torch.float32)
    if programs:
        _rmsnorm_backward_kernel[(programs,)](
            x2, weight, rstd2, dy2, dot if dot is not None else rstd2, grad_x, partial_w,
            m, d, x2.stride(0), dy2.stride(0), 1.0 / n, HAS_DOT=dot is not None,
            **{**meta, "enable_fp_fusion": True})  # closeness, not bit-equality, is asked of it
    return grad_x.view(x.shape), partial_w.sum(0)


@torch.no_grad()  # integer codes and a statistic: the caller's STE carries the weight's gradient
def weight_codes(weight, *, reduce=None):
    """Ternary weights: (codes int8 in {-1, 0, 1}, gamma fp32 0-dim), gamma = mean|W| over the whole
    logical matrix. ``reduce(abs_sum, count)`` sums both across the ranks' shards in place."""
    # the 1-norm reduces in fp32 straight from bf16 without an |W| or fp32 copy of the weight
    abs_sum = torch.linalg.vector_norm(weight, 1, dtype=torch.float32)
    count = torch.full((), weight.numel(), device=weight.device, dtype=torch.float32)
    if reduce is not None:
        reduce(abs_sum, count)
    gamma = (abs_sum / count).clamp_min(MIN_GAMMA)
    # one fp32 temporary, rounded and clamped in place (torch.round: half to even)
    codes = weight.to(torch.float32, copy=True).div_(gamma).round_().clamp_(-1, 1).to(torch.int8)
    return codes, gamma


# ---------------------------------------------------------------- Triton

def _launch(x2):
    """Grid and meta-parameters: a tile of BLOCK_M whole rows (BLOCK_D = D padded to a power of 2)."""
    m, d = x2.shape
    block_d = triton.next_power_of_2(d)
    assert block_d <= MAX_BLOCK_D, f"row length {d} exceeds the fused kernels' limit {MAX_BLOCK_D}"
    block_m = min(max(1, TILE // block_d), triton.next_power_of_2(max(m, 1)))
    num_warps = min(16, max(1, block_m * block_d // 512))  # ~16 fp32 values per thread per tensor
    # fp fusion off: an FMA would round differently from the torch reference (see the docstring)
    meta = dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=False)
    return (triton.cdiv(m, block_m),), meta


if triton is not None:

    @triton.jit
    def _load_tile(X, W, row0, M, D, stride_x, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows [row0, row0 + BLOCK_M) of X and all of W in fp32; padding reads as 0."""
        rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: rows * stride overflows int32
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < M
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        return x, w, rows, cols, row_mask, mask

    @triton.jit
    def _quantize(xw, factor):
        """clamp(round(xw * factor), -128, 127) as int8, rounding half to even like torch.round."""
        v = tl.minimum(tl.maximum(xw * factor[:, None], -128.0), 127.0)
        # adding 1.5 * 2^23 pushes the fraction out of the fp32 mantissa, and IEEE addition rounds
        # to nearest even; exact for |v| < 2^22. libdevice's rint would do, but not interpreted.
        v = (v + 12582912.0) - 12582912.0
        return v.to(tl.int8)

    @triton.jit
    def _rstd_scale_tl(sumsq, amax, inv_n, eps):
        # per row, so fp64 costs nothing; see _rstd_scale for why fp64 and why this order
        rstd = (1.0 / tl.sqrt((sumsq * inv_n + eps).to(tl.float64))).to(tl.float32)
        m = tl.maximum(amax * rstd, 1e-5)
        return rstd, tl.div_rn(tl.full(m.shape, 1.0, tl.float32), m) * 127.0

    @triton.jit
    def _rmsnorm_quant_kernel(X, W, Codes, Scale, Rstd, M, D, stride_x, inv_n, eps,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """BLOCK_M rows: stats, rstd, scale and codes from one read of x."""
        x, w, rows, cols, row_mask, mask = _load_tile(X, W, tl.program_id(0) * BLOCK_M, M, D, stride_x,
                                                      BLOCK_M, BLOCK_D)
        xw = x * w[None, :]
        rstd, scale = _rstd_scale_tl(tl.sum(x * x, 1), tl.max(tl.abs(xw), 1), inv_n, eps)
        codes = _quantize(xw, rstd * scale)
        tl.store(Codes + rows[:, None] * D + cols[None, :], codes, mask=mask)
        tl.store(Scale + rows, scale, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)

    @triton.jit
    def _row_stats_kernel(X, W, SumSq, AMax, M, D, stride_x, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        x, w, rows, cols, row_mask, mask = _load_tile(X, W, tl.program_id(0) * BLOCK_M, M, D, stride_x,
                                                      BLOCK_M, BLOCK_D)
        tl.store(SumSq + rows, tl.sum(x * x, 1), mask=row_mask)
        tl.store(AMax + rows, tl.max(tl.abs(x * w[None, :]), 1), mask=row_mask)

    @triton.jit
    def _quantize_kernel(X, W, Rstd, Scale, Codes, M, D, stride_x,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        x, w, rows, cols, row_mask, mask = _load_tile(X, W, tl.program_id(0) * BLOCK_M, M, D, stride_x,
                                                      BLOCK_M, BLOCK_D)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        factor = rstd * tl.load(Scale + rows, mask=row_mask, other=0.0)
        tl.store(Codes + rows[:, None] * D + cols[None, :], _quantize(x * w[None, :], factor), mask=mask)

    @triton.jit
    def _row_dot_kernel(X, W, DY, Dot, M, D, stride_x, stride_dy,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """dot(grad_y * w, x) per row: the part of the RMSNorm backward that needs every column."""
        x, w, rows, cols, row_mask, mask = _load_tile(X, W, tl.program_id(0) * BLOCK_M, M, D, stride_x,
                                                      BLOCK_M, BLOCK_D)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Dot + rows, tl.sum(dy * w[None, :] * x, 1), mask=row_mask)

    @triton.jit
    def _rmsnorm_backward_kernel(X, W, Rstd, DY, Dot, DX, PartialW, M, D, stride_x, stride_dy, inv_n,
                                 HAS_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Row blocks pid, pid + P, ...: grad_x per row and this program's share of grad_weight."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
            x, w, rows, _, row_mask, mask = _load_tile(X, W, block * BLOCK_M, M, D, stride_x,
                                                          BLOCK_M, BLOCK_D)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)  # padded rows: rstd 0, no dw
            g = dy * w[None, :]
            if HAS_DOT:  # reduced across ranks by the caller
                dot = tl.load(Dot + rows, mask=row_mask, other=0.0)
            else:
                dot = tl.sum(g * x, 1)
            coef = rstd * rstd * rstd * dot * inv_n
            dx = rstd[:, None] * g - x * coef[:, None]
            tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * x * rstd[:, None], 0)
        tl.store(PartialW + pid * D + cols, dw, mask=cols < D)
