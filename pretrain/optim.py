"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, cfg, *, fused: bool) -> torch.optim.Optimizer:
    """cfg: OptimizerConfig. Norm gains and embeddings (1-D or `no_decay`) get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "tok." in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_multiplier(step: int, *, total: int, warmup: int, kind: str, min_ratio: float,
                  decay_fraction: float = 0.2) -> float:
    """Learning rate at `step` (0-based optimizer step) as a fraction of the peak.

    cosine: linear warmup, cosine decay to min_ratio at `total`.
    wsd:    linear warmup, constant, then a linear decay to min_ratio over the last
            `decay_fraction` of the steps (warmup-stable-decay; a run can be continued from the
            stable phase and decayed at several points).
    constant: warmup then constant.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_steps = int(round(decay_fraction * total))
        decay_start = total - decay_steps
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"unknown schedule {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, run_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    o, s = run_cfg.optimizer, run_cfg.schedule
    fn = lambda step: lr_multiplier(step, total=run_cfg.training.steps, warmup=s.warmup_steps, kind=s.kind,
                                    min_ratio=o.min_lr / o.lr, decay_fraction=s.decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
