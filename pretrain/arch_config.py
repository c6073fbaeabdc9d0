"""Config sections of the architectures' own knobs: SUBLLM's subsampled levels, Flextron's elastic
widths and elastic continued training. Part of the run config (pretrain/config.py), which re-exports
them; kept apart so each architecture's knobs read in one place."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SubsampleConfig(Section):
    """SUBLLM's subsampled levels: `(` ... `)` in the structure string (docs/subllm.md)."""

    keep_ratio: float = 0.64  # fraction of a level's input tokens kept (k = ceil(n * ratio))
    keep_ratios: list[float] | None = None  # one per "(" in order of appearance; overrides keep_ratio
    # bypass y = x + c * (x_up - x): per-channel c (init 0.5) is kept within [scale_min(step), 1],
    # scale_min going linearly from scale_min_start to scale_min_end over scale_min_steps
    scale_min_start: float = 0.9
    scale_min_end: float = 0.2
    scale_min_steps: int = 20000
    # keep-ratio control (Zipformer's Balancer): positive-score fraction within keep ratio ± tolerance,
    # mean |score| within [score_abs_min, score_abs_max]
    balancer_strength: float = 0.3
    balancer_tolerance: float = 0.05
    score_abs_min: float = 1.0
    score_abs_max: float = 4.0

    def ratio(self, level: int) -> float:
        return self.keep_ratios[level] if self.keep_ratios is not None else self.keep_ratio

    @model_validator(mode="after")
    def _ratios(self) -> "SubsampleConfig":
        for r in [self.keep_ratio, *(self.keep_ratios or [])]:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"keep ratio {r} is outside (0, 1]")
        if not 0.0 <= self.scale_min_end <= 1.0 or not 0.0 <= self.scale_min_start <= 1.0:
            raise ValueError("scale_min_start and scale_min_end must be within [0, 1]")
        return self


class ElasticConfig(Section):
    """Flextron's nested elastic widths (docs/flextron.md). A sub-network of width k uses the FIRST k
    units of every elastic layer -- MLP neurons, attention query groups (a KV head with its query
    heads) -- in importance order (`python -m pretrain elastify` sorts a trained model)."""

    enabled: bool = False
    # widths offered to the router, largest first, as fractions of ffn_hidden / n_kv_heads; an MLP
    # width is rounded to a multiple of neuron_granularity (at TP=T, use T x 128 for GEMM-friendly slices)
    ffn_fractions: list[float] = [1.0, 0.75, 0.5, 0.25]
    head_fractions: list[float] = [1.0, 0.75, 0.5, 0.25]
    neuron_granularity: int = 128
    budgets: list[float] = [0.25, 0.5, 0.75]  # the targets the router learns (fractions of the full cost)
    # static: widths from the budget alone (one sub-network per budget); adaptive: per sequence, from the
    # hidden state after `router_after` blocks (0 = the embeddings) and the budget
    router: Literal["static", "adaptive"] = "static"
    router_after: int = 0
    router_hidden: int = 64
    # what a budget is a fraction of: parameters (CPU proxy) or measured latency (a table written by
    # `python -m pretrain elastic-profile` on the target GPU)
    cost: Literal["params", "latency"] = "params"
    latency_table: str | None = None

    def ffn_widths(self, ffn_hidden: int) -> list[int]:
        g = self.neuron_granularity
        return [ffn_hidden if f == 1.0 else max(g, round(f * ffn_hidden / g) * g) for f in self.ffn_fractions]

    def head_groups(self, kv_heads: int) -> list[int]:
        return [max(1, round(f * kv_heads)) for f in self.head_fractions]

    @model_validator(mode="after")
    def _choices(self) -> "ElasticConfig":
        for name in ("ffn_fractions", "head_fractions"):
            fr = getattr(self, name)
            if not fr or fr[0] != 1.0 or any(not 0.0 < f <= 1.0 for f in fr) or sorted(fr, reverse=True) != fr:
                raise ValueError(f"{name} must start at 1.0 and decrease within (0, 1], got {fr}")
        if not self.budgets or any(not 0.0 < b < 1.0 for b in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets must be distinct fractions within (0, 1), got {self.budgets}")
        if self.neuron_granularity < 1 or self.router_hidden < 1 or self.router_after < 0:
            raise ValueError("neuron_granularity and router_hidden must be >= 1, router_after >= 0")
        if self.cost == "latency" and not self.latency_table:
            raise ValueError("cost: latency needs latency_table (python -m pretrain elastic-profile writes one)")
        return self


class ElasticTrainingConfig(Section):
    """Elastic continued training (Flextron, docs/flextron.md): every micro-batch trains the full model
    or a sub-network the router picks for a sampled budget, distilled from the frozen starting model."""

    enabled: bool = False
    full_prob: float = 0.33  # probability a micro-batch trains the full model (keeps it from degrading)
    distill_weight: float = 1.0  # loss = CE + w * T^2 * KL(teacher || student); 0 = no teacher
    distill_temperature: float = 1.0
    budget_loss_weight: float = 1.0  # + w * max(0, |cost(choice) / (budget * full cost) - 1| - tolerance)
    budget_tolerance: float = 0.05
    gumbel_temperature: float = 1.0  # router sampling (straight-through Gumbel-softmax)
    eval_budgets: bool = True  # validation also measures every budget's sub-network (val_loss_budget_B)

    @model_validator(mode="after")
    def _ranges(self) -> "ElasticTrainingConfig":
        if not 0.0 <= self.full_prob <= 1.0:
            raise ValueError(f"full_prob must be within [0, 1], got {self.full_prob}")
        if self.distill_temperature <= 0 or self.gumbel_temperature <= 0:
            raise ValueError("distill_temperature and gumbel_temperature must be positive")
        if self.distill_weight < 0 or self.budget_loss_weight < 0 or self.budget_tolerance < 0:
            raise ValueError("distill_weight, budget_loss_weight and budget_tolerance must be >= 0")
        return self
