"""Keep-ratio control for SUBLLM's token scores: an equivalent of Zipformer's Balancer.

Identity in the forward pass; in the backward pass it adds a small gradient term that
  - pushes all scores down when more than `target + tolerance` of them are positive, and up
    when fewer than `target - tolerance` are (so "keep iff score > 0" at inference keeps about
    the fraction that top-k keeps in training), and
  - pulls scores towards zero when their mean |s| exceeds `abs_max`, and away from zero when it
    is below `abs_min` (bounded, well-separated scores).
The term is scaled by the mean |incoming gradient|, so it stays proportionate to the signal
the scorer gets from the upsample blend whatever the loss scale (Zipformer does the same).
"""
from __future__ import annotations

import torch


class _Balance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, target, tolerance, abs_min, abs_max, strength):
        ctx.save_for_backward(scores)
        ctx.cfg = (target, tolerance, abs_min, abs_max, strength)
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        (scores,) = ctx.saved_tensors
        target, tolerance, abs_min, abs_max, strength = ctx.cfg
        s = scores.detach().float()
        frac = (s > 0).float().mean()
        # gradient descent subtracts the gradient: +1 lowers the scores, -1 raises them
        push = (frac > target + tolerance).float() - (frac < target - tolerance).float()
        mean_abs = s.abs().mean()
        shrink = (mean_abs > abs_max).float() - (mean_abs < abs_min).float()
        extra = strength * grad.abs().mean() * (push + shrink * torch.sign(s))
        return grad + extra.to(grad.dtype), None, None, None, None, None


def balance(scores: torch.Tensor, *, target: float, tolerance: float, abs_min: float, abs_max: float,
            strength: float) -> torch.Tensor:
    """Identity on `scores` whose backward steers the positive fraction and the magnitude."""
    if not scores.requires_grad or strength == 0:
        return scores
    return _Balance.apply(scores, target, tolerance, abs_min, abs_max, strength)
