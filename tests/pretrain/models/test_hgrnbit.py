"""HGRN-Bit (MatMul-free LM): ternary BitLinear semantics, MLGRU recurrent-state decoding, packed
2-bit inference and the export. (TP=2 ≡ TP=1 and fused ≡ unfused: tests/parallel/test_tensor_parallel.py;
kernels against their references: tests/kernels/.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import bitlinear as kb
from parallel.bitlinear import BitColumnLinear, BitRowLinear, PackedBitLinear, pack_bitlinears
from parallel.distributed import init_distributed
from pretrain.config import ModelConfig
from pretrain.generate import Generator, SamplingConfig
from pretrain.models import build_network
from pretrain.models.hgrnbit import RecurrentState
from tests.helpers import TINY_CONFIG, cli, tiny_overrides

ATOL = 1e-5


def build(structure: str = "HHH", seed: int = 0, **kw) -> torch.nn.Module:
    init_distributed(1)
    arch = "hgrnbit" if "H" in structure else "llama"
    cfg = ModelConfig(arch=arch, structure=structure, d_model=64, n_heads=4, ffn_hidden=96, vocab_size=256,
                      seq_len=64, **{"linear": "ternary", **kw})
    torch.manual_seed(seed)
    return build_network(cfg).eval()


def tokens(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def fake_quant(x: torch.Tensor, norm_w: torch.Tensor, w: torch.Tensor, eps: float):
    """The spec, written out: y = RMSNorm(x); x̃ = round(y·127/max|y|)/(127/max|y|); W̃ = clamp(round(W/γ))·γ."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_w
    s = 127 / y.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    gamma = w.abs().mean().clamp(min=1e-5)
    return y, (y * s).round().clamp(-128, 127) / s, (w / gamma).round().clamp(-1, 1) * gamma


@pytest.mark.parametrize("layer", [BitColumnLinear, BitRowLinear])
@pytest.mark.parametrize("fused", [True, False])
def test_bitlinear_forward_and_ste_gradients_follow_the_spec(layer, fused):
    init_distributed(1)
    torch.manual_seed(0)
    lin = layer(48, 40, init_std=0.05, fused=fused)
    with torch.no_grad():
        lin.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 48, requires_grad=True)
    out = lin(x)
    dout = torch.randn_like(out)
    out.backward(dout)

    x64 = x.detach().double().requires_grad_()
    y, x_q, w_q = fake_quant(x64, lin.norm_weight.detach().double(), lin.weight.detach().double(), lin.eps)
    assert set(((w_q / w_q.abs().max()).unique().tolist())) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(out.double(), x_q @ w_q.t(), rtol=1e-5, atol=1e-6)
    # STE: grad_W = doutᵀ·x̃; grad_x = the RMSNorm's backward of grad_y = dout·W̃ (rounding as identity)
    d2 = dout.double().reshape(-1, 40)
    torch.testing.assert_close(lin.weight.grad.double(), d2.t() @ x_q.reshape(-1, 48), rtol=1e-5, atol=1e-6)
    (grad_x,) = torch.autograd.grad(y, x64, (dout.double() @ w_q))
    torch.testing.assert_close(x.grad.double(), grad_x, rtol=1e-4, atol=1e-6)
    assert lin.norm_weight.grad.abs().sum() > 0


def test_requantizing_dequantized_weights_is_not_idempotent():
    """The trap the export avoids: quantizing W̃ = codes·γ again gives scale p·γ, not γ."""
    w = torch.randn(64, 64)
    codes, gamma = kb.weight_codes(w)
    codes2, gamma2 = kb.weight_codes(codes.float() * gamma)
    p = (codes != 0).float().mean()
    torch.testing.assert_close(gamma2, p * gamma)
    assert not torch.isclose(gamma2, gamma)


@torch.no_grad()
def test_recurrent_decode_matches_full_forward_on_a_ragged_batch():
    net = build("HHH")
    gen = Generator.from_model(net, dtype=torch.float32)
    prompts = [tokens(n, seed=10 + n)[0] for n in (9, 4, 13)]
    cont = tokens(6, seed=3, batch=3)
    first, step = gen.prefill(prompts, cont.shape[1])
    for i, p in enumerate(prompts):  # each row's prefill logits equal its own full forward
        torch.testing.assert_close(first[i], net(p[None])[0, -1], atol=ATOL, rtol=1e-4)
    decoded = torch.stack([step(cont[:, j:j + 1])[:, -1] for j in range(cont.shape[1])], dim=1)
    for i, p in enumerate(prompts):
        ref = net(torch.cat([p[None], cont[i:i + 1]], dim=1))[0, len(p):]
        torch.testing.assert_close(decoded[i], ref, atol=ATOL, rtol=1e-4)
    # the state is O(d) per layer whatever the context: no KV cache
    small, large = gen.new_caches(3, 8), gen.new_caches(3, 4096)
    assert all(isinstance(c, RecurrentState) for c in large)
    assert [c.nbytes() for c in small] == [c.nbytes() for c in large] == [3 * 64 * 4] * 3


