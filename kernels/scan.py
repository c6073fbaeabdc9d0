"""Element-wise (diagonal) linear recurrence ``h_t = a_t * h_{t-1} + b_t`` over [B, T, D] tensors.

This is the token mixer of the MatMul-free LM's MLGRU (``h_t = f_t * h_{t-1} + (1 - f_t) * c_t``,
so ``a = f`` and ``b = (1 - f) * c``): every channel is an independent first-order recurrence, so
the only thing that makes it expensive is its sequential dependence along T.

Why chunked: a program that steps through T one timestep at a time does one tiny [BLOCK_D] FMA per
global-memory round trip and is latency bound (the reference implementation's sequential kernel was
~5x slower than a chunked one). Steps compose associatively -- applying (a1, b1) then (a2, b2) is
``h -> a2*(a1*h + b1) + b2 = (a1*a2) h + (a2*b1 + b2)`` -- so each program loads a [CHUNK, BLOCK_D]
tile, scans it in parallel with ``tl.associative_scan`` (log2 CHUNK combine steps), and only the
carry between chunks is sequential: T/CHUNK dependent steps instead of T.

Why the backward also scans: the adjoint is the same recurrence run backwards,
``dh_t = g_t + a_{t+1} * dh_{t+1}`` (``dh_{T-1}`` also receives the grad of h_last), with
``grad_b = dh``, ``grad_a_t = dh_t * h_{t-1}`` and ``grad_h0 = a_0 * dh_0``. The backward kernel
walks the chunks last to first and loads each tile in reversed time order, so a *forward*
associative scan of the flipped tile is the reverse scan. It does not use ``reverse=True``: with a
non-commutative combine like this one, compiled Triton has disagreed with the interpreter (and with
jax.lax.associative_scan) on the operand order (triton-lang/triton#4362); reversed indices are
unambiguous on both.

Why the backward reads the saved output h instead of recomputing it: the MLGRU consumer
(``o = g * h``) keeps h alive for its own backward anyway, so saving it costs no memory, and the
backward stays one streaming pass (a, grad h, h in; grad a, grad b out). Recomputing h in fp32
would need a forward scan in natural order beside the reversed one, i.e. a flip of a register tile
per chunk. The price: for 16-bit inputs grad_a uses h rounded to the input dtype (relative error
<= 2^-8 in bf16), the same rounding the consumer's own gradient already sees.

Precision: steps accumulate in fp32 (fp64 for fp64 inputs); h comes back in a's dtype, h_last in
the accumulation dtype so a continued scan (``h0 = h_last``) starts from the unrounded state.

The CPU path (``linear_scan_reference``) is plain torch and differentiable by autograd, chunked
too: a step loop inside chunks (vectorised over all chunks) and a doubling (Hillis-Steele) scan
over the chunk totals -- only products and sums, never a division by cumulative products of a
(unstable when a -> 0) nor logs of a (a > 0 is not guaranteed).
``recurrent_step`` is the one-token decode update, in place on a preallocated state.
"""
from __future__ import annotations

import torch

from kernels import dispatch

try:  # CPU production installs have no triton: everything falls back to the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

CHUNK = 64  # timesteps per tile: log2(64) = 6 combine steps, T/64 sequential carries
MAX_BLOCK_D = 64  # channels per program; narrower when that leaves the GPU underfilled
MIN_BLOCK_D = 16
TARGET_PROGRAMS = 264  # ~2 per SM on an H100/H200: each program's chunk walk is latency bound


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _check(a, b, h0):
    assert a.dim() == 3 and a.shape == b.shape, f"a and b must both be [B, T, D], got {a.shape}, {b.shape}"
    assert a.shape[1] >= 1, "empty sequence"
    assert h0 is None or h0.shape == (a.shape[0], a.shape[2]), f"h0 must be [B, D], got {h0.shape}"


def linear_scan_naive(a, b, h0=None):
    """Ground truth: one Python step per timestep. Returns (h [B, T, D] in a's dtype, h_last)."""
    _check(a, b, h0)
    acc = _acc_dtype(a.dtype)
    h = a.new_zeros(a.shape[0], a.shape[2], dtype=acc) if h0 is None else h0.to(acc)
    out = []
    for t in range(a.shape[1]):
        h = a[:, t].to(acc) * h + b[:, t].to(acc)
        out.append(h)
    return torch.stack(out, 1).to(a.dtype), h


