"""Flextron routers: from a budget (and, adaptive, the input) to per-block widths, and the cost model.

    static:    logits[l] = T[budget, l]                                  one sub-network per budget
    adaptive:  logits[r, l] = T[budget, l] + MLP(mean_t h[r, t])         per sequence r, from the hidden
                                                                         state after `router_after` blocks
Each block gets two choices (an MLP width, a number of query groups) out of the offered lists. T is
a learnable table initialised to prefer, for budget B, widths near the fraction B (so an untrained
router already names a sensible sub-network); the adaptive MLP starts at zero (= the static router).

Training samples with straight-through Gumbel-softmax (noise carried by the micro-batch, so every TP
rank samples the same): the forward uses the hard choice, gradients flow through the soft
probabilities -- into the branch gates (LM loss, elastic.py) and into the budget loss

    cost(choice) = Σ_l cost_mlp[l, k_l] + cost_attn[l, g_l] + fixed
    L_budget     = max(0, |cost(choice) / (B · cost(full)) − 1| − tolerance)

Cost is parameters (MLP 3·d·k, attention g·(2·r·hd·d + 2·hd·d); embeddings and head are outside the
elastic part and not counted) or a per-layer latency table measured on the GPU (elastic-profile).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.errors import ConfigError
from pretrain.models.elastic import ElasticState

PRIOR_SHARPNESS = 5.0  # initial logit penalty per unit of |width fraction − budget|


class CostModel:
    """Per-block costs of every offered width: mlp [L, Cm], attn [L, Ch], plus a fixed part."""

    def __init__(self, cfg):
        e = cfg.elastic
        self.widths, self.groups = e.ffn_widths(cfg.ffn_hidden), e.head_groups(cfg.kv_heads)
        L = cfg.n_blocks
        if e.cost == "params":
            d, hd, per = cfg.d_model, cfg.head_dim, cfg.n_heads // cfg.kv_heads
            self.mlp = torch.tensor([[3.0 * d * w for w in self.widths]] * L)
            self.attn = torch.tensor([[g * (2.0 * per * hd * d + 2.0 * hd * d) for g in self.groups]] * L)
            self.fixed, self.unit = 0.0, "params"
        else:
            self.mlp, self.attn, self.fixed = self._table(Path(e.latency_table), L)
            self.unit = "ms"
        self.full = float(self.mlp[:, 0].sum() + self.attn[:, 0].sum() + self.fixed)

    def _table(self, path: Path, L: int):
        try:
            t = json.loads(path.read_text())
            mlp, attn, fixed = torch.tensor(t["mlp_ms"]), torch.tensor(t["attn_ms"]), float(t["fixed_ms"])
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"model.elastic.latency_table {path}: cannot read a latency table ({err}); write one "
                              "with python -m pretrain elastic-profile") from None
        if t.get("mlp_widths") != self.widths or t.get("head_groups") != self.groups or mlp.shape[0] != L:
            raise ConfigError(f"model.elastic.latency_table {path} was measured for widths {t.get('mlp_widths')} / "
                              f"groups {t.get('head_groups')} / {mlp.shape[0]} blocks, the model offers {self.widths} / "
                              f"{self.groups} / {L}")
        return mlp, attn, fixed

    def of(self, mlp_onehot: torch.Tensor, attn_onehot: torch.Tensor) -> torch.Tensor:
        """Cost of each row's choice [b] from (straight-through) one-hots [b, L, Cm] / [b, L, Ch]."""
        mlp, attn = self.mlp.to(mlp_onehot), self.attn.to(attn_onehot)
        return (mlp_onehot * mlp).sum((1, 2)) + (attn_onehot * attn).sum((1, 2)) + self.fixed

    def predict(self, mlp_index: list[int], attn_index: list[int]) -> float:
        """Cost of one concrete sub-network (per-block choice indexes)."""
        return float(sum(self.mlp[l, c] for l, c in enumerate(mlp_index))
                     + sum(self.attn[l, c] for l, c in enumerate(attn_index)) + self.fixed)


