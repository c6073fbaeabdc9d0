"""The network as pipeline layers: what crosses a stage boundary, and what each layer costs.

DeepSpeed's pipeline engine moves a tuple of tensors between stages, the same shapes every
micro-batch; floating tensors get gradients sent back, integer ones do not and go last. A `Payload`
is flattened into one such tuple (`pack`) and rebuilt on the other side (`unpack`):

    (hidden, [level.hidden, level.weight] per open level,   floats: gradients flow back
     positions, [level.positions, level.kept] per open level)   int64

A SUBLLM level may open on one stage and close on another: its saved pre-subsample states, kept
indexes and weights ride along. With top-k, k = ceil(n · ratio) is fixed, so the shapes are too.
Flextron: the router runs on the first stage; its choice (per-block width indexes, ints), the
straight-through gates and the budget loss (floats: gradients flow back to the router) travel with
the micro-batch, so every stage applies the same widths; a full-model micro-batch carries choice 0
and gate 1, so the shapes never change. The distillation teacher runs stage by stage beside the
student, its payload bit-cast to integers (it needs no gradient).
RoPE tables are recomputed from the positions instead of sent (they would need gradients).
Every layer of the flat list is wrapped in a `StageLayer` that unpacks, runs the layer and packs,
so DeepSpeed may cut the list anywhere.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn as nn

from pretrain.models.elastic import ElasticState
from pretrain.models.layers import Rotary
from pretrain.models.network import Embedding, Head, Network, Payload
from pretrain.models.structure import BLOCKS, parse_structure
from pretrain.models.subsample import Level, Subsample, Upsample

TIED_KEY = "embed"  # the TiedLayerSpec key of a tied embedding and head


class Boundary(NamedTuple):
    """What the tuple holds at one point of the layer list: fixed by the structure, so both sides
    of a stage boundary know it without sending it."""

    levels: int = 0  # open SUBLLM levels
    elastic: int = 0  # Flextron: 0 none; 1 the budget (+ Gumbel noise), before the router; 2 its choice
    blocks: int = 0  # the choice tensors' width
    teacher: bool = False  # the distillation teacher's payload rides along (as integers: no gradient)


_AS_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
_AS_FLOAT = {v: k for k, v in _AS_INT.items()}


def pack(p: Payload, at: Boundary = Boundary(), teacher: Payload | None = None) -> tuple[torch.Tensor, ...]:
    floats, ints = [p.hidden], [p.positions]
    for level in p.levels:
        floats += [level.hidden, level.weight]
        ints += [level.positions, level.kept]
    st = p.elastic
    if at.elastic == 1 and st is not None:
        floats += [st.budget.to(p.hidden.device)] + ([] if st.noise is None else [st.noise.to(p.hidden.device)])
    elif at.elastic == 2:
        if st is None or st.mlp is None:  # the full model: choice 0 and gate 1 everywhere, no budget loss.
            # Leaves that require grad: the engine runs backward on every float it sends and wants a
            # gradient for every float it receives.
            b, dev = p.hidden.shape[0], p.hidden.device
            gate = lambda: torch.ones(b, at.blocks, device=dev, requires_grad=True)  # noqa: E731
            st = ElasticState(budget=None, mlp=torch.zeros(b, at.blocks, dtype=torch.long), heads=torch.zeros(
                b, at.blocks, dtype=torch.long), mlp_gate=gate(), heads_gate=gate(),
                budget_loss=torch.zeros(1, device=dev, requires_grad=True))
        floats += [st.mlp_gate, st.heads_gate, st.budget_loss.reshape(1)]
        ints += [st.mlp.to(p.hidden.device), st.heads.to(p.hidden.device)]
    if at.teacher:  # bit-cast: the engine sends integers forward only
        ints += [x.view(_AS_INT.get(x.dtype, x.dtype)) for x in pack(teacher, Boundary(levels=at.levels))]
    return (*floats, *ints)


def unpack(t: tuple[torch.Tensor, ...], rotary: Rotary | None, at: Boundary = Boundary()
           ) -> tuple[Payload, Payload | None]:
    """(payload, the teacher's payload or None) from a boundary tuple `pack` wrote at `at`."""
    n = at.levels
    split = sum(x.is_floating_point() for x in t)  # floats first
    floats, ints = t[:split], t[split:]
    rope = rotary if rotary is not None else (lambda _: None)
    levels = tuple(Level(hidden=floats[1 + 2 * i], positions=ints[1 + 2 * i], rope=rope(ints[1 + 2 * i]),
                         kept=ints[2 + 2 * i], weight=floats[2 + 2 * i]) for i in range(n))
    more_f, more_i = floats[1 + 2 * n:], ints[1 + 2 * n:]
    elastic = None
    if at.elastic == 1:
        elastic = _budget_state(more_f)
    elif at.elastic == 2:
        elastic = ElasticState(budget=None, mlp=more_i[0], heads=more_i[1], mlp_gate=more_f[0], heads_gate=more_f[1],
                               budget_loss=more_f[2])
        more_i = more_i[2:]
    p = Payload(hidden=floats[0], positions=ints[0], rope=rope(ints[0]), levels=levels, elastic=elastic)
    teacher = None
    if at.teacher:
        teacher, _ = unpack(tuple(x.view(_AS_FLOAT.get(x.dtype, x.dtype)) for x in more_i), rotary,
                            Boundary(levels=n))
    return p, teacher


def _budget_state(extra) -> ElasticState | None:
    """Before the router: (budget[, noise]) -> ElasticState; none (the full model) -> None."""
    return ElasticState(budget=extra[0], noise=extra[1] if len(extra) > 1 else None) if extra else None


class StageLayer(nn.Module):
    """One layer of the flat list, taking and returning the boundary tuple. The first layer (the
    embedding) takes (tokens, positions[, budget[, noise]]). Flextron: the router runs right after
    its layer, and the frozen teacher's twin of the layer (not a submodule: neither trained nor
    saved) runs beside it, in training only."""

    def __init__(self, layer: nn.Module, rotary: Rotary | None, at_in: Boundary = Boundary(),
                 at_out: Boundary = Boundary(), router: nn.Module | None = None, teacher: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.router = router
        self._rotary = [rotary]  # shared, and not registered as a submodule (it has no parameters)
        self._teacher = [teacher] if teacher is not None else None
        self.at_in, self.at_out = at_in, at_out
        self.threshold = False  # SUBLLM's inference rule (validation; eval_sum sets it)

    def forward(self, t):
        teach = self._teacher is not None and self.training
        if isinstance(self.layer, Embedding):
            tokens, positions, *elastic = t
            p = Payload(hidden=tokens, positions=positions, elastic=_budget_state(elastic))
            tp = Payload(hidden=tokens, positions=positions) if teach else None
        else:
            p, tp = unpack(t, self._rotary[0], self.at_in._replace(teacher=teach))
        p = self.layer(p._replace(threshold=self.threshold))
        if self.router is not None:
            p = self.router(p)
        if teach:
            with torch.no_grad():
                tp = self._teacher[0](tp)
        return pack(p, self.at_out._replace(teacher=teach), tp)


class Prebuilt(nn.Module):
    """A "type" for DeepSpeed's LayerSpec whose construction hands back a module built already: every
    rank builds the whole network from one seed (so each stage's weights are the single-process
    model's), and a TiedLayerSpec must name a type to build."""

    def __new__(cls, module: nn.Module):
        return module


def _tied_head(head: StageLayer, embedding: StageLayer, t):
    """The last stage's head, on the tied embedding module DeepSpeed keeps on that stage."""
    assert head.layer._tied[0] is embedding.layer
    head.train(embedding.training)  # not a submodule of the pipeline: engine.eval() does not reach it
    head.threshold = embedding.threshold
    return head(t)


def boundaries(net: Network, teacher: bool = False) -> list[Boundary]:
    """The boundary before each layer of `net`'s list, and after the last."""
    elastic = net.router is not None
    out, levels = [], 0
    for i, m in enumerate(net.layers):
        out.append(Boundary(levels, (1 if i <= net.router_at else 2) if elastic else 0, net.cfg.n_blocks, teacher))
        levels += isinstance(m, Subsample) - isinstance(m, Upsample)
    return [*out, Boundary(0, 2 if elastic else 0, net.cfg.n_blocks, teacher)]


def pipeline_layers(net: Network, teacher: Network | None = None) -> list:
    """`net`'s flat layer list, each layer wrapped for the pipeline engine (with its twin in the
    distillation `teacher`). Tied embeddings: the embedding and the head become DeepSpeed
    TiedLayerSpecs of one key, so the first and last stage each hold the matrix and DeepSpeed sums
    its two gradients after every backward."""
    from deepspeed.pipe import TiedLayerSpec

    rotary = net.layers[0].rotary
    at = boundaries(net, teacher is not None)
    layers = [StageLayer(m, rotary, at[i], at[i + 1], router=net.router if i == net.router_at else None,
                         teacher=teacher.layers[i] if teacher is not None else None)
              for i, m in enumerate(net.layers)]
    head = layers[-1]
    if isinstance(head.layer, Head) and head.layer._tied:
        emb = layers[0]
        layers[0] = TiedLayerSpec(TIED_KEY, Prebuilt, emb, tied_weight_attr="layer.tok.weight")
        layers[-1] = TiedLayerSpec(TIED_KEY, Prebuilt, emb, forward_fn=functools.partial(_tied_head, head),
                                   tied_weight_attr="layer.tok.weight")
    return layers


def network_name(name: str) -> str:
    """The Network's name of a pipeline parameter: DeepSpeed's PipelineModule names a layer's
    parameters by its global index in the flat list (`7.layer.<name>`, whatever the stage), a tied
    embedding by its key (`tied_modules.embed.layer.<name>`, layer 0), the router by the layer it
    follows (`1.router.<name>`). One name per parameter at any pipeline size: what universal
    checkpoints (pretrain/universal.py) and merged layer files (checkpoint._read_stages) are keyed by."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        assert key == TIED_KEY, name
        head = "0"
    owner, _, rest = rest.partition(".")
    assert head.isdigit() and owner in ("layer", "router"), name
    return f"router.{rest}" if owner == "router" else f"layers.{head}.{rest}"


def inputs(tokens: torch.Tensor, elastic: ElasticState | None = None) -> tuple[torch.Tensor, ...]:
    """What the first stage's first layer takes for a micro-batch of token ids [b, s] (and its
    Flextron budget and Gumbel noise)."""
    p = Network.payload(tokens)
    extra = () if elastic is None else (elastic.budget, *(() if elastic.noise is None else (elastic.noise,)))
    return (p.hidden, p.positions.contiguous(), *extra)


def loss_fn(outputs: tuple[torch.Tensor, ...], labels, *, end: Boundary = Boundary(), objective=None,
            kind: str = "megatron") -> torch.Tensor:
    """The last stage's loss. Validation, or no `objective`: the mean token cross-entropy of the
    vocab-sharded logits. Flextron's training (labels: targets and the budget): `objective(logits,
    teacher logits, ElasticState, targets, budget)` (elastic_training.ElasticTraining.pipelined)."""
    from parallel.tensor_parallel import cross_entropy

    if objective is None or torch.is_tensor(labels):  # (kind: model.cross_entropy)
        return cross_entropy(outputs[0], labels if torch.is_tensor(labels) else labels[0], kind).mean()
    targets, budget = labels
    p, teacher = unpack(outputs, None, end)
    return objective(p.hidden, None if teacher is None else teacher.hidden, p.elastic, targets, budget.item())


def layer_costs(cfg) -> list[float]:
    """Estimated training FLOPs per input token of each layer of `build_layers(cfg)`, in order: a
    block inside subsampled levels sees r = Π keep ratios of the tokens (and attends over r · s), so it
    costs r · matmuls + r² · attention (each block type's `train_flops`); the head 6 · d · V; the
    embedding, norms, subsample and upsample next to nothing (a token's worth of d, so they still
    count when ties are broken)."""
    small = 6.0 * cfg.d_model
    costs, ratios = [small], []
    for item in parse_structure(cfg.structure):
        if item.kind == "open":
            costs.append(small * math.prod(ratios))
            ratios.append(cfg.subsample.ratio(item.index))
        elif item.kind == "close":
            ratios.pop()
            costs.append(small * math.prod(ratios))
        else:
            costs.append(BLOCKS[item.char].train_flops(cfg, math.prod(ratios), item.index))
    return [*costs, small, 6.0 * cfg.d_model * cfg.vocab_size]


def block_mask(net: Network) -> list[bool]:
    """Which layers of the flat list are blocks (the units a pipeline partition cuts between)."""
    return [getattr(m, "layer_id", None) is not None for m in net.layers]


def layer_names(net: Network) -> list[str]:
    """Short names for the partition printout: block kinds and ids, (, ), and the ends."""
    out = []
    for m in net.layers:
        if isinstance(m, Subsample):
            out.append(f"({m.level}")
        elif isinstance(m, Upsample):
            out.append(f"){m.level}")
        elif getattr(m, "layer_id", None) is not None:
            out.append(f"{type(m).__name__.replace('Block', '')}{m.layer_id}")
        else:
            out.append(type(m).__name__)
    return out


def build_pipeline(net: Network, cfg, teacher: Network | None = None, objective=None) -> nn.Module:
    """`net` cut into this rank's pipeline stage (DeepSpeed's PipelineModule, partition printed by
    rank 0). The layers of other stages are dropped from `net` (its list keeps placeholders), so
    each rank holds only its stage's weights once the engine is built; the same for the Flextron
    distillation `teacher` (with `objective`, see loss_fn)."""
    from parallel.pipeline import Pipeline
    from pretrain.errors import ConfigError

    end = boundaries(net, teacher is not None)[-1]
    pipe = Pipeline(pipeline_layers(net, teacher), costs=layer_costs(cfg.model), blocks=block_mask(net),
                    names=layer_names(net), method=cfg.parallel.pipeline_partition,
                    loss_fn=functools.partial(loss_fn, end=end, objective=objective, kind=cfg.model.cross_entropy))
    if net.router is not None and net.router_at >= pipe.parts[1]:
        raise ConfigError(f"model.elastic.router_after={cfg.model.elastic.router_after}: the Flextron router runs "
                          f"after layer {net.router_at}, past the first pipeline stage (layers 0-{pipe.parts[1] - 1}); "
                          "it must decide the widths there, before any stage applies them: lower router_after")
    held = {id(m) for m in pipe.modules()}
    for i, layer in enumerate(net.layers):
        if id(layer) not in held:
            net.layers[i] = nn.Identity()
    if teacher is not None:  # (a tied head keeps its reference to the embedding)
        for i in range(len(teacher.layers)):
            if not pipe._local_start <= i < pipe._local_stop:
                teacher.layers[i] = nn.Identity()
    return pipe


def micro_batches(batches, n: int, sample=None):
    """The pipeline engine's data iterator: n (inputs, labels) micro-batches from an iterator of
    token blocks [mb, seq_len + 1]. Flextron: `sample(micro, rows)` -> (budget, ElasticState) draws
    each micro-batch's budget and noise (the first stage's router needs them; the labels carry the
    budget to the last stage's objective)."""
    for micro in range(n):
        batch = next(batches)
        x, y = batch[:, :-1], batch[:, 1:]
        if sample is None:
            yield inputs(x), y
        else:
            budget, state = sample(micro, x.shape[0])
            yield inputs(x, state), (y, torch.tensor([budget]))


def train_batch(engine, batches, n: int, sample=None) -> torch.Tensor:
    """One optimizer step through the pipeline schedule (forward and backward of n micro-batches,
    then the update); the global batch's mean loss [1], on every rank."""
    return engine.train_batch(data_iter=micro_batches(batches, n, sample)).detach().reshape(1)


@torch.no_grad()
def eval_sum(engine, batches, micro_batch: int, state_of=None, threshold: bool = False) -> torch.Tensor:
    """(sum of per-sequence mean losses, sequences) over this DP rank's val micro-batches; `state_of(rows)`:
    the ElasticState of a Flextron budget. The pipeline's shapes are static: full micro-batches only
    (a ragged tail is left out). Validation's tuples differ from training's (no teacher, no noise),
    so the engine learns the shapes again on each side of it. `threshold`: SUBLLM's inference rule,
    which keeps a different number of tokens in each sequence: one sequence per micro-batch, each
    with its own shapes."""
    full = [b for b in batches if b.shape[0] == micro_batch]
    if not full:
        return torch.zeros(2)
    n = float(len(full) * micro_batch)
    if threshold:
        total = 0.0
        _set_threshold(engine.module, True)
        try:
            for row in (r for b in full for r in b.split(1)):
                engine.reset_activation_shape()
                total += float(engine.eval_batch(iter([(inputs(row[:, :-1]), row[:, 1:])]), num_micro_batches=1))
        finally:
            _set_threshold(engine.module, False)
            engine.reset_activation_shape()
        return torch.tensor([total, n])
    data = ((inputs(b[:, :-1], state_of(b.shape[0]) if state_of else None), b[:, 1:]) for b in full)
    engine.reset_activation_shape()
    loss = engine.eval_batch(data, num_micro_batches=len(full))
    engine.reset_activation_shape()
    return torch.stack([loss.detach().float().cpu().reshape(()) * n, torch.tensor(n)])


def _set_threshold(module: nn.Module, on: bool) -> None:
    for m in module.modules():
        if isinstance(m, StageLayer):
            m.threshold = on
