"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch

from pretrain.config import decay_start


def build_optimizer(model: torch.nn.Module, cfg, *, fused: bool) -> torch.optim.Optimizer:
    """cfg: OptimizerConfig. Norm gains and embeddings (1-D or `no_decay`) get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "tok." in name else decay).append(p)
    # no empty group: ZeRO drops them, which would leave the LR schedule one group too many (a
    # pipeline stage may hold only norms and a tied embedding)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
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
        start = decay_start(total, decay_fraction)
        if step < start or start == total:
            return 1.0
        progress = min(1.0, (step - start + 1) / (total - start))
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"unknown schedule {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, run_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _multiplier(run_cfg, run_cfg.training.steps))


def set_schedule_end(scheduler: torch.optim.lr_scheduler.LambdaLR, run_cfg, total: int) -> None:
    """Point the schedule's decay at `total` steps: the run's end, or a WSD decay branch's end (the
    warm-up and stable phases are the same, so only the decay moves). The current LR is re-read too."""
    fn = _multiplier(run_cfg, total)
    scheduler.lr_lambdas = [fn] * len(scheduler.optimizer.param_groups)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * fn(scheduler.last_epoch)  # last_epoch: the next optimizer step's index


def _multiplier(run_cfg, total: int):
    o, s = run_cfg.optimizer, run_cfg.schedule
    return lambda step: lr_multiplier(step, total=total, warmup=s.warmup_steps, kind=s.kind,
                                      min_ratio=o.min_lr / o.lr, decay_fraction=s.decay_fraction)
