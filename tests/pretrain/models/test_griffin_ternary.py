"""GRIFFIN on HGRN-Bit's ternary GLU (pretrain/models/griffin_ternary.py), latent BitLinear and packed
2-bit weights: decoding with the selected neurons is the full ternary model with every other neuron's
z zeroed on decoded tokens, per sequence, from 2-bit packed compact buffers.
(TP=2 ≡ TP=1: tests/parallel/test_tensor_parallel.py.)"""
from __future__ import annotations

import pytest
import torch

from kernels import bitlinear as kb
from parallel.bitlinear import BitRowLinear, PackedBitLinear
from pretrain.generate import Generator
from pretrain.models.griffin import FFSelection
from pretrain.models.griffin_ternary import TernaryRows
from tests.pretrain.models.test_griffin import (check_batch_and_masked_decode, check_generate, direct_selection,
                                               prompt_activations, prompts_and_cont, run)
from tests.pretrain.models.test_hgrnbit import ATOL, build

KINDS = ["latent", "packed"]


def generator(kind: str) -> Generator:
    return Generator.from_model(build("HHH"), dtype=torch.float32, packed=kind == "packed")


def packed_ff_bytes(mlp) -> int:
    """One full 2-bit copy of a GLU's weights: what the selection must stay a fraction of."""
    d, f = mlp.gate.norm_weight.numel(), mlp.down.norm_weight.numel()
    return 2 * f * -(-d // 4) + d * -(-f // 4)


@pytest.mark.parametrize("kind", KINDS)
def test_all_neurons_reproduce_the_full_model(kind):
    gen = generator(kind)
    assert isinstance(gen.model.blocks()[0].mlp.down, PackedBitLinear if kind == "packed" else BitRowLinear)
    prompts, cont = prompts_and_cont()
    _, full = run(gen, prompts, cont, None)
    experts, compact = run(gen, prompts, cont, FFSelection(density=1.0), force_experts=True)
    assert experts[0].index.shape[1] == gen.model.cfg.ffn_hidden
    assert all(isinstance(e.weights, TernaryRows) for e in experts)
    if kind == "packed":  # the same kernels on the same codes and sums: bit for bit
        assert torch.equal(compact, full)
    else:  # the int8 × ternary kernel scales by γ/s in fp64, the latent layer in fp32: an ulp apart
        torch.testing.assert_close(compact, full, atol=ATOL, rtol=0)
    assert gen.prefill(prompts, 2, FFSelection(density=1.0))[1].experts is None


@pytest.mark.parametrize("kind", KINDS)
def test_selection_per_sequence_and_decoding_uses_only_it(kind):
    gen = generator(kind)
    net = gen.model
    prompts, cont = prompts_and_cont()
    seen = prompt_activations(net, prompts)
    ff = FFSelection(density=0.5)
    experts, logits = run(gen, prompts, cont, ff)
    for e, block in zip(experts, net.blocks()):
        for row in range(len(prompts)):
            assert torch.equal(e.index[row], direct_selection(seen[row][block.layer_id], e.k)), (block.layer_id, row)
    assert not torch.equal(experts[0].index[0], experts[0].index[1])  # each sequence its own neurons

    # a batch == each row alone; the compact buffers == the full ternary model with the other neurons'
    # z zeroed on decoded tokens (its down normalizes over all d_ff with the zeros, the compact path
    # over the selected ones only, divided by d_ff)
    check_batch_and_masked_decode(gen, prompts, cont, ff, experts, logits, atol=ATOL)

    # the buffers: 2-bit packed codes of the selected rows/columns, the down's norm weights, the indexes
    d, k = net.cfg.d_model, experts[0].k
    for e in experts:
        w = e.weights
        assert w.gate.shape == w.up.shape == (3, k, d // 4) and w.down.shape == (3, d, -(-k // 4))
        assert all(t.dtype == torch.uint8 for t in (w.gate, w.up, w.down)) and e.scores is None
        assert e.nbytes() == 3 * (2 * k * -(-d // 4) + d * -(-k // 4)) + 3 * k * 4 + 3 * k * 8 + 3 * 4


@torch.no_grad()
def test_magnitude_ranks_by_the_codes_and_memory():
    latent, packed = generator("latent"), generator("packed")
    prompts, cont = prompts_and_cont()
    ff = FFSelection(density=0.5, method="magnitude")
    a, logits_a = run(latent, prompts, cont, ff)
    b, logits_b = run(packed, prompts, cont, ff)
    for ea, eb, block in zip(a, b, latent.model.blocks()):
        # ‖C_gate,i‖·‖C_up,i‖ on the ternary codes the layers compute with (γ: a common factor)
        codes = [kb.weight_codes(lin.weight)[0].float() for lin in (block.mlp.gate, block.mlp.up)]
        expected = (codes[0].norm(dim=1) * codes[1].norm(dim=1)).topk(ea.k).indices.sort().values
        assert all(torch.equal(row, expected) for row in ea.index)  # static: every row the same
        assert torch.equal(ea.index, eb.index)  # the packed layers hold the same codes
    torch.testing.assert_close(logits_a, logits_b, atol=ATOL, rtol=0)

    # one sequence at density 0.5: half the packed FF's code bytes, never a full copy of it
    one, _ = run(packed, prompts[:1], cont[:1], FFSelection(density=0.5))
    for e, block in zip(one, packed.model.blocks()):
        w, full = e.weights, packed_ff_bytes(block.mlp)
        assert sum(t.numel() for t in (w.gate, w.up, w.down)) * 2 == full
        assert e.nbytes() < 0.7 * full


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_griffin(kind):
    """`generate --griffin-density 0.5` on a ternary model (latent, `--packed` or a packed export all build
    the experts through Generator.new_experts, which refused ternary GLUs before)."""
    check_generate(generator(kind))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_griffin_cuda_graphs_and_compile():
    """Triton kernels (norm-quant, int8 × ternary) on the compact buffers: replayed graphs run the eager
    step's kernels (bit for bit). The compiled step fuses the element-wise work, which moves fp32 sums by
    an ulp; an activation that lands on a rounding boundary of its int8 code then flips it, and the
    recurrent state carries that on: the first step is compared tightly, the rest loosely."""
    gen = Generator.from_model(build("HHH").cuda(), dtype=torch.float32, packed=True)
    prompts, cont = prompts_and_cont()
    prompts, cont = [p.cuda() for p in prompts], cont.cuda()
    results = []
    for graphs, compile in ((False, False), (True, False), (True, True)):
        gen.cuda_graphs, gen.compile = graphs, compile
        results.append(run(gen, prompts, cont, FFSelection(density=0.5))[1])
    assert torch.equal(results[1], results[0])
    torch.testing.assert_close(results[2][:, 0], results[0][:, 0], atol=1e-4, rtol=0)
    diff = (results[2] - results[0]).abs()
    assert diff.max() < 0.1 and diff.median() < 1e-4, (diff.max(), diff.median())
