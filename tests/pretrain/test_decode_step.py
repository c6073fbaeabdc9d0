"""DecodeStep: the static, graph-replayable decode step. Eager on the CPU here (the GPU run replays
the same step as CUDA graphs: launch/device/decode_graph_check.py); every check is against the
full threshold forward, the definition of SUBLLM's inference."""
from __future__ import annotations

import shutil

import pytest
import torch

from pretrain.decode_step import DecodeStep, split_segments
from pretrain.models.attention import KVCache
from tests.pretrain.models.test_subllm_inference import ATOL, build, caches, force_drop, full, levels, tokens


def test_segments_cut_at_brackets():
    net = build("TT(TT(T)T)T")
    segs = split_segments(net.layers)
    names = [[type(m).__name__[0] if not hasattr(m, "layer_id") else "T" for m in s.layers] for s in segs]
    # Embedding, T, T, ( | T, T, ( | T | ), T | ), T, FinalNorm, Head
    assert names == [["E", "T", "T", "S"], ["T", "T", "S"], ["T"], ["U", "T"], ["U", "T", "F", "H"]]
    assert [s.depth for s in segs] == [0, 1, 2, 1, 0]
    assert [s.opens for s in segs] == [True, True, False, False, False]
    assert len(split_segments(build("TTT").layers)) == 1


@torch.no_grad()
def decode(net, prompts: list[torch.Tensor], cont: torch.Tensor, cuda_graphs: bool = False,
           compile: bool = False) -> tuple[list[torch.Tensor], list]:
    """Prefill each prompt into its cache row, then DecodeStep through `cont` [b, m] (teacher forced)."""
    device = next(net.parameters()).device
    cache = [KVCache(len(prompts), c.k.shape[1], c.k.shape[2], c.k.shape[3], dtype=c.k.dtype, device=device)
             for c in caches(net, 1)]
    prompts, cont = [p.to(device) for p in prompts], cont.to(device)
    outs = [[net(p[None], caches=cache, rows=torch.tensor([i]), threshold=True)[0]] for i, p in enumerate(prompts)]
    step = DecodeStep(net, cache, torch.tensor([len(p) for p in prompts]), cont.shape[1], cuda_graphs=cuda_graphs,
                      compile=compile)
    for j in range(cont.shape[1]):
        logits = step(cont[:, j:j + 1])
        for i in range(len(prompts)):
            outs[i].append(logits[i])
    with pytest.raises(ValueError, match="steps taken"):
        step(cont[:, :1])
    return [torch.cat(o) for o in outs], cache


@pytest.mark.parametrize("structure", ["TT(TT(T)T)T", "TTT"])
def test_decode_step_matches_full_forward(structure):
    net = build(structure)
    prompts = [tokens(n, seed=40 + n)[0] for n in (7, 3, 12)]
    cont = tokens(14, seed=5, batch=3)
    for m in levels(net):
        m.reset_counts()
    together, _ = decode(net, prompts, cont)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(together[i], full(net, torch.cat([p, cont[i]])[None])[0], atol=ATOL, rtol=0)
        alone, _ = decode(net, [p], cont[i:i + 1])  # batch 1: the skipping path
        torch.testing.assert_close(alone[0], together[i], atol=ATOL, rtol=0)
    for m in levels(net):
        assert 0 < m.kept < m.seen


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler")
def test_compiled_step_matches_eager():
    """torch.compile'd segments (Generator.compile) compute the eager step's logits, at batch 3 and at
    batch 1 (where the host skips the levels a token left: compiled segments are chosen the same way)."""
    net = build("TT(TT(T)T)T")
    prompts = [tokens(n, seed=40 + n)[0] for n in (7, 3, 12)]
    cont = tokens(5, seed=5, batch=3)
    for rows in (prompts, prompts[2:]):
        eager, _ = decode(net, rows, cont[:len(rows)])
        compiled, _ = decode(net, rows, cont[:len(rows)], compile=True)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def force_keep(sub, positions: torch.Tensor) -> None:
    """Make level `sub` keep every token at these original positions (score forced above 0)."""
    seen = {}
    sub.register_forward_pre_hook(lambda m, args: seen.update(positions=args[0].positions))
    score = sub.scores
    sub.scores = lambda h: torch.where(torch.isin(seen["positions"], positions), score(h).abs() + 0.5, score(h))


def test_batch_one_skips_dropped_levels_and_trims_inner_caches():
    net = build()
    outer, inner = levels(net)
    force_drop(outer, torch.arange(20, 26))  # decode positions 20..25 skip both levels
    force_keep(inner, torch.arange(10, 20, 2))  # the untrained inner level keeps few tokens itself
    calls = {b.layer_id: 0 for b in net.blocks()}
    for block in net.blocks():
        block.register_forward_pre_hook(lambda m, args, i=block.layer_id: calls.__setitem__(i, calls[i] + 1))
    prompt, cont = tokens(10, seed=6), tokens(20, seed=7)  # decode positions 10..29
    cache = caches(net, 1)
    with torch.no_grad():
        outs = [net(prompt, caches=cache, threshold=True)[0]]
        prefill_held = [int(c.lengths[0]) for c in cache]
        for m in levels(net):
            m.reset_counts()
        calls.update({i: 0 for i in calls})
        step = DecodeStep(net, cache, torch.tensor([10]), 20, cuda_graphs=False)
        outs += [step(cont[:, j:j + 1])[0] for j in range(20)]
    (seen0, kept0), (seen1, kept1) = [(m.seen, m.kept) for m in levels(net)]
    # a block runs on a decode step only if the token reached its level
    assert seen0 == 20 and 0 < kept0 <= 14 and seen1 == kept0 and 0 < kept1 < seen1
    assert calls[0] == calls[1] == calls[6] == 20
    assert calls[2] == calls[3] == calls[5] == kept0 and calls[4] == kept1
    # each cache holds what its level kept; inner caches were trimmed to what 20 steps can add
    held = [int(c.lengths[0]) for c in cache]
    assert held == [p + d for p, d in zip(prefill_held, [20, 20, kept0, kept0, kept1, kept0, 20])]
    assert [c.k.shape[2] for c in cache] == [p + 20 for p in prefill_held]
    torch.testing.assert_close(torch.cat(outs), full(net, torch.cat([prompt, cont], 1))[0], atol=ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("structure", ["TT(TT(T)T)T", "TTT"])
def test_cuda_graph_replay_matches_eager_and_full_forward(structure):
    net = build(structure).cuda()
    outer = levels(net)[0] if levels(net) else None
    if outer is not None:
        force_drop(outer, torch.arange(20, 26, device="cuda"))  # batch 1 skips graphs on these steps
    for prompts in ([tokens(n, seed=50 + n)[0] for n in (9, 4, 13)], [tokens(10, seed=8)[0]]):
        cont = tokens(18, seed=9, batch=len(prompts))
        eager, _ = decode(net, prompts, cont)
        graphs, _ = decode(net, prompts, cont, cuda_graphs=True)
        compiled, _ = decode(net, prompts, cont, cuda_graphs=True, compile=True)
        for i, p in enumerate(prompts):
            assert torch.equal(graphs[i], eager[i])  # a replay runs the very kernels of the eager step
            ref = full(net, torch.cat([p, cont[i]])[None].cuda())[0]
            torch.testing.assert_close(graphs[i], ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(compiled[i], ref, atol=1e-4, rtol=0)  # fused kernels: not bit-exact
