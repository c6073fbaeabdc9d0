"""The network as pipeline layers: what crosses a stage boundary, and what each layer costs.

DeepSpeed's pipeline engine moves a tuple of tensors between stages, the same shapes every
micro-batch; floating tensors get gradients sent back, integer ones do not and go last. A `Payload`
is flattened into one such tuple (`pack`) and rebuilt on the other side (`unpack`):

    (hidden, [level.hidden, level.weight] per open level,   floats: gradients flow back
     positions, [level.positions, level.kept] per open level)   int64

A SUBLLM level may open on one stage and close on another: its saved pre-subsample states, kept
indexes and weights ride along. With top-k, k = ceil(n · ratio) is fixed, so the shapes are too.
RoPE tables are recomputed from the positions instead of sent (they would need gradients).
Every layer of the flat list is wrapped in a `StageLayer` that unpacks, runs the layer and packs,
so DeepSpeed may cut the list anywhere.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from pretrain.models.layers import Rotary
from pretrain.models.network import Embedding, Head, Network, Payload
from pretrain.models.structure import BLOCKS, parse_structure
from pretrain.models.subsample import Level, Subsample, Upsample


def pack(p: Payload) -> tuple[torch.Tensor, ...]:
    floats, ints = [p.hidden], [p.positions]
    for level in p.levels:
        floats += [level.hidden, level.weight]
        ints += [level.positions, level.kept]
    return (*floats, *ints)


def unpack(t: tuple[torch.Tensor, ...], rotary: Rotary | None) -> Payload:
    n = (len(t) - 2) // 4  # open levels: 1 + 2n floats, 1 + 2n ints
    floats, ints = t[:1 + 2 * n], t[1 + 2 * n:]
    rope = rotary if rotary is not None else (lambda _: None)
    levels = tuple(Level(hidden=floats[1 + 2 * i], positions=ints[1 + 2 * i], rope=rope(ints[1 + 2 * i]),
                         kept=ints[2 + 2 * i], weight=floats[2 + 2 * i]) for i in range(n))
    return Payload(hidden=floats[0], positions=ints[0], rope=rope(ints[0]), levels=levels)


class StageLayer(nn.Module):
    """One layer of the flat list, taking and returning the boundary tuple. The first layer (the
    embedding) takes (tokens, positions)."""

    def __init__(self, layer: nn.Module, rotary: Rotary | None):
        super().__init__()
        self.layer = layer
        self._rotary = [rotary]  # shared, and not registered as a submodule (it has no parameters)

    def forward(self, t):
        rotary = None if isinstance(self.layer, Embedding) else self._rotary[0]
        return pack(self.layer(unpack(t, rotary)))


class Prebuilt(nn.Module):
    """A "type" for DeepSpeed's LayerSpec whose construction hands back a module built already: every
    rank builds the whole network from one seed (so each stage's weights are the single-process
    model's), and a TiedLayerSpec must name a type to build."""

    def __new__(cls, module: nn.Module):
        return module


def _tied_head(head: StageLayer, embedding: StageLayer, t):
    """The last stage's head, on the tied embedding module DeepSpeed keeps on that stage."""
    assert head.layer._tied[0] is embedding.layer
    return head(t)


def pipeline_layers(net: Network) -> list:
    """`net`'s flat layer list, each layer wrapped for the pipeline engine. Tied embeddings: the
    embedding and the head become DeepSpeed TiedLayerSpecs of one key, so the first and last stage
    each hold the matrix and DeepSpeed sums its two gradients after every backward."""
    from deepspeed.pipe import TiedLayerSpec

    if net.router is not None:
        raise NotImplementedError("an elastic (Flextron) model under pipeline parallelism is not built yet")
    rotary = net.layers[0].rotary
    layers = [StageLayer(m, rotary) for m in net.layers]
    head = layers[-1]
    if isinstance(head.layer, Head) and head.layer._tied:
        emb = layers[0]
        layers[0] = TiedLayerSpec("embed", Prebuilt, emb, tied_weight_attr="layer.tok.weight")
        layers[-1] = TiedLayerSpec("embed", Prebuilt, emb, forward_fn=functools.partial(_tied_head, head),
                                   tied_weight_attr="layer.tok.weight")
    return layers


def inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the first stage's first layer takes for a micro-batch of token ids [b, s]."""
    p = Network.payload(tokens)
    return p.hidden, p.positions.contiguous()


def loss_fn(outputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
    """The last stage's loss: mean token cross-entropy of the vocab-sharded logits."""
    from parallel.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(outputs[0], targets).mean()


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


def build_pipeline(net: Network, cfg) -> nn.Module:
    """`net` cut into this rank's pipeline stage (DeepSpeed's PipelineModule, partition printed by
    rank 0). The layers of other stages are dropped from `net` (its list keeps placeholders), so
    each rank holds only its stage's weights once the engine is built."""
    from parallel.pipeline import Pipeline

    pipe = Pipeline(pipeline_layers(net), costs=layer_costs(cfg.model), blocks=block_mask(net),
                    names=layer_names(net), method=cfg.parallel.pipeline_partition, loss_fn=loss_fn)
    held = {id(m) for m in pipe.modules()}
    for i, layer in enumerate(net.layers):
        if id(layer) not in held:
            net.layers[i] = nn.Identity()
    return pipe


def micro_batches(batches, n: int):
    """The pipeline engine's data iterator: n (inputs, targets) micro-batches from an iterator of
    token blocks [mb, seq_len + 1]."""
    for _ in range(n):
        batch = next(batches)
        yield inputs(batch[:, :-1]), batch[:, 1:]


def train_batch(engine, batches, n: int) -> torch.Tensor:
    """One optimizer step through the pipeline schedule (forward and backward of n micro-batches,
    then the update); the global batch's mean loss [1], on every rank."""
    return engine.train_batch(data_iter=micro_batches(batches, n)).detach().reshape(1)


@torch.no_grad()
def eval_sum(engine, batches, micro_batch: int) -> torch.Tensor:
    """(sum of per-sequence mean losses, sequences) over this DP rank's val micro-batches. The
    pipeline's shapes are static: full micro-batches only (a ragged tail is left out)."""
    full = [b for b in batches if b.shape[0] == micro_batch]
    if not full:
        return torch.zeros(2)
    loss = engine.eval_batch(micro_batches(iter(full), len(full)), num_micro_batches=len(full))
    n = float(len(full) * micro_batch)
    return torch.stack([loss.detach().float().cpu().reshape(()) * n, torch.tensor(n)])
