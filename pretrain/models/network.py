"""The network as a flat sequence of layers passing one Payload along.

    tokens -> Embedding -> block ... block -> FinalNorm -> Head -> vocab-sharded logits

A flat list (not nested modules calling each other) is what a pipeline engine cuts into stages,
and one payload object is what crosses a stage boundary.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from pretrain.models.elastic import ElasticState
from pretrain.models.layers import RMSNorm, Rotary
from pretrain.models.router import Router, gumbel_noise
from pretrain.models.spec import layer_spec
from pretrain.models.structure import BLOCKS, parse_structure
from pretrain.models.subsample import Subsample, Upsample


class Payload(NamedTuple):
    """What travels from layer to layer. A NamedTuple, because DeepSpeed (ZeRO-3 module hooks, the
    pipeline engine) finds the tensors inside tuples, not inside arbitrary objects."""

    hidden: torch.Tensor  # token ids [b, s] before the embedding; residual stream [b, s, d] after
    positions: torch.Tensor  # [b, s] original token positions (RoPE)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) for `positions`
    caches: list | None = None  # per-block KV caches during generation
    levels: tuple = ()  # SUBLLM: a stack of subsample.Level, one per open "("
    threshold: bool = False  # SUBLLM: keep tokens by score > 0 (inference) instead of top-k
    rows: torch.Tensor | None = None  # host LongTensor [b]: the cache rows of hidden's rows (None = 0..b-1)
    active: torch.Tensor | None = None  # SUBLLM batched decode: device bool [b], rows whose token is kept here
    experts: list | None = None  # GRIFFIN: per-block griffin.Experts during generation
    elastic: ElasticState | None = None  # Flextron: the micro-batch's budget and, after the router, its widths


class Embedding(nn.Module):
    def __init__(self, cfg, spec):
        super().__init__()
        self.tok = spec.embedding(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std)
        # RoPE tables are computed once here and shared by every attention block (none: HGRN-Bit)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base) if "T" in cfg.structure else None

    def forward(self, p: Payload) -> Payload:
        rope = self.rotary(p.positions) if self.rotary is not None else None
        return p._replace(hidden=self.tok(p.hidden), rope=rope)


class FinalNorm(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, fused=cfg.fused_kernels)

    def forward(self, p: Payload) -> Payload:
        return p._replace(hidden=self.norm(p.hidden))


class Head(nn.Module):
    """Output projection to vocab-sharded logits; optionally tied to the embedding matrix."""

    def __init__(self, cfg, spec, tied: Embedding | None):
        super().__init__()
        self.proj = spec.head(cfg.d_model, cfg.vocab_size, init_std=cfg.init_std, skip_weight=tied is not None)
        self._tied = [tied] if tied is not None else None  # a list: not registered twice as a submodule

    def forward(self, p: Payload) -> Payload:
        weight = self._tied[0].tok.weight if self._tied else None
        return p._replace(hidden=self.proj(p.hidden, weight=weight))


def build_layers(cfg) -> list[nn.Module]:
    """The flat layer list from the structure string: blocks, and Subsample/Upsample for brackets."""
    spec = layer_spec(cfg)
    emb = Embedding(cfg, spec)
    body = []
    for item in parse_structure(cfg.structure):
        if item.kind == "block":
            body.append(BLOCKS[item.char](cfg, spec, layer_id=item.index, n_blocks=cfg.n_blocks))
        elif item.kind == "open":
            body.append(Subsample(cfg, level=item.index))
        else:
            body.append(Upsample(cfg, level=item.index))
    return [emb, *body, FinalNorm(cfg), Head(cfg, spec, emb if cfg.tie_embeddings else None)]


class Network(nn.Module):
    """Runs the flat layer list. `forward(tokens)` -> vocab-sharded logits; with targets -> mean loss."""

    def __init__(self, cfg, layers: list[nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(layers)
        # Flextron: the router runs right after layer `router_at` (the embeddings, or block router_after)
        # and decides every block's widths; blocks before it run at full width. Outside `layers`, so an
        # elastic model's weights keep a plain model's names (elastify and export map them one to one).
        self.router = Router(cfg) if cfg.elastic.enabled else None
        self.router_at = None
        if self.router is not None:
            after = cfg.elastic.router_after
            self.router_at = 0 if after == 0 else next(
                i for i, m in enumerate(layers) if getattr(m, "layer_id", None) == after - 1)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                caches: list | None = None, start_pos: int | torch.Tensor = 0, rows: torch.Tensor | None = None,
                threshold: bool = False, active: torch.Tensor | None = None,
                experts: list | None = None, elastic: ElasticState | None = None) -> torch.Tensor:
        """threshold=True: SUBLLM's inference rule (keep iff score > 0).

        Generation: `caches` (one KVCache per block), `rows` the cache rows of tokens' rows (host
        LongTensor [b]; None = 0..b-1) and `start_pos` the position of tokens[:, 0], an int or one
        per row (LongTensor [b]) when the rows' caches hold different lengths. `active` (device
        bool [b], all true): a decode step of every row on the sync-free path (see DecodeStep);
        a one-token step of a whole batch takes it anyway. `experts`: GRIFFIN's per-block state.
        `elastic`: Flextron's budget per row (see `elastic_state`); None = the full model."""
        b, s = tokens.shape
        if rows is not None:
            rows = rows.cpu()
        if threshold and b > 1 and s > 1 and self.subsampled:
            # rows keep different numbers of tokens at each level, so a multi-token batch cannot stay
            # rectangular: one row at a time (single-token decode batches stay together)
            outs = []
            for i in range(b):
                sp = start_pos[i:i + 1] if isinstance(start_pos, torch.Tensor) else start_pos
                outs.append(self(tokens[i:i + 1], None if targets is None else targets[i:i + 1], caches=caches,
                                 start_pos=sp, rows=torch.tensor([i]) if rows is None else rows[i:i + 1],
                                 threshold=True, experts=experts))
            return torch.stack(outs).mean() if targets is not None else torch.cat(outs)
        if caches is not None and s == 1 and b > 1 and rows is None and active is None:
            active = torch.ones(b, dtype=torch.bool, device=tokens.device)
        p = self.payload(tokens, caches=caches, start_pos=start_pos, rows=rows, threshold=threshold, active=active,
                         experts=experts, elastic=elastic)
        for i, layer in enumerate(self.layers):
            p = layer(p)
            if i == self.router_at:
                p = self.router(p)
        if targets is None:
            return p.hidden
        from parallel.tensor_parallel import cross_entropy

        return cross_entropy(p.hidden, targets, self.cfg.cross_entropy).mean()

    @staticmethod
    def payload(tokens: torch.Tensor, *, start_pos: int | torch.Tensor = 0, **fields) -> Payload:
        """The payload entering the first layer: token ids and their positions (see forward)."""
        b, s = tokens.shape
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.to(tokens.device).view(-1, 1) + torch.arange(s, device=tokens.device)
            positions = positions.expand(b, s)
        else:
            positions = torch.arange(start_pos, start_pos + s, device=tokens.device).expand(b, s)
        return Payload(hidden=tokens, positions=positions, **fields)

    @property
    def subsampled(self) -> bool:
        return any(isinstance(m, Subsample) for m in self.layers)

    def set_step(self, step: int) -> None:
        """Layers whose behaviour follows the training step (SUBLLM's bypass floor)."""
        for m in self.layers:
            if hasattr(m, "set_step"):
                m.set_step(step)

    def set_grad_accum(self, micro_batches: int) -> None:
        """Micro-batches per optimizer step on this rank: SUBLLM's balancer scales its auxiliary
        gradient by 1 / micro_batches, as the loss is (see Subsample.aux_scale)."""
        for m in self.layers:
            if isinstance(m, Subsample):
                m.aux_scale = 1.0 / micro_batches

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Per-step numbers worth logging (SUBLLM: fraction of positive scores per level)."""
        return {f"positive_fraction/level{m.level}": m.positive_fraction for m in self.layers
                if isinstance(m, Subsample)}

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs: `parameter` is used outside its owning module, within `module`
        (the tied head uses the embedding matrix). ZeRO-3 keeps it gathered for all of `module`;
        the whole network, as DeepSpeed's own example does for a weight shared by two children."""
        return [(self, m._tied[0].tok.weight) for m in self.layers if isinstance(m, Head) and m._tied]

    def elastic_state(self, batch: int, budget: float, generator: torch.Generator | None = None) -> ElasticState:
        """Every row of a micro-batch at `budget` (1.0 = the full model). With a generator (training)
        the router samples its choice with Gumbel noise drawn from it: seed it without the TP rank."""
        noise = gumbel_noise(batch, self.cfg, generator) if generator is not None and budget < 1.0 else None
        return ElasticState(budget=torch.full((batch,), float(budget)), noise=noise)

    def blocks(self) -> list[nn.Module]:
        return [m for m in self.layers if getattr(m, "layer_id", None) is not None]