@pytest.mark.parametrize("structure,kw", [("HHH", {}), ("TT", {"quantize_head": False})])
@torch.no_grad()
def test_packed_inference_equals_fake_quantization(structure, kw):
    net, packed = build(structure, **kw), build(structure, **kw)  # the same seed: the same weights
    n = pack_bitlinears(packed)
    assert n == (3 * 7 + 1 if structure == "HHH" else 2 * 7)  # 7 per block (+ the ternary head)
    layers = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    assert all(m.packed.dtype == torch.uint8 for m in layers)
    # weight bytes: 2 bits per weight instead of 16 (+ γ and the norm: 15% at these tiny widths)
    dense_bytes = sum(m.packed.shape[0] * m.local_in * 2 for m in layers)
    assert sum(m.packed.numel() for m in layers) * 8 == dense_bytes
    assert sum(m.nbytes() for m in layers) < 0.16 * dense_bytes
    seq = tokens(20, seed=1, batch=2)
    torch.testing.assert_close(packed(seq), net(seq), atol=ATOL, rtol=1e-4)
    # and generation: greedy tokens of the packed model are the fake-quantized model's
    s = SamplingConfig(max_new_tokens=8, temperature=0)
    prompts = [tokens(5, seed=7)[0], tokens(9, seed=8)[0]]
    ids = Generator.from_model(net, dtype=torch.float32).generate_ids(prompts, s)
    assert torch.equal(Generator.from_model(packed, dtype=torch.float32).generate_ids(prompts, s), ids)


def test_ternary_config_errors():
    with pytest.raises(ValueError, match="cannot be tied"):
        ModelConfig(structure="TT", linear="ternary", tie_embeddings=True)
    with pytest.raises(ValueError, match="arch: hgrnbit"):
        ModelConfig(structure="HH")
    ModelConfig(structure="TT", linear="ternary", tie_embeddings=True, quantize_head=False)


def test_train_export_and_generate_packed(tiny_data, tmp_path):
    """CLI end to end: train a tiny ternary HGRN-Bit, export packed codes, sample from the export; the
    export's text equals `generate --packed` from the training checkpoint; bad exports are refused."""
    run = tmp_path / "run"
    over = tiny_overrides(tiny_data, run, **{"model.arch": "hgrnbit", "model.structure": "HH",
                                             "model.linear": "ternary", "training.steps": 3,
                                             "checkpoint.every": 3, "training.eval_every": 0})
    res = cli("train", "--config", TINY_CONFIG, *over, "model.tie_embeddings=false", "tracking.enabled=false")
    assert res.returncode == 0, res.stdout[-3000:]
    out = tmp_path / "export"
    res = cli("export-ternary", "--checkpoint", str(run), "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:]
    assert "packed 15 ternary layers" in res.stdout and (out / "mp_rank_00_packed.pt").is_file()
    gen_args = ["--prompt", "def", "--max-new-tokens", "12", "--temperature", "0"]
    from_export = cli("generate", "--checkpoint", str(out), *gen_args)
    from_ckpt = cli("generate", "--checkpoint", str(run), "--packed", *gen_args)
    assert from_export.returncode == 0 and from_ckpt.returncode == 0, from_export.stdout[-3000:]
    sample = lambda r: r.stdout[r.stdout.index("--- sample 0 ---"):]  # noqa: E731
    assert sample(from_export) == sample(from_ckpt)

    before = sorted(p.name for p in out.iterdir())
    again = cli("export-ternary", "--checkpoint", str(run), "--out", str(out))
    assert again.returncode == 2 and "refusing to overwrite" in again.stdout
    assert sorted(p.name for p in out.iterdir()) == before
    twice = cli("export-ternary", "--checkpoint", str(out), "--out", str(tmp_path / "x"))
    assert twice.returncode == 2 and "already a packed export" in twice.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_in_the_model():
    """On the GPU the model runs the Triton kernels: fused ≡ unfused (loss, grads), packed ≡ fake-quant
    logits, and the packed model's CUDA-graph decode step ≡ eager at bf16, on a ternary HGRN-Bit."""
    torch.manual_seed(0)
    seq = tokens(33, seed=2, batch=4).cuda()
    grads = {}
    for fused in (True, False):
        net = build("HHH", bitlinear_fused=fused).cuda().train()
        loss = net(seq[:, :-1], seq[:, 1:])
        loss.backward()
        grads[fused] = (loss.detach(), {n: p.grad for n, p in net.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-4, atol=1e-5)
    for n, g in grads[True][1].items():
        torch.testing.assert_close(g, grads[False][1][n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")

    # fp32: the integer sums are exact on both paths; the scales γ/s are applied in different orders
    # (fp64 epilogue vs fp32 multiply), and a last-bit difference that lands on a rounding boundary
    # of the next layer's activation quantization moves one int8 code by 1: rare, small, not zero
    net, packed = build("HHH").cuda().eval(), build("HHH").cuda()
    pack_bitlinears(packed)
    with torch.no_grad():
        a, b = packed(seq), net(seq)
    assert torch.isclose(a, b, rtol=1e-4, atol=1e-4).float().mean() > 0.95
    assert (a - b).abs().max() < 2e-2
    packed = packed.bfloat16()
    prompts = [seq[0, :9].cpu(), seq[1, :5].cpu()]
    s = SamplingConfig(max_new_tokens=10, temperature=0)
    gen = Generator.from_model(packed, dtype=torch.bfloat16)
    graphs = gen.generate_ids(prompts, s)
    gen.cuda_graphs = False
    assert torch.equal(gen.generate_ids(prompts, s), graphs)


def test_memory_lean_gate_inputs_match_autograd():
    """The MLGRU's gate inputs save fewer tensors than autograd would; their gradients are
    autograd's (float64)."""
    from pretrain.models.hgrnbit import _GateInputs

    torch.manual_seed(0)
    f, c = (torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ga, gb = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    a, b = _GateInputs.apply(f, c)
    grads = torch.autograd.grad((a * ga).sum() + (b * gb).sum(), (f, c))
    a_ref = torch.sigmoid(f)
    b_ref = (1 - a_ref) * F.silu(c)
    torch.testing.assert_close((a, b), (a_ref, b_ref))
    torch.testing.assert_close(grads, torch.autograd.grad((a_ref * ga).sum() + (b_ref * gb).sum(), (f, c)))