class Router(nn.Module):
    """A layer of the flat list: reads the payload's budget, writes the per-block choice (ElasticState)."""

    def __init__(self, cfg):
        super().__init__()
        e = cfg.elastic
        self.budgets, self.kind = list(e.budgets), e.router
        self.n_blocks = cfg.n_blocks
        self.cost = CostModel(cfg)
        self.cm, self.ch = len(self.cost.widths), len(self.cost.groups)
        b = torch.tensor(self.budgets)[:, None, None]
        prior = lambda fr: (-PRIOR_SHARPNESS * (torch.tensor(fr)[None, None] - b).abs()).expand(  # noqa: E731
            -1, cfg.n_blocks, -1).clone()
        # replicated on every TP rank (plain parameters): their inputs are replicated too
        self.mlp_logits = nn.Parameter(prior(e.ffn_fractions))  # [budgets, L, Cm]
        self.heads_logits = nn.Parameter(prior(e.head_fractions))  # [budgets, L, Ch]
        self.adapt = None
        if e.router == "adaptive":
            out = nn.Linear(e.router_hidden, cfg.n_blocks * (self.cm + self.ch))
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.adapt = nn.Sequential(nn.Linear(cfg.d_model, e.router_hidden), nn.GELU(), out)
        self.tolerance = 0.05  # the trainer sets training.elastic's values
        self.tau = 1.0
        self.budget_loss: torch.Tensor | None = None  # of the last forward (training adds it to the loss)
        self.cost_ratio: torch.Tensor | None = None  # mean realized cost / target of the last forward

    def budget_index(self, budget: torch.Tensor) -> torch.Tensor:
        """[b] budgets -> indexes into self.budgets (full rows: 0, unused); an unknown budget is an error."""
        idx = []
        for v in budget.tolist():
            match = [i for i, b in enumerate(self.budgets) if abs(b - v) < 1e-6]
            if v < 1.0 and not match:
                raise ConfigError(f"budget {v} is not one the router was trained for ({self.budgets}, or 1.0)")
            idx.append(match[0] if match else 0)
        return torch.tensor(idx)

    def logits(self, budget: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """([b, L, Cm], [b, L, Ch]) router logits for rows with these budgets (and hidden states [b, s, d])."""
        idx = self.budget_index(budget).to(self.mlp_logits.device)
        lm, lh = self.mlp_logits[idx], self.heads_logits[idx]
        if self.adapt is not None:
            extra = self.adapt(hidden.float().mean(dim=1)).view(-1, self.n_blocks, self.cm + self.ch)
            lm, lh = lm + extra[..., :self.cm], lh + extra[..., self.cm:]
        return lm, lh

    def forward(self, p):
        st: ElasticState | None = p.elastic
        if st is None:
            return p
        full = st.budget >= 1.0  # host [b]
        if bool(full.all()):
            return p
        lm, lh = self.logits(st.budget, p.hidden)
        noise = st.noise.to(lm.device) if st.noise is not None else None
        full_dev = full.to(lm.device)
        (mi, m_st, m_gate), (hi, h_st, h_gate) = (
            _choose(lm, None if noise is None else noise[..., :self.cm], self.tau, full_dev),
            _choose(lh, None if noise is None else noise[..., self.cm:], self.tau, full_dev))
        ratio = self.cost.of(m_st, h_st) / (st.budget.to(lm.device) * self.cost.full)
        sub = (~full_dev).float()  # means over the sub-network rows, without a data-dependent shape (no sync)
        self.cost_ratio = ((ratio * sub).sum() / sub.sum()).detach()
        self.budget_loss = (F.relu((ratio - 1).abs() - self.tolerance) * sub).sum() / sub.sum()
        return p._replace(elastic=st._replace(mlp=mi.cpu(), heads=hi.cpu(), mlp_gate=m_gate, heads_gate=h_gate,
                                              budget_loss=self.budget_loss))

    @torch.no_grad()
    def static_choice(self, budget: float) -> tuple[list[int], list[int]]:
        """Per-block (MLP width index, query-group index) the static router picks for a budget."""
        if self.adapt is not None:
            raise ConfigError("this model's router is adaptive: its widths depend on the input (use --budget auto)")
        lm, lh = self.logits(torch.tensor([budget]), None)
        return lm[0].argmax(-1).tolist(), lh[0].argmax(-1).tolist()


def _choose(logits: torch.Tensor, noise: torch.Tensor | None, tau: float, full: torch.Tensor):
    """(index [b, L] host-ready, straight-through one-hot [b, L, C], gate [b, L]); rows with `full`
    take choice 0 (the full width) with a constant gate of 1."""
    soft = F.softmax((logits.float() + noise) / tau if noise is not None else logits.float(), dim=-1)
    index = soft.argmax(-1)  # with noise: a Gumbel-max sample of softmax(logits)
    index = torch.where(full[:, None], torch.zeros_like(index), index)
    hard = F.one_hot(index, logits.shape[-1]).to(soft.dtype)
    st = torch.where(full[:, None, None], hard, hard - soft.detach() + soft)
    return index, st, st.gather(-1, index[..., None]).squeeze(-1)


def gumbel_noise(batch: int, cfg, generator: torch.Generator) -> torch.Tensor:
    """[b, L, Cm + Ch] Gumbel(0, 1) noise from a generator seeded without the TP rank."""
    e = cfg.elastic
    u = torch.rand(batch, cfg.n_blocks, len(e.ffn_fractions) + len(e.head_fractions), generator=generator)
    return -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
