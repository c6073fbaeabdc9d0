"""Flextron's nested elastic widths: the choice a micro-batch carries, and how a block applies it.

A router (router.py) picks, per block, one MLP width and one number of attention query groups out
of the model's offered lists (`model.elastic`, largest first). The choice travels on the payload as
an `ElasticState`, decided once per micro-batch, so every TP rank (and later every pipeline stage)
applies the same widths. A block runs each branch on the FIRST units of its weights (sliced views:
real FLOP savings, nothing masked), rows with different choices (the adaptive router) in groups, and
multiplies the branch output by the straight-through gate: 1 in the forward pass, the router's
probability of that choice in the backward pass, which is how the LM loss reaches the router.

    h = x + g_attn · Attn_{k_attn}(norm(x));   y = h + g_mlp · MLP_{k_mlp}(norm(h))

Export (`subnetwork`) cuts the chosen widths out of the logical weights into a plain model with
per-block widths (model.ffn_hidden_layers / kv_heads_layers) that trains and generates like any other.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class ElasticState(NamedTuple):
    budget: torch.Tensor  # [b] fraction of the full model's cost each row targets (1.0 = the full model)
    noise: torch.Tensor | None = None  # [b, L, 2, C] Gumbel noise for the router's sampling; None = argmax
    mlp: torch.Tensor | None = None  # [b, L] host long: chosen index into the MLP widths (0 = full)
    heads: torch.Tensor | None = None  # [b, L] host long: chosen index into the query-group counts
    mlp_gate: torch.Tensor | None = None  # [b, L] straight-through gates (value 1)
    heads_gate: torch.Tensor | None = None


def local_widths(widths: list[int], tp_size: int) -> list[int]:
    """Logical widths -> this rank's share (config.check_widths guarantees they divide)."""
    return [w // tp_size for w in widths]


def branch(fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], choice: torch.Tensor | None,
           gate: torch.Tensor | None, widths: list[int]) -> torch.Tensor:
    """fn(*args, width) for each row's chosen width (index into `widths`, local units; index 0 = all
    units: width None), times the row's gate. Rows sharing a choice run together; `args` are split by
    batch row (tensors whose first dim is the batch)."""
    if choice is None:
        return fn(*args, None)
    values = choice.unique().tolist()
    if len(values) == 1:
        out = fn(*args, widths[values[0]] if values[0] else None)
    else:
        out = None
        for c in values:
            rows = (choice == c).nonzero().flatten().to(args[0].device)
            part = fn(*(a.index_select(0, rows) for a in args), widths[c] if c else None)
            out = (part.new_zeros(args[0].shape[:1] + part.shape[1:]) if out is None else out).index_copy(0, rows, part)
    return out * gate.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)


def slice_choice(state: ElasticState | None, layer: int):
    """(mlp choice [b], mlp gate [b], heads choice [b], heads gate [b]) of block `layer`, or Nones."""
    if state is None or state.mlp is None:
        return None, None, None, None
    return state.mlp[:, layer], state.mlp_gate[:, layer], state.heads[:, layer], state.heads_gate[:, layer]


def subnetwork(model, mlp_widths: list[int], kv_groups: list[int], state: dict[str, torch.Tensor] | None = None):
    """(plain ModelConfig, logical state) of the sub-network with these per-block widths, cut from the
    elastic network's LOGICAL state (importance order: the first units): `state`, or the model's own
    weights when it runs at TP=1. The router's parameters are dropped; the rest is copied as is."""
    model_cfg = model.cfg
    cfg = model_cfg.model_copy(update={"elastic": model_cfg.elastic.model_copy(update={"enabled": False}),
                                       "ffn_hidden_layers": list(mlp_widths), "kv_heads_layers": list(kv_groups)})
    cfg = type(model_cfg).model_validate(cfg.model_dump())  # re-validated as a plain model
    per_group_rows = model_cfg.head_dim * (model_cfg.n_heads // model_cfg.kv_heads)
    block_of = {name: m.layer_id for name, m in model.named_modules() if getattr(m, "layer_id", None) is not None}
    out = {}
    for name, t in (model.state_dict() if state is None else state).items():
        prefix, _, rest = name.rpartition(".")[0].rpartition(".")[0].rpartition(".")
        block = block_of.get(prefix)
        if "router" in name.split("."):
            continue
        if block is not None and name.endswith(".weight") and rest in ("mlp", "attn"):
            f, g = mlp_widths[block], kv_groups[block]
            which = name.rsplit(".", 2)[1]
            t = {"gate": lambda: t[:f], "up": lambda: t[:f], "down": lambda: t[:, :f],
                 "q": lambda: t[:g * per_group_rows], "k": lambda: t[:g * model_cfg.head_dim],
                 "v": lambda: t[:g * model_cfg.head_dim], "o": lambda: t[:, :g * per_group_rows]}[which]()
        out[name] = t.clone() if isinstance(t, torch.Tensor) else t  # megatron's _extra_state: None
    return cfg, out
