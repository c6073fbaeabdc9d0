"""SUBLLM's subsampled levels: `(` drops low-importance tokens, `)` brings the length back.

Subsample (`(`), on the residual stream h [b, n, d] entering the level:
    s = h · w_score                      learned importance, one scalar per token
    training:  keep the top-k, k = ceil(n · ratio), kept indexes re-sorted ascending
    inference: keep token t iff s_t > 0  (decided per token, so it is causal)
    w = clamp(s_kept, 0, 1)
Kept tokens keep their ORIGINAL positions (RoPE), so causal attention on the shorter sequence
is causal in the original order. The pre-subsample state is saved on the payload's level stack.

Upsample + bypass (`)`), with the saved x (length n) and the level's output x_sub (length k):
    x_up = x;  x_up[kept] = w · x_sub + (1 − w) · x[kept]      (the scorer's gradient path)
    y    = x + c ⊙ (x_up − x),   c per channel, init 0.5, kept within [scale_min(step), 1]

Inference (threshold) batches are ragged: rows keep different numbers of tokens. A prefill chunk
runs one row at a time; rows that keep nothing leave the level (their `rows` too, so the inner KV
caches never see them), and a level that keeps nothing at all passes an empty batch, which blocks
skip. A decode step (one token per row, the payload's `active` set) keeps every row in the batch
and masks instead: only active rows' tokens enter the inner caches, and `)` discards the rest. Either
way `)` returns exactly x for every dropped token and row, as the full forward does.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from pretrain.models.balancer import balance


class Level(NamedTuple):
    """What a `(` saves for its `)`: the state before subsampling and which tokens were kept."""

    hidden: torch.Tensor  # [b, n, d] residual stream entering the level
    positions: torch.Tensor  # [b, n]
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [b, 1, n, hd]
    kept: torch.Tensor  # [r, k] int64 indexes into n, ascending
    weight: torch.Tensor  # [r, k, 1] clamp(score, 0, 1)
    live: torch.Tensor | None = None  # [r] the batch rows that kept a token (threshold); None = all b
    rows: torch.Tensor | None = None  # the payload's cache rows outside the level, restored by `)`
    # batched decode (one token per row, every row stays): which rows keep their token here, and the
    # payload's `active` outside the level (restored by `)`); kept is then unused (empty)
    keep: torch.Tensor | None = None
    active: torch.Tensor | None = None


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[..., idx, ...] along `dim` with a per-row index [b, k]."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    index = idx.view(shape).expand(*[s if i != dim else idx.shape[1] for i, s in enumerate(x.shape)])
    return x.gather(dim, index)


class Subsample(nn.Module):
    def __init__(self, cfg, *, level: int):
        super().__init__()
        self.level = level
        self.ratio = cfg.subsample.ratio(level)
        self.sub = cfg.subsample
        # replicated on every tensor-parallel rank (a plain parameter): the input is replicated too
        self.score = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=cfg.init_std)
        # the balancer's gradient per call, times 1 / micro-batches per optimizer step (set_grad_accum):
        # summed over a step's micro-batches and averaged over DP like the loss, it is the global
        # batch's mean, whatever the accumulation or DP size
        self.aux_scale = 1.0
        self.register_buffer("positive_fraction", torch.zeros(()), persistent=False)  # for logging
        # threshold (inference) calls add (tokens entering the level, tokens kept) here, in place on
        # the device: no host sync per call, and a CUDA-graph replay updates the same memory
        self.register_buffer("counts", torch.zeros(2, dtype=torch.long), persistent=False)

    @property
    def seen(self) -> int:
        return int(self.counts[0])

    @property
    def kept(self) -> int:
        return int(self.counts[1])

    def reset_counts(self) -> None:
        self.counts.zero_()

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(h).squeeze(-1).float()  # [b, n]

    def forward(self, p):
        h = p.hidden
        s = self.scores(h)
        if p.threshold:
            return self._threshold(p, s)
        self.positive_fraction = (s.detach() > 0).float().mean()
        s = balance(s, target=self.ratio, tolerance=self.sub.balancer_tolerance, abs_min=self.sub.score_abs_min,
                    abs_max=self.sub.score_abs_max, strength=self.sub.balancer_strength * self.aux_scale)
        k = max(1, math.ceil(h.shape[1] * self.ratio))
        kept = s.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        weight = s.gather(1, kept).clamp(0.0, 1.0).unsqueeze(-1).to(h.dtype)
        cos, sin = p.rope
        level = Level(h, p.positions, p.rope, kept, weight, rows=p.rows)
        return p._replace(hidden=_gather_tokens(h, kept), positions=p.positions.gather(1, kept),
                          rope=(_gather_tokens(cos, kept, 2), _gather_tokens(sin, kept, 2)),
                          levels=(*p.levels, level))

    def _threshold(self, p, s: torch.Tensor):
        """Inference rule: keep token t iff s_t > 0; rows that keep nothing leave the level."""
        h, (cos, sin) = p.hidden, p.rope
        b, n = s.shape
        if p.active is not None:
            return self._decode_batch(p, s)
        live, kept = select_positive(s)
        self.counts[0] += b * n
        self.counts[1] += kept.numel()
        rows = p.rows
        if live is not None:  # some rows kept nothing: the level runs on the others only
            rows = (torch.arange(b) if rows is None else rows)[live.cpu()]
            h, positions, s = h[live], p.positions[live], s[live]
            cos, sin = cos[live], sin[live]
        else:
            positions = p.positions
        weight = s.gather(1, kept).clamp(0.0, 1.0).unsqueeze(-1).to(h.dtype)
        level = Level(p.hidden, p.positions, p.rope, kept, weight, live=live, rows=p.rows)
        return p._replace(hidden=_gather_tokens(h, kept), positions=positions.gather(1, kept),
                          rope=(_gather_tokens(cos, kept, 2), _gather_tokens(sin, kept, 2)), rows=rows,
                          levels=(*p.levels, level))

    def _decode_batch(self, p, s: torch.Tensor):
        """A decode step (one token per row, `active` set): every row stays in the batch (no host
        sync, no row gather); `active` tells the caches which rows keep their token, and `)` discards
        the others' outputs. Skipping a level a row dropped is the caller's choice (DecodeStep at
        batch 1): the level's caches then stay untouched, which is what this path leaves them as."""
        entering = p.active
        active = entering & (s[:, 0] > 0)
        self.counts.add_(torch.stack((entering.sum(), active.sum())))
        weight = s.clamp(0.0, 1.0).unsqueeze(-1).to(p.hidden.dtype)  # [b, 1, 1]
        level = Level(p.hidden, p.positions, p.rope, s.new_empty(0, dtype=torch.long), weight, rows=p.rows,
                      keep=active, active=p.active)
        return p._replace(active=active, levels=(*p.levels, level))


