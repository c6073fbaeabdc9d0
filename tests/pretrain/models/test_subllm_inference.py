"""SUBLLM's exact inference: the threshold rule (keep iff score > 0), per-level KV caches and ragged
batches. Every cached path is checked against the full threshold forward, which is the definition."""
from __future__ import annotations

import pytest
import torch

from parallel.distributed import init_distributed
from pretrain.config import ModelConfig
from pretrain.generate import Generator, SamplingConfig
from pretrain.models import build_network
from pretrain.models.attention import KVCache
from pretrain.models.subsample import Subsample

NESTED = "TT(TT(T)T)T"
ATOL = 1e-5


def build(structure: str = NESTED, seed: int = 0):
    init_distributed(1)
    cfg = ModelConfig(arch="subllm" if "(" in structure else "llama", structure=structure, d_model=64, n_heads=4,
                      n_kv_heads=2, ffn_hidden=96, vocab_size=256, seq_len=64, init_std=0.1)
    torch.manual_seed(seed)
    net = build_network(cfg).eval()
    with torch.no_grad():
        for m in levels(net):
            # scores of order 1: both signs occur, far from 0 compared with float rounding, and the
            # blend weights clamp(s, 0, 1) are not all ~0
            m.score.weight.mul_(1.0 / m.score.weight.norm())
    return net


def levels(net) -> list[Subsample]:
    return [m for m in net.layers if isinstance(m, Subsample)]


def caches(net, batch: int) -> list[KVCache]:
    c = net.cfg
    return [KVCache(batch, c.kv_heads, c.seq_len, c.head_dim, dtype=torch.float32, device="cpu")
            for _ in net.blocks()]


