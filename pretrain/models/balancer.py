"""Keep-ratio control for SUBLLM's token scores: an equivalent of Zipformer's Balancer.

Identity in the forward pass; in the backward pass it adds a small gradient term that
  - pushes all scores down when more than `target + tolerance` of them are positive, and up
    when fewer than `target - tolerance` are (so "keep iff score > 0" at inference keeps about
    the fraction that top-k keeps in training), and
  - pulls scores towards zero when their mean |s| exceeds `abs_max`, and away from zero when it
    is below `abs_min` (bounded, well-separated scores).
The term is the gradient of the auxiliary loss  strength · mean(push · s + shrink · |s|)  over the
level's scores: push = (positive fraction − target) outside the tolerance, else 0; shrink ∈
{−1, 0, +1} from mean |s|, applied only while the fraction is within tolerance; both decided
from the current batch. It is NOT scaled
by the incoming gradient (Zipformer's choice): once every score is negative, clamp(s, 0, 1) passes
no gradient at all, and a relative term would vanish with it, leaving the level dead for good.
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
        # gradient descent subtracts the gradient: > 0 lowers the scores, < 0 raises them.
        # Proportional to the error (a bang-bang push overshoots: the fraction swings 0 <-> 1).
        err = frac - target
        push = err * (err.abs() > tolerance).float()
        mean_abs = s.abs().mean()
        # magnitude only once the fraction is right: pushing scores away from zero while most of
        # them sit on the wrong side of it would fight the fraction control (and win)
        shrink = ((mean_abs > abs_max).float() - (mean_abs < abs_min).float()) * (push == 0).float()
        extra = (strength / s.numel()) * (push + shrink * torch.sign(s))
        return grad + extra.to(grad.dtype), None, None, None, None, None


def balance(scores: torch.Tensor, *, target: float, tolerance: float, abs_min: float, abs_max: float,
            strength: float) -> torch.Tensor:
    """Identity on `scores` whose backward steers the positive fraction and the magnitude."""
    if not scores.requires_grad or strength == 0:
        return scores
    return _Balance.apply(scores, target, tolerance, abs_min, abs_max, strength)