def _doubling_scan(a, b, dim):
    """Inclusive scan of the steps (a, b) along ``dim``: afterwards (a[i], b[i]) maps the state
    before step 0 to the state after step i. log2(n) rounds, round k composing each step with the
    one k before it; out of place (torch.cat), so autograd differentiates it."""
    n = a.shape[dim]
    k = 1
    while k < n:
        a_head, a_tail, a_prev = a.narrow(dim, 0, k), a.narrow(dim, k, n - k), a.narrow(dim, 0, n - k)
        b_head, b_tail, b_prev = b.narrow(dim, 0, k), b.narrow(dim, k, n - k), b.narrow(dim, 0, n - k)
        # the earlier step (a_prev, b_prev) then the later one: (a_prev*a, a*b_prev + b)
        a, b = torch.cat([a_head, a_tail * a_prev], dim), torch.cat([b_head, a_tail * b_prev + b_tail], dim)
        k *= 2
    return a, b


def linear_scan_reference(a, b, h0=None, *, chunk: int = CHUNK):
    """Plain torch, chunked like the kernel: a sequential loop over the ``chunk`` steps of a chunk,
    each op covering every chunk of every row at once ([B, T/chunk, D]); a doubling scan over the
    chunks' totals for the carries; then ``h = A_cum * carry + B_cum``. Exact up to fp rounding for
    any a (no division, no logs). Why not a doubling scan over all of T: its log2(T) rounds each
    rewrite the whole [B, T, D] tensor, and on a CPU that memory traffic cost 10-20x this (B=4,
    T=2048, D=1024: 380 ms forward against 20 ms); a loop over all T steps pays ~T op dispatches
    (30x slower at D=16). This does ``chunk`` dispatches and about three passes over the data."""
    _check(a, b, h0)
    bsz, t, d = a.shape
    acc = _acc_dtype(a.dtype)
    a32, b32 = a.to(acc), b.to(acc)
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # identity steps (1, 0) leave the state unchanged
        a32 = torch.cat([a32, a32.new_ones(bsz, pad, d)], 1)
        b32 = torch.cat([b32, b32.new_zeros(bsz, pad, d)], 1)
    # in-chunk prefixes: (A_cum, B_cum)[i] maps the state entering a chunk to the state after step i;
    # unbind (not a[:, :, i]) so the backward is one stack, not a zero-filled full tensor per step
    a_cum, b_cum = [], []
    for a_i, b_i in zip(a32.view(bsz, n, chunk, d).unbind(2), b32.view(bsz, n, chunk, d).unbind(2)):
        if a_cum:
            a_i, b_i = a_cum[-1] * a_i, torch.addcmul(b_i, a_i, b_cum[-1])
        a_cum.append(a_i)
        b_cum.append(b_i)
    tot_a, tot_b = _doubling_scan(a_cum[-1], b_cum[-1], 1)  # state after every chunk, [B, n, D]
    if h0 is not None:
        tot_b = tot_a * h0.to(acc)[:, None] + tot_b
    start = a32.new_zeros(bsz, 1, d) if h0 is None else h0.to(acc)[:, None]
    carry = torch.cat([start, tot_b[:, :-1]], 1)  # state entering each chunk
    h = torch.stack(a_cum, 2) * carry[:, :, None] + torch.stack(b_cum, 2)
    return h.view(bsz, n * chunk, d)[:, :t].to(a.dtype), tot_b[:, -1]


def linear_scan(a, b, h0=None, *, use_triton: bool | None = None, chunk: int | None = None,
                block_d: int | None = None):
    """``h_t = a_t * h_{t-1} + b_t`` for a, b [B, T, D] (any float dtype) from h0 [B, D] (fp32;
    None = zeros). Returns (h [B, T, D] in a's dtype, h_last [B, D] in fp32 -- fp64 for fp64
    inputs), differentiable w.r.t. a, b and h0. ``use_triton=None``: the Triton kernels on CUDA
    (where triton is installed), else the reference; ``use_triton=True`` on the CPU runs them under
    Triton's interpreter (tests: TRITON_INTERPRET=1 before triton is imported). ``chunk`` and
    ``block_d`` (powers of two) override the tile shape (tests, tuning)."""
    if not dispatch.use_triton(use_triton, a, "linear_scan"):
        return linear_scan_reference(a, b, h0, chunk=chunk or CHUNK)
    return _linear_scan_triton(a, b, h0, chunk, block_d)


