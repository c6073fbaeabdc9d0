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
    noise: torch.Tensor | None = None  # [b, L, Cm + Ch] Gumbel noise for the router's sampling; None = argmax
    mlp: torch.Tensor | None = None  # [b, L] host long: chosen index into the MLP widths (0 = full)
    heads: torch.Tensor | None = None  # [b, L] host long: chosen index into the query-group counts
    mlp_gate: torch.Tensor | None = None  # [b, L] straight-through gates (value 1)
    heads_gate: torch.Tensor | None = None
    budget_loss: torch.Tensor | None = None  # [] the router's budget penalty of this micro-batch (router.py)


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


def block_prefixes(model_cfg) -> dict[int, str]:
    """block id -> its state-dict prefix. The network is one flat list (embedding, blocks and SUBLLM's
    brackets in structure order, norm, head; the router lives outside it), so a block's key is its index."""
    from pretrain.models.structure import parse_structure

    return {item.index: f"layers.{pos + 1}." for pos, item in enumerate(parse_structure(model_cfg.structure))
            if item.kind == "block"}


def unit_weights(model_cfg) -> list[tuple[str, str, int, int]]:
    """(weight name within a block, unit kind, dim the units lie along, rows/columns per unit) of every
    weight a Flextron unit spans: a neuron is a gate/up row and a down column; a query group is its
    K/V heads' rows and its query heads' Q rows and O columns (the same layout the model marks with
    `elastic_unit` for the TP dealing)."""
    hd = model_cfg.head_dim
    group = hd * (model_cfg.n_heads // model_cfg.kv_heads)
    return [("mlp.gate.weight", "mlp", 0, 1), ("mlp.up.weight", "mlp", 0, 1), ("mlp.down.weight", "mlp", 1, 1),
            ("attn.q.weight", "heads", 0, group), ("attn.k.weight", "heads", 0, hd),
            ("attn.v.weight", "heads", 0, hd), ("attn.o.weight", "heads", 1, group)]


def subnetwork(model_cfg, mlp_widths: list[int], kv_groups: list[int], state: dict[str, torch.Tensor]):
    """(plain ModelConfig, logical state) of the sub-network with these per-block widths, cut from an
    elastic model's LOGICAL state (importance order: the first units). The router's parameters are
    dropped; the rest is shared as is."""
    cfg = model_cfg.model_copy(update={"elastic": model_cfg.elastic.model_copy(update={"enabled": False}),
                                       "ffn_hidden_layers": list(mlp_widths), "kv_heads_layers": list(kv_groups)})
    cfg = type(model_cfg).model_validate(cfg.model_dump())  # re-validated as a plain model
    out = {k: v for k, v in state.items() if not k.startswith("router.")}
    widths = {"mlp": mlp_widths, "heads": kv_groups}
    for layer, prefix in block_prefixes(model_cfg).items():
        for name, kind, dim, size in unit_weights(model_cfg):
            # a copy: a saved view would carry the full tensor's storage along
            out[prefix + name] = state[prefix + name].narrow(dim, 0, widths[kind][layer] * size).clone()
    return cfg, out
