"""One decode step for every row of a batch on static buffers, replayable as CUDA graphs.

After the prefill, generation is a loop of identical steps: one token per row through every layer.
Run eagerly, such a step is host-bound (a 1.3B model: ~25 ms of Python and kernel launches for
~1 ms of GPU work), so on a GPU it is captured once as CUDA graphs and replayed.

What makes a step capturable: no shape and no host decision depends on the data. Every cache row
writes its token at its own end and advances its device-side length in place
(`KVCache.append_masked`); attention reads each row's valid keys by that length
(`kernels.decode_attention`); a SUBLLM level masks the rows that dropped their token instead of
removing them (`Subsample._decode_batch`). The same code runs eagerly on the CPU.

SUBLLM at batch 1: the saving of a dropped token is not running its level at all, so the step is
cut into segments at the brackets (here `TTTTT(TTTTT(TTTT)TTTTT)TTTTT`):

    [emb T*5 (]  [T*5 (]  [T*4]  [) T*5]  [) T*5 norm head]
      depth 0     depth 1  depth 2  depth 1   depth 0

After a segment that ends with `(`, the host reads whether the token was kept (one sync, one byte)
and, if not, skips every following segment deeper than that level. The `)` that closes the level
then returns the state from before it exactly (its masked path), and the level's caches stay as
they were, just as after the eager path's skip. At batch > 1 one row's decision cannot skip a
level for the others, so every segment runs, without a sync. Each segment is one CUDA graph:
skipping is choosing which graphs to replay.

Even replayed, a step of plain PyTorch ops is bound by the number of kernels it launches (a 1.3B
LLaMA: ~1,070 per token, 44 per block, ~3 µs each), not by the bytes of its weights. `compile=True`
runs each segment through torch.compile (Inductor) first: norms, RoPE, the cache write and the GLU's
element-wise work become a few fused kernels around the GEMMs, and the graphs replay those. The
compiled code is warmed up eagerly like the plain one, then captured the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pretrain.models.network import Payload
from pretrain.models.subsample import Level, Subsample, Upsample


@dataclass
class Segment:
    layers: list[nn.Module]
    depth: int  # nesting depth of its blocks (a `(` ending it and a `)` starting it count outside)
    opens: bool  # ends with a `(`: the host may skip the level that follows

    def __call__(self, p):
        for layer in self.layers:
            p = layer(p)
        return p


def _plain(p: Payload) -> tuple:
    """A payload as plain tuples (its SUBLLM levels too): what crosses the compiled code's boundary."""
    return tuple(p._replace(levels=tuple(tuple(level) for level in p.levels)))


def _payload(t: tuple) -> Payload:
    p = Payload(*t)
    return p._replace(levels=tuple(Level(*level) for level in p.levels))


def compiled(seg: Segment):
    """The segment through Inductor, shapes static (a decode step's shapes are fixed), with no graph
    break (fullgraph: a break would cost the fusion the compile is for).

    Plain tuples in and out: torch 2.11's dynamo returns NamedTuples with fields missing when it
    rebuilds them as a compiled function's output, so the Payload and its Levels are rebuilt outside.
    Every segment shares one code object, so each (segment, shapes) is one dynamo cache entry: the
    limit is raised from its default of 8 so that SUBLLM's segments at several batch sizes all fit."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    fn = torch.compile(lambda t: _plain(seg(_payload(t))), dynamic=False, fullgraph=True)
    return lambda p: _payload(fn(_plain(p)))


def split_segments(layers) -> list[Segment]:
    """Cut the flat layer list after every `(` and before every `)`."""
    out, current, depth = [], [], 0
    for layer in layers:
        if isinstance(layer, Upsample):
            if current:
                out.append(Segment(current, depth, opens=False))
                current = []
            depth -= 1
        current.append(layer)
        if isinstance(layer, Subsample):
            out.append(Segment(current, depth, opens=True))
            current, depth = [], depth + 1
    out.append(Segment(current, depth, opens=False))
    return out


class DecodeStep:
    """`step(tokens [b, 1])` -> this rank's vocab-sharded logits [b, 1, V/T] of the next position.

    caches: the prefilled cache of every block (KVCache, or HGRN-Bit's RecurrentState); next_pos: host LongTensor [b], the position of
    each row's next token (its prompt length); max_steps: how many steps will run (caches are
    trimmed to what that needs). cuda_graphs: capture on the first step, replay afterwards.
    experts: GRIFFIN's per-block neurons, already selected (pretrain/models/griffin.py).
    """

    def __init__(self, model, caches: list, next_pos: torch.Tensor, max_steps: int, *, cuda_graphs: bool,
                 experts: list | None = None, compile: bool = False):
        device = next(model.parameters()).device
        b = len(next_pos)
        self.model, self.caches, self.experts, self.max_steps, self.steps = model, caches, experts, max_steps, 0
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.next_pos = next_pos.to(device)
        self.active = torch.ones(b, dtype=torch.bool, device=device)  # every row decodes
        for cache in caches:
            cache.start_decode(max_steps)
        self.segments = split_segments(model.layers)
        self.run = [compiled(seg) for seg in self.segments] if compile else self.segments
        self.skip_levels = b == 1 and len(self.segments) > 1
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.outputs: list = []  # each graph's output payload: static tensors, rewritten by replay

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.steps == self.max_steps:
            raise ValueError(f"DecodeStep: all {self.max_steps} steps taken (the caches were sized for them)")
        self.steps += 1
        self.tokens.copy_(tokens)
        if not self.cuda_graphs:
            logits = self._eager(skip=self.skip_levels)
        elif self.graphs is None:
            logits = self._first_step_then_capture()
        else:
            logits = self._replay()
        self.next_pos += 1
        return logits

    def _first_payload(self):
        return self.model.payload(self.tokens, start_pos=self.next_pos, caches=self.caches, threshold=True,
                                  active=self.active, experts=self.experts)

    def _eager(self, skip: bool) -> torch.Tensor:
        p, skip_deeper_than = self._first_payload(), None
        for seg, run in zip(self.segments, self.run):
            if skip_deeper_than is not None and seg.depth > skip_deeper_than:
                continue  # inside a level that dropped the token: p stays the state entering it
            skip_deeper_than = None
            p = run(p)
            if skip and seg.opens and not bool(p.active[0]):
                skip_deeper_than = seg.depth
        return p.hidden

    def _first_step_then_capture(self) -> torch.Tensor:
        # The first step runs eagerly on a side stream, every segment (a row that dropped its token
        # leaves the level's caches untouched on the masked path): it compiles and warms every
        # kernel the graphs will hold. Capturing then records kernels without running them.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._eager(skip=False).clone()
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.outputs, p = [], [], None
        for i, run in enumerate(self.run):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                # each graph reads the previous one's output tensors: replays chain without copies
                p = run(self._first_payload() if i == 0 else p)
            self.graphs.append(graph)
            self.outputs.append(p)
        return logits

    def _replay(self) -> torch.Tensor:
        skip_deeper_than = None
        for seg, graph, out in zip(self.segments, self.graphs, self.outputs):
            if skip_deeper_than is not None and seg.depth > skip_deeper_than:
                continue
            skip_deeper_than = None
            # a skipped level leaves stale tensors where its `)` reads the level's output; its
            # masked path selects the state from before the level for a dropped token instead
            graph.replay()
            if self.skip_levels and seg.opens and not bool(out.active[0]):
                skip_deeper_than = seg.depth
        return self.outputs[-1].hidden.clone()  # the graph's output buffer is rewritten by the next replay