def recurrent_step(h, a, b, *, active=None):
    """One decode step in place: ``h = a * h + b`` on the fp32 state h [B, D] with a, b [B, D] or
    [B, 1, D]; rows where ``active`` (bool [B]) is False keep their state (finished or padding rows
    of a batch). In place and free of host syncs, so a captured CUDA graph reads and writes the same
    state memory on every replay. Returns h."""
    if a.dim() == 3:
        a, b = a.squeeze(1), b.squeeze(1)
    assert a.shape == b.shape == h.shape, f"state {h.shape} vs step {a.shape}, {b.shape}"
    if active is None:
        return h.mul_(a).add_(b)  # h is fp32: 16-bit a/b are promoted, the step runs in fp32
    return h.copy_(torch.where(active[:, None], h * a + b, h))


def _linear_scan_triton(a, b, h0, chunk=None, block_d=None):
    _check(a, b, h0)
    return _LinearScan.apply(a, b, h0, chunk or CHUNK, block_d)


def _block_d(rows: int, d: int) -> int:
    """The widest tile (<= MAX_BLOCK_D, never much wider than D) that still launches about
    TARGET_PROGRAMS programs: at batch 1 a 64-wide tile leaves most SMs idle."""
    block = min(MAX_BLOCK_D, max(MIN_BLOCK_D, triton.next_power_of_2(d)))
    while block > MIN_BLOCK_D and rows * triton.cdiv(d, block) < TARGET_PROGRAMS:
        block //= 2
    return block


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, chunk, block_d):
        bsz, t, d = a.shape
        assert chunk & (chunk - 1) == 0, f"chunk must be a power of two, got {chunk}"
        assert t * d < 2**31, "per-row offsets are int32"
        acc = _acc_dtype(a.dtype)
        block_d = block_d or _block_d(bsz, d)
        a, b = a.contiguous(), b.contiguous()
        h0_acc = None if h0 is None else h0.to(acc).contiguous()
        h = torch.empty_like(a)
        h_last = torch.empty(bsz, d, device=a.device, dtype=acc)
        _scan_fwd_kernel[(bsz, triton.cdiv(d, block_d))](
            a, b, a if h0_acc is None else h0_acc, h, h_last, t, d,
            HAS_H0=h0_acc is not None, ACC=_TL_ACC[acc], CHUNK=chunk, BLOCK_D=block_d)
        ctx.save_for_backward(a, h, h0_acc)
        ctx.meta = (chunk, block_d, b.dtype, None if h0 is None else h0.dtype)
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        a, h, h0 = ctx.saved_tensors
        chunk, block_d, b_dtype, h0_dtype = ctx.meta
        bsz, t, d = a.shape
        acc = _acc_dtype(a.dtype)
        # an unused output gets no gradient: zeros keep one kernel for every case
        grad_h = torch.zeros_like(h) if grad_h is None else grad_h.contiguous()
        grad_last = (torch.zeros(bsz, d, device=a.device, dtype=acc) if grad_last is None
                     else grad_last.to(acc).contiguous())
        grad_a = torch.empty_like(a)
        grad_b = torch.empty(a.shape, device=a.device, dtype=b_dtype)
        grad_h0 = None if h0 is None else torch.empty_like(h0)
        _scan_bwd_kernel[(bsz, triton.cdiv(d, block_d))](
            a, a if h0 is None else h0, h, grad_h, grad_last, grad_a, grad_b,
            a if grad_h0 is None else grad_h0, t, d,
            HAS_H0=h0 is not None, ACC=_TL_ACC[acc], CHUNK=chunk, BLOCK_D=block_d)
        if grad_h0 is not None:
            grad_h0 = grad_h0.to(h0_dtype)
        return grad_a, grad_b, grad_h0, None, None


