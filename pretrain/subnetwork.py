"""Serve or export one Flextron sub-network: the widths a router picks for a budget, cut out of the
elastic model's logical weights into a plain model with per-block widths (no router, no masks).

    python -m pretrain export --checkpoint DIR --budget 0.5 --out DIR     a standalone checkpoint
    python -m pretrain generate --checkpoint DIR --budget 0.5 ...         the static router's sub-network
    python -m pretrain generate --checkpoint DIR --budget auto ...        the adaptive router, per prompt

The sub-network is an ordinary model (model.ffn_hidden_layers / kv_heads_layers): it trains, generates
(KV caches, CUDA graphs, GRIFFIN inside its widths) and re-shards like any other checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain.errors import ConfigError


def widths(model, mlp_index: list[int], heads_index: list[int]) -> tuple[list[int], list[int]]:
    """Choice indexes -> (MLP widths, query groups) per block."""
    cost = model.router.cost
    return [cost.widths[i] for i in mlp_index], [cost.groups[i] for i in heads_index]


@torch.no_grad()
def prompt_choice(model, tokens: torch.Tensor, budget: float) -> tuple[list[int], list[int]]:
    """The adaptive router's choice for one prompt [1, n]: the layers up to the router, then its argmax."""
    p = model.payload(tokens, threshold=True)
    for layer in model.layers[:model.router_at + 1]:
        p = layer(p)
    lm, lh = model.router.logits(torch.tensor([float(budget)]), p.hidden)
    return lm[0].argmax(-1).tolist(), lh[0].argmax(-1).tolist()


def build(model, logical: dict[str, torch.Tensor], mlp_widths: list[int], kv_groups: list[int]):
    """The plain sub-network at this process's TP layout, its weights cut from `logical` (the elastic
    model's logical state)."""
    from parallel.elastic_layout import local_state_dict
    from parallel.tensor_parallel import tp_rank, tp_size
    from pretrain.models import build_network
    from pretrain.models.elastic import subnetwork

    cfg, state = subnetwork(model.cfg, mlp_widths, kv_groups, logical)
    net = build_network(cfg)  # checks that every width splits over the TP ranks
    net.load_state_dict(local_state_dict(state, net, tp_rank(), tp_size()), strict=True)
    return net


def check_elastic(cfg, path: Path, budget) -> None:
    if not cfg.model.elastic.enabled:
        raise ConfigError(f"{path}: --budget needs an elastic model (model.elastic.enabled); run "
                          "python -m pretrain elastify first")
    router = cfg.model.elastic.router
    if budget == "auto" and router != "adaptive":
        raise ConfigError(f"{path}: --budget auto needs an input-adaptive router (this model's is {router}); give "
                          f"a number, one of {cfg.model.elastic.budgets}")
    if budget != "auto" and router == "adaptive":
        raise ConfigError(f"{path}: this model's router is adaptive: its widths depend on the prompt, use --budget auto")


def export_subnetwork(checkpoint: str | Path, budget: float, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write the static router's sub-network for `budget` as a standalone weights-only checkpoint.
    Runs in one process (any saved TP size is re-joined); the export loads at any TP size."""
    from pretrain.config import config_from_dict
    from pretrain.models import build_network
    from parallel.distributed import init_distributed

    path = ckpt.find(checkpoint)
    meta = ckpt.read_meta(path)
    cfg = config_from_dict(meta["config"])
    check_elastic(cfg, path, budget)
    init_distributed(1)
    model = build_network(cfg.model)
    logical = ckpt.load_weights(path, model)
    mi, hi = model.router.static_choice(float(budget))
    mlp_widths, kv_groups = widths(model, mi, hi)
    net = build(model, logical, mlp_widths, kv_groups)
    predicted = model.router.cost.predict(mi, hi) / model.router.cost.full
    run = cfg.model_dump(mode="json")
    run["model"] = net.cfg.model_dump(mode="json")
    run["training"]["elastic"]["enabled"] = False
    run["checkpoint"]["init_from"] = None
    config_from_dict(run)  # the export is a valid plain run config
    summary = {"budget": float(budget), "mlp_widths": mlp_widths, "query_groups": kv_groups,
               "predicted_cost": predicted, "cost_unit": model.router.cost.unit,
               "params": sum(p.numel() for p in net.parameters()),
               "params_full": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("router."))}
    ckpt.save_weights(Path(out), net.state_dict(), {"config": run, "source": str(path), "flextron": summary},
                      files=[path / "tokenizer.json"], overwrite=overwrite)
    return summary
