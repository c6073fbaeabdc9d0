"""Elastic continued training (Flextron): one budget per micro-batch, the router's choice, distillation.

Per micro-batch, seeded by (seed, step, micro-batch, data-parallel rank) and never by the TP rank, so
every TP rank of a replica trains the same sub-network while replicas sample independently:
    budget B = 1.0 (the full model) with probability full_prob, else uniform over model.elastic.budgets
    the router samples per-block widths for B (straight-through Gumbel-softmax, router.py)
    loss = CE(student) + w_kd · T² · KL(teacher ‖ student) + w_budget · L_budget
The teacher is the frozen starting model (checkpoint.init_from) at full width; on a resume it is
loaded from there again, never from the partly trained weights.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F


class ElasticTraining:
    def __init__(self, cfg, model: torch.nn.Module, *, dp_rank: int, teacher: torch.nn.Module | None):
        """cfg: RunConfig; model: the elastic network; teacher: the starting model (frozen here) or None."""
        self.t = cfg.training.elastic
        self.budgets = list(cfg.model.elastic.budgets)
        self.seed, self.dp_rank = cfg.training.seed, dp_rank
        model.router.tolerance, model.router.tau = self.t.budget_tolerance, self.t.gumbel_temperature
        self.cost = model.router.cost
        self.ce_kind = cfg.model.cross_entropy
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.stats: dict[str, list[torch.Tensor]] = {}

    def sample(self, step: int, micro: int, batch: int, model) -> tuple[float, object]:
        """(budget, ElasticState) of one micro-batch."""
        seed = hash((self.seed, step, micro, self.dp_rank)) & 0x7FFF_FFFF  # ints hash deterministically
        rng = random.Random(seed)
        budget = 1.0 if rng.random() < self.t.full_prob else rng.choice(self.budgets)
        return budget, model.elastic_state(batch, budget, torch.Generator().manual_seed(seed))

    def loss(self, engine, inputs: torch.Tensor, targets: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        net = engine.module
        budget, state = self.sample(step, micro, inputs.shape[0], net)
        logits = engine(inputs, elastic=state)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(inputs)
        sub = budget < 1.0
        return self.objective(logits, targets, budget, teacher, net.router.budget_loss if sub else None,
                              net.router.cost_ratio if sub else None)

    def pipelined(self, logits: torch.Tensor, teacher: torch.Tensor | None, state, targets: torch.Tensor,
                  budget: float) -> torch.Tensor:
        """The objective on a pipeline's last stage (pretrain/pipeline.py: loss_fn): the router ran on
        the first stage, and its choice, gates and budget loss came along with the micro-batch; the
        cost ratio is recomputed from the choice."""
        ratio = None
        if budget < 1.0:
            cost = self.cost
            mlp = F.one_hot(state.mlp, cost.mlp.shape[1]).float()
            heads = F.one_hot(state.heads, cost.attn.shape[1]).float()
            ratio = (cost.of(mlp, heads) / (budget * cost.full)).mean()
        return self.objective(logits, targets, budget, teacher, state.budget_loss, ratio)

    def objective(self, logits: torch.Tensor, targets: torch.Tensor, budget: float, teacher: torch.Tensor | None,
                  budget_loss: torch.Tensor | None, cost_ratio: torch.Tensor | None) -> torch.Tensor:
        """CE + w_kd · T² · KL(teacher ‖ student) + w_budget · L_budget of one micro-batch's vocab-sharded
        logits (the same whether the network ran in one piece or as pipeline stages)."""
        from parallel.tensor_parallel import cross_entropy, vocab_parallel_kl

        ce = cross_entropy(logits, targets, self.ce_kind).mean()
        loss = ce
        self._note(f"ce_budget_{budget:g}", ce)
        if teacher is not None:
            temp = self.t.distill_temperature
            kl = vocab_parallel_kl(logits, teacher, temp).mean()
            loss = loss + self.t.distill_weight * temp ** 2 * kl
            self._note("kl", kl)
        if budget_loss is not None:  # (a pipeline adds a full micro-batch's zero: its gradient is sent back)
            loss = loss + self.t.budget_loss_weight * budget_loss.reshape(())
        if budget < 1.0:
            self._note("budget_loss", budget_loss.reshape(()))
            self._note(f"cost_ratio_{budget:g}", cost_ratio)
        self._note("full_fraction", torch.tensor(float(budget >= 1.0), device=ce.device))
        return loss

    def _note(self, key: str, value: torch.Tensor) -> None:
        self.stats.setdefault(key, []).append(value.detach())

    def step_metrics(self) -> dict[str, float]:
        """Means over this step's micro-batches on this rank (one host transfer), then reset."""
        if not self.stats:
            return {}
        keys = list(self.stats)
        values = torch.stack([torch.stack(self.stats[k]).float().mean() for k in keys]).tolist()
        self.stats = {}
        return {f"elastic/{k}": v for k, v in zip(keys, values)}

    @staticmethod
    def choices(model) -> dict[str, dict]:
        """The widths a static router picks for every budget (nothing for an adaptive one)."""
        router = model.router
        out = {}
        if router.adapt is not None:  # an adaptive router names no single sub-network
            return out
        for b in router.budgets:
            mi, hi = router.static_choice(b)
            out[f"{b:g}"] = {"mlp_widths": [router.cost.widths[i] for i in mi],
                             "query_groups": [router.cost.groups[i] for i in hi],
                             "cost_ratio": router.cost.predict(mi, hi) / router.cost.full}
        return out