if triton is not None:
    _TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

    @triton.jit
    def _combine(a1, b1, a2, b2):
        """(a1, b1) is the earlier step, (a2, b2) the later: h -> a2*(a1*h + b1) + b2. Not
        commutative, so the operand order matters (it does in both interpreter and compiler for a
        forward scan)."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _scan_fwd_kernel(A, B, H0, H, HLast, T, D, HAS_H0: tl.constexpr, ACC: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (row, channel block): chunks of CHUNK steps in order, each scanned in parallel."""
        row = tl.program_id(0).to(tl.int64)  # int64: row * T * D overflows int32 on long batches
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        offs_t = tl.arange(0, CHUNK)
        base = row * T * D
        if HAS_H0:
            carry = tl.load(H0 + row * D + offs_d, mask=d_mask, other=0.0).to(ACC)
        else:
            carry = tl.zeros([BLOCK_D], dtype=ACC)
        for t0 in range(0, T, CHUNK):
            t = t0 + offs_t
            mask = (t < T)[:, None] & d_mask[None, :]
            offs = base + t[:, None] * D + offs_d[None, :]
            # padding (past T or D) loads the identity step (1, 0): the carry passes through it
            a = tl.load(A + offs, mask=mask, other=1.0).to(ACC)
            b = tl.load(B + offs, mask=mask, other=0.0).to(ACC)
            a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
            h = a_cum * carry[None, :] + b_cum
            tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
            # the last row is the state after the chunk (identity padding keeps it exact)
            carry = tl.sum(tl.where(offs_t[:, None] == CHUNK - 1, h, 0.0), axis=0)
        tl.store(HLast + row * D + offs_d, carry, mask=d_mask)

    @triton.jit
    def _scan_bwd_kernel(A, H0, H, GH, GLast, GA, GB, GH0, T, D, HAS_H0: tl.constexpr,
                         ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (row, channel block): dh_t = g_t + a_{t+1} dh_{t+1}, chunks last to first, each tile
        loaded in reversed time order (row i is t = chunk end - 1 - i) and scanned forward."""
        row = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        offs_i = tl.arange(0, CHUNK)
        base = row * T * D
        # the state "after" the last step is h_last: its gradient enters through a coefficient of 1
        carry = tl.load(GLast + row * D + offs_d, mask=d_mask, other=0.0).to(ACC)
        if HAS_H0:
            h0 = tl.load(H0 + row * D + offs_d, mask=d_mask, other=0.0).to(ACC)
        num_chunks = tl.cdiv(T, CHUNK)
        for k in range(0, num_chunks):  # an ascending loop: chunk index num_chunks - 1 - k
            t = (num_chunks - 1 - k) * CHUNK + (CHUNK - 1) - offs_i
            in_t = t < T
            mask = in_t[:, None] & d_mask[None, :]
            offs = base + t[:, None] * D + offs_d[None, :]
            g = tl.load(GH + offs, mask=mask, other=0.0).to(ACC)
            # coefficient of dh_{t+1} in dh_t is a_{t+1}; 1 at t = T-1 (carry = grad of h_last)
            # and on the padding rows (t >= T), which then are identity steps
            coef = tl.load(A + offs + D, mask=(t + 1 < T)[:, None] & d_mask[None, :], other=1.0).to(ACC)
            c_cum, g_cum = tl.associative_scan((coef, g), 0, _combine)
            dh = c_cum * carry[None, :] + g_cum
            # h_{t-1}: the saved output, h0 (or 0) before the first step
            prev = tl.load(H + offs - D, mask=((t >= 1) & in_t)[:, None] & d_mask[None, :],
                           other=0.0).to(ACC)
            if HAS_H0:
                prev = tl.where((t == 0)[:, None], h0[None, :], prev)
            tl.store(GA + offs, (dh * prev).to(GA.dtype.element_ty), mask=mask)
            tl.store(GB + offs, dh.to(GB.dtype.element_ty), mask=mask)
            carry = tl.sum(tl.where(offs_i[:, None] == CHUNK - 1, dh, 0.0), axis=0)  # dh at chunk start
        if HAS_H0:  # carry is now dh_0, and h_0 = a_0 * h0 + b_0
            a0 = tl.load(A + base + offs_d, mask=d_mask, other=0.0).to(ACC)
            tl.store(GH0 + row * D + offs_d, a0 * carry, mask=d_mask)