def tokens(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def full(net, seq: torch.Tensor) -> torch.Tensor:
    return net(seq.to(next(net.parameters()).device), threshold=True)


def assert_both_kinds(net) -> None:
    """Every level both kept and dropped tokens since the counters were reset."""
    for m in levels(net):
        assert 0 < m.kept < m.seen, f"level {m.level}: kept {m.kept} of {m.seen}"


def reset_counts(net) -> None:
    for m in levels(net):
        m.reset_counts()


def test_threshold_forward_is_causal():
    net = build()
    seq = tokens(40, seed=1)
    reset_counts(net)
    ref = full(net, seq)
    assert_both_kinds(net)
    for t in (0, 7, 19, 38):
        changed = seq.clone()
        changed[:, t + 1:] = tokens(39 - t, seed=100 + t)
        out = full(net, changed)
        torch.testing.assert_close(out[:, :t + 1], ref[:, :t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:], atol=1e-3)  # the change did reach the model


@torch.no_grad()
def test_incremental_decode_matches_full_forward():
    net = build()
    seq = tokens(40, seed=2)
    ref = full(net, seq)
    reset_counts(net)
    cache = caches(net, 1)
    # a prefill, a second multi-token chunk on top of it, then one token at a time
    steps = [net(seq[:, :10], caches=cache, threshold=True),
             net(seq[:, 10:17], caches=cache, start_pos=10, threshold=True)]
    steps += [net(seq[:, i:i + 1], caches=cache, start_pos=i, threshold=True) for i in range(17, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=ATOL, rtol=0)
    assert_both_kinds(net)
    # each level's caches hold exactly the tokens it kept; the outer blocks hold all 40
    held = [int(c.lengths[0]) for c in cache]
    assert held[0] == held[1] == held[-1] == 40
    inner_kept = [m.kept for m in levels(net)]
    assert held[2] == held[3] == held[5] == inner_kept[0] and held[4] == inner_kept[1]


@torch.no_grad()
def decode_ragged(net, prompts: list[torch.Tensor], continuations: torch.Tensor) -> list[torch.Tensor]:
    """Prefill each prompt into its own cache row, then teacher-force `continuations` [b, m] one
    token per step for all rows together; per-row logits [n_i + m, V]."""
    b = len(prompts)
    cache = caches(net, b)
    net._last_caches = cache  # for tests that inspect what the caches hold
    outs = [[net(p[None], caches=cache, rows=torch.tensor([i]), threshold=True)[0]] for i, p in enumerate(prompts)]
    lengths = torch.tensor([len(p) for p in prompts])
    for j in range(continuations.shape[1]):
        step = net(continuations[:, j:j + 1], caches=cache, start_pos=lengths + j, threshold=True)
        for i in range(b):
            outs[i].append(step[i])
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("structure", [NESTED, "TTT"])
def test_ragged_batch_matches_each_row_alone(structure):
    net = build(structure)
    prompts = [tokens(n, seed=10 + n)[0] for n in (5, 11, 8)]
    cont = tokens(12, seed=3, batch=3)
    reset_counts(net)
    together = decode_ragged(net, prompts, cont)
    for i, p in enumerate(prompts):
        alone = decode_ragged(net, [p], cont[i:i + 1])[0]
        torch.testing.assert_close(together[i], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(together[i], full(net, torch.cat([p, cont[i]])[None])[0], atol=ATOL, rtol=0)
    if structure == NESTED:
        assert_both_kinds(net)


def force_drop(sub: Subsample, positions: torch.Tensor) -> None:
    """Make level `sub` drop every token at these original positions (score forced below 0)."""
    seen = {}
    sub.register_forward_pre_hook(lambda m, args: seen.update(positions=args[0].positions))
    score = sub.scores

    def scores(h):
        s = score(h)
        return torch.where(torch.isin(seen["positions"], positions), -s.abs() - 1.0, s)

    sub.scores = scores


def net_cache_lengths(net, layer_id: int) -> torch.Tensor:
    return net._last_caches[layer_id].lengths


def test_level_keeping_nothing_still_decodes():
    net = build()
    outer, inner = levels(net)
    # level 0 keeps nothing on decode steps 7-9 (all three rows sit in 12..20 then); level 1 keeps
    # nothing of the 5-token prompt (its prefill) nor at positions 30..31
    force_drop(outer, torch.arange(12, 21))
    force_drop(inner, torch.cat([torch.arange(0, 5), torch.arange(30, 32)]))
    calls = {b.layer_id: [] for b in net.blocks()}
    for block in net.blocks():
        block.attn.register_forward_pre_hook(lambda m, args, i=block.layer_id: calls[i].append(args[0].shape))
    prompts = [tokens(n, seed=20 + n)[0] for n in (5, 11, 8)]
    cont = tokens(16, seed=4, batch=3)
    together = decode_ragged(net, prompts, cont)
    decode_calls = {i: len(c) for i, c in calls.items()}
    for i, p in enumerate(prompts):
        torch.testing.assert_close(together[i], full(net, torch.cat([p, cont[i]])[None])[0], atol=ATOL, rtol=0)
    # prefill: empty levels were skipped, not run on zero tokens; batched decode steps run every block
    # on every row (no host sync), and only the caches of the rows that kept their token grow
    assert all(shape.numel() > 0 for shapes in calls.values() for shape in shapes)
    assert decode_calls[0] == 3 + 16 and decode_calls[4] == 2 + 16  # level 1 skipped one prefill
    for b in (0, 2, 4):
        assert all(shape[0] == 3 for shape in calls[b][:decode_calls[b]][-16:])
    # the caches hold what each level kept: fewer tokens the deeper the level
    held = [int(net_cache_lengths(net, i).sum()) for i in (0, 2, 4)]
    assert held[0] > held[1] > held[2] > 0


def test_generator_ragged_prompts_and_keep_stats():
    net = build()
    gen = Generator.from_model(net, dtype=torch.float32)
    prompts = [tokens(n, seed=30 + n)[0].tolist() for n in (6, 13, 9)]
    greedy = SamplingConfig(max_new_tokens=10, temperature=0)
    out = gen.generate_ids(prompts, greedy)
    stats, counts = gen.keep_stats(), gen.keep_counts()
    for i, p in enumerate(prompts):  # decoding together changes nothing
        assert gen.generate_ids([p], greedy).tolist() == out[i:i + 1].tolist()

    # direct count: every token fed to the model (prompt + generated but the last) through the
    # full threshold forward, counting positive scores at each level's input
    direct = {m.level: (0, 0) for m in levels(net)}

    def count(m, args):
        seen, kept = direct[m.level]
        h = args[0].hidden
        direct[m.level] = (seen + h.shape[0] * h.shape[1], kept + int((m.scores(h) > 0).sum()))

    hooks = [m.register_forward_pre_hook(count) for m in levels(net)]
    for i, p in enumerate(prompts):
        full(net, torch.tensor(p + out[i, :-1].tolist())[None])
    for h in hooks:
        h.remove()
    assert counts == direct
    assert stats == {lvl: kept / seen for lvl, (seen, kept) in direct.items()}
    assert all(0.0 < f < 1.0 for f in stats.values())


def test_generator_plain_llama_ragged_equals_alone():
    net = build("TTT")
    gen = Generator.from_model(net, dtype=torch.float32)
    assert gen.keep_stats() == {}
    prompts = [tokens(n, seed=40 + n)[0].tolist() for n in (3, 10, 7)]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    out = gen.generate_ids(prompts, greedy)
    for i, p in enumerate(prompts):
        assert gen.generate_ids([p], greedy).tolist() == out[i:i + 1].tolist()
    # equal lengths in tensor form: one batched prefill, same tokens as row by row
    same = torch.tensor([prompts[1], prompts[1][::-1]])
    assert gen.generate_ids(same, greedy)[1].tolist() == gen.generate_ids([prompts[1][::-1]], greedy)[0].tolist()
