"""GRIFFIN: prompt-selected FF neurons during decoding, per sequence, for LLaMA and SUBLLM blocks.
(TP=2 ≡ TP=1 selection: tests/parallel/test_tensor_parallel.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.decode_step import DecodeStep
from pretrain.generate import Generator, SamplingConfig
from pretrain.models.griffin import FFSelection
from tests.pretrain.models.test_subllm_inference import ATOL, build, tokens

STRUCTURES = ["TTT", "TT(TT(T)T)T"]


def prompts_and_cont():
    return [tokens(n, seed=60 + n)[0] for n in (9, 4, 14)], tokens(6, seed=61, batch=3)


@torch.no_grad()
def run(gen, prompts, cont, ff: FFSelection | None, *, force_experts: bool = False):
    """Prefill (ragged) then teacher-force `cont`; returns (experts, decode logits [b, m, V])."""
    if force_experts:  # the compact path even at density 1.0 (which generation never builds)
        experts, caches = gen.new_experts(len(prompts), ff), gen.new_caches(len(prompts), 32)
        for i, p in enumerate(prompts):
            gen.logits(p[None], caches, rows=torch.tensor([i]), experts=experts)
        for e, block in zip(experts, gen.model.blocks()):
            e.select(block.mlp)
        step = DecodeStep(gen.model, caches, torch.tensor([len(p) for p in prompts]), cont.shape[1],
                          cuda_graphs=False, experts=experts)
    else:
        _, step = gen.prefill(prompts, cont.shape[1], ff)
        experts = step.experts
    return experts, torch.stack([step(cont[:, j:j + 1])[:, -1] for j in range(cont.shape[1])], dim=1)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_all_neurons_reproduce_the_full_model(structure):
    gen = Generator.from_model(build(structure), dtype=torch.float32)
    prompts, cont = prompts_and_cont()
    _, full = run(gen, prompts, cont, None)
    experts, compact = run(gen, prompts, cont, FFSelection(density=1.0), force_experts=True)
    assert experts[0].index.shape[1] == gen.model.cfg.ffn_hidden
    torch.testing.assert_close(compact, full, atol=ATOL, rtol=0)
    # and density 1.0 through the public path is the full model itself: no experts built
    assert gen.prefill(prompts, 2, FFSelection(density=1.0))[1].experts is None


def direct_selection(z: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's formula, written out: s = ‖ z/‖z‖₂ ‖₂ over the prompt, top-k, ascending."""
    s = (z / z.norm(dim=-1, keepdim=True)).norm(dim=0)  # z [s, f] -> [f]
    return s.topk(k).indices.sort().values


@torch.no_grad()
def prompt_activations(net, prompts) -> list[dict[int, torch.Tensor]]:
    """The activations z [s, d_ff] each block's FF sees for each prompt alone (its down layer's input;
    SUBLLM: only the tokens the level kept), per prompt: layer id -> z."""
    seen: list[dict[int, torch.Tensor]] = [{} for _ in prompts]
    row = 0
    hooks = [b.mlp.down.register_forward_pre_hook(lambda m, a, i=b.layer_id: seen[row].__setitem__(i, a[0][0]))
             for b in net.blocks()]
    for row, p in enumerate(prompts):
        net(p[None], threshold=True)
    for h in hooks:
        h.remove()
    return seen


def check_batch_and_masked_decode(gen, prompts, cont, ff, experts, logits, *, atol):
    """A batch decodes each row as it would alone (same neurons, same logits), and decoding with the
    compact buffers is the full model with every other neuron's z zeroed on decoded tokens."""
    for i, p in enumerate(prompts):
        alone_experts, alone = run(gen, [p], cont[i:i + 1], ff)
        torch.testing.assert_close(alone[0], logits[i], atol=atol, rtol=0)
        assert all(torch.equal(a.index[0], e.index[i]) for a, e in zip(alone_experts, experts))
    b, net = len(prompts), gen.model
    masks = {blk.layer_id: torch.zeros(b, net.cfg.ffn_hidden).scatter_(1, e.index, 1.0)
             for e, blk in zip(experts, net.blocks())}

    def mask_decoded(z, i):
        return (z * masks[i][:, None, :],) if z.shape[:2] == (b, 1) else None

    hooks = [blk.mlp.down.register_forward_pre_hook(lambda m, a, i=blk.layer_id: mask_decoded(a[0], i))
             for blk in net.blocks()]
    _, masked = run(gen, prompts, cont, None)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(logits, masked, atol=atol, rtol=0)
    assert not torch.allclose(logits, run(gen, prompts, cont, None)[1], atol=1e-3)  # the other neurons matter