def build_network(cfg) -> Network:
    """cfg: ModelConfig with vocab_size resolved. Needs parallel_state initialized."""
    if cfg.elastic.enabled or cfg.ffn_hidden_layers or cfg.kv_heads_layers:
        from parallel.tensor_parallel import tp_size
        from pretrain.config import check_widths

        check_widths(cfg, tp_size())  # every rank must get an equal share of every width
    net = Network(cfg, build_layers(cfg))
    if cfg.elastic.enabled:  # elastic units dealt round-robin over TP ranks (identity at TP=1)
        from parallel.elastic_layout import deal_round_robin

        deal_round_robin(net)
    return net


def count_parameters(model: nn.Module, cfg) -> dict[str, int]:
    """Logical (all TP shards together) parameter counts: total and non-embedding."""
    from parallel.tensor_parallel import tp_size

    total = 0
    for p in model.parameters():
        sharded = getattr(p, "tensor_model_parallel", False)
        total += p.numel() * (tp_size() if sharded else 1)
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return {"params_total": total, "params_non_embedding": total - emb}


def model_size(cfg) -> dict[str, int]:
    """count_parameters of the model `cfg` describes, without allocating it: built on the meta
    device in a world of one (exact for every block type, no formula to keep in sync)."""
    from parallel.distributed import local_world

    with local_world(), torch.device("meta"):
        return count_parameters(build_network(cfg), cfg)