def select_positive(s: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Inference rule on scores [b, n]: (live, kept). live: the rows with a positive score ([r], on
    s's device; None when that is every row); kept [r, k]: their positive indexes, ascending. Every
    live row must keep the same count k (one row, or one token per row); else run rows one at a time."""
    keep = s > 0
    counts = keep.sum(dim=1).tolist()  # the one host sync of a level: what follows is sized by it
    live = [i for i, c in enumerate(counts) if c > 0]
    k = counts[live[0]] if live else 0
    if any(counts[i] != k for i in live):
        raise ValueError(f"threshold subsampling: rows keep different token counts {counts}; a batch of "
                         "multi-token rows runs one row at a time (Network.forward does this)")
    if len(live) == len(counts):
        return None, keep.nonzero()[:, 1].view(len(live), k)
    live_t = torch.tensor(live, dtype=torch.long, device=s.device)
    return live_t, keep[live_t].nonzero()[:, 1].view(len(live), k)


class _LimitToRange(torch.autograd.Function):
    """clamp(c, lo, hi) in the forward pass; in the backward pass the gradient still reaches c where
    it would move c back into range (a plain clamp would freeze c below the floor forever)."""

    @staticmethod
    def forward(ctx, c, lo, hi):
        ctx.save_for_backward(c)
        ctx.lo, ctx.hi = lo, hi
        return c.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        blocked = ((c < ctx.lo) & (grad > 0)) | ((c > ctx.hi) & (grad < 0))  # would push further out
        return grad.masked_fill(blocked, 0.0), None, None


class Upsample(nn.Module):
    def __init__(self, cfg, *, level: int):
        super().__init__()
        self.level = level
        self.sub = cfg.subsample
        self.bypass = nn.Parameter(torch.full((cfg.d_model,), 0.5))  # c, replicated on TP ranks
        self.scale_min = self.sub.scale_min_start

    def set_step(self, step: int) -> None:
        """The trainer's step drives the bypass floor: scale_min_start -> scale_min_end linearly."""
        t = min(1.0, step / max(1, self.sub.scale_min_steps))
        self.scale_min = self.sub.scale_min_start + t * (self.sub.scale_min_end - self.sub.scale_min_start)

    def forward(self, p):
        lvl: Level = p.levels[-1]
        x = lvl.hidden
        x_up = x  # a level that kept no token returns x exactly
        if lvl.keep is not None:  # batched decode: rows that dropped their token return x
            blended = lvl.weight * p.hidden + (1 - lvl.weight) * x
            x_up = torch.where(lvl.keep[:, None, None], blended, x)
        elif lvl.kept.numel():
            xs = x if lvl.live is None else x[lvl.live]
            blended = lvl.weight * p.hidden + (1 - lvl.weight) * _gather_tokens(xs, lvl.kept)
            index = lvl.kept.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x_up = xs.scatter(1, index, blended)
            if lvl.live is not None:  # rows that kept nothing keep x
                x_up = x.index_put((lvl.live,), x_up)
        c = _LimitToRange.apply(self.bypass, self.scale_min, 1.0).to(x.dtype)
        y = x + c * (x_up - x)
        return p._replace(hidden=y, positions=lvl.positions, rope=lvl.rope, rows=lvl.rows, active=lvl.active,
                          levels=p.levels[:-1])