@pytest.mark.parametrize("structure", STRUCTURES)
def test_selection_is_the_formula_per_sequence_and_decoding_uses_only_it(structure):
    net = build(structure)
    gen = Generator.from_model(net, dtype=torch.float32)
    prompts, cont = prompts_and_cont()
    seen = prompt_activations(net, prompts)
    ff = FFSelection(density=0.5)
    experts, logits = run(gen, prompts, cont, ff)
    for e, block in zip(experts, net.blocks()):
        magnitude = block.mlp.gate.weight.norm(dim=1) * block.mlp.up.weight.norm(dim=1)
        for row in range(len(prompts)):
            z = seen[row].get(block.layer_id)
            # a SUBLLM level that kept none of the prompt's tokens: the block never saw it, magnitude decides
            expected = direct_selection(z, e.k) if z is not None else magnitude.topk(e.k).indices.sort().values
            assert torch.equal(e.index[row], expected), (block.layer_id, row)
    assert not torch.equal(experts[0].index[0], experts[0].index[1])  # each sequence its own neurons

    check_batch_and_masked_decode(gen, prompts, cont, ff, experts, logits, atol=ATOL)


def test_baselines_and_memory():
    net = build("TTT")
    gen = Generator.from_model(net, dtype=torch.float32)
    prompts, cont = prompts_and_cont()
    mag, _ = run(gen, prompts, cont, FFSelection(density=0.25, method="magnitude"))
    for e, block in zip(mag, net.blocks()):
        w = block.mlp.gate.weight.norm(dim=1) * block.mlp.up.weight.norm(dim=1)
        assert all(torch.equal(row, w.topk(e.k).indices.sort().values) for row in e.index)  # static: same rows
    rnd, _ = run(gen, prompts, cont, FFSelection(density=0.25, method="random", seed=3))
    again, _ = run(gen, prompts, cont, FFSelection(density=0.25, method="random", seed=3))
    assert all(torch.equal(a.index, b.index) for a, b in zip(rnd, again))
    assert not torch.equal(rnd[0].index[0], rnd[0].index[1])
    # memory: each row's selected weights and indexes only, never a copy of a whole FF matrix
    d, f, k = net.cfg.d_model, net.cfg.ffn_hidden, rnd[0].k
    assert k == f // 4
    for e in rnd:
        assert e.nbytes() == 3 * (3 * k * d * 4) + 3 * k * 8
        w = e.weights
        assert all(t.shape == (3, k, d) for t in (w.gate, w.up, w.down)) and e.scores is None
    with pytest.raises(ValueError, match="density"):
        FFSelection(density=0.0)
    with pytest.raises(ValueError, match="method"):
        FFSelection(method="union")


def test_generate_with_griffin():
    check_generate(Generator.from_model(build("TT(TT(T)T)T"), dtype=torch.float32))


def check_generate(gen):
    """Density 1.0 is the full model's text; at 0.5 every row of a batch decodes as it would alone."""
    prompts = [p.tolist() for p in prompts_and_cont()[0]]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    full = gen.generate_ids(prompts, greedy)
    assert torch.equal(gen.generate_ids(prompts, greedy, FFSelection(density=1.0)), full)
    sparse = gen.generate_ids(prompts, greedy, FFSelection(density=0.5))
    assert sparse.shape == full.shape
    for i, p in enumerate(prompts):  # per-sequence experts: a row decodes as it would alone
        assert gen.generate_ids([p], greedy, FFSelection(density=0.5)).tolist() == sparse[i:i + 1].tolist()


def test_eval_griffin_rows():
    from pretrain.eval_griffin import evaluate, table

    net = build("TT(TT(T)T)T")
    gen = Generator.from_model(net, dtype=torch.float32)
    docs = tokens(20, seed=70, batch=4)
    rows = evaluate(gen, docs, prompt_len=8, densities=[0.5, 1.0], methods=["griffin", "random"], gen_tokens=5,
                    batch=3)
    assert [(r["method"], r["density"]) for r in rows] == [("full", 1.0), ("griffin", 0.5), ("random", 0.5)]
    # the full row's perplexity is the full forward's on the continuation tokens
    with torch.no_grad():
        logits = net(docs[:, :-1], threshold=True)[:, 7:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), docs[:, 8:].reshape(-1))
    assert abs(rows[0]["nll"] - float(nll)) < 1e-5 and rows[0]["greedy_match"] == 1.0
    assert all(0.0 <= r["greedy_match"] <= 1.0 and r["ppl"] > 1.0 for r in rows)
    assert "| griffin | 0.50 |" in table(rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_griffin_cuda_graphs_match_eager():
    gen = Generator.from_model(build("TT(TT(T)T)T"), dtype=torch.float32)
    prompts, cont = prompts_and_cont()
    results = []
    for graphs, compile in ((False, False), (True, False), (True, True)):
        gen.cuda_graphs, gen.compile = graphs, compile
        results.append(run(gen, prompts, cont.cuda(), FFSelection(density=0.5))[1])
    assert torch.equal(results[1], results[0])  # a replay runs the eager step's kernels
    torch.testing.assert_close(results[2], results[0], atol=1e-4, rtol=0)  # compiled: fused, not bit-exact
