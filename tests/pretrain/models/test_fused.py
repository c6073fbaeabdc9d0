"""The training-speed knobs change no math: `model.fused_kernels` (the compiled kernels
run only on a GPU; here the shared reference functions), `model.attention_backend`,
`model.cross_entropy: chunked` (== megatron's vocab-parallel loss at TP 1 and 2). On a GPU (skipped
in CI): each compiled kernel ≡ its reference, and fused kernels + compiled blocks ≡ the plain model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel.distributed import local_world
from tests.helpers import worker


def _loss_and_grads(overrides):
    from pretrain.config import load_config
    from pretrain.models import build_network

    cfg = load_config("launch/configs/tiny-llama.yaml", ["model.vocab_size=512", "model.seq_len=32", *overrides])
    torch.manual_seed(0)
    net = build_network(cfg.model)
    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    loss = net(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters()}


def test_speed_knobs_keep_loss_and_gradients():
    with local_world():
        ref, ref_grads = _loss_and_grads([])
        got, grads = _loss_and_grads(["model.fused_kernels=true", "model.cross_entropy=chunked",
                                      "model.attention_backend=cudnn", "training.compile=true"])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_chunked_cross_entropy_matches_megatron_tp1():
    from parallel.chunked_cross_entropy import chunked_vocab_cross_entropy
    from parallel.tensor_parallel import vocab_parallel_cross_entropy

    with local_world():
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(3, 37, 101) * 3).to(dtype)
            t = torch.randint(0, 101, (3, 37))
            w = torch.rand(3, 37)
            a_in, b_in = x.clone().requires_grad_(), x.clone().requires_grad_()
            a = chunked_vocab_cross_entropy(a_in, t, chunk=16)  # chunks that do not divide the 111 rows
            b = vocab_parallel_cross_entropy(b_in, t)
            (a * w).sum().backward()
            (b * w).sum().backward()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert a_in.grad.dtype == dtype
            rtol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(a_in.grad.float(), b_in.grad.float(), rtol=rtol, atol=1e-6)


def test_chunked_cross_entropy_tp2():
    worker(Path(__file__).parents[2] / "parallel" / "chunked_ce_worker.py", nproc=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on CUDA only")
def test_compiled_kernels_match_the_reference_on_gpu():
    """On a GPU `fused` hands back torch.compile'd kernels: each ≡ its reference (bf16 values and
    gradients, to rounding), and a tiny model with fused kernels and compiled blocks ≡ the plain one."""
    from pretrain.models import fused as ops

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 64, 32, device="cuda", generator=g, dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 1, 64, 32, device="cuda", generator=g), torch.randn(2, 1, 64, 32, device="cuda", generator=g)
    w = torch.rand(32, device="cuda", generator=g) + 0.5
    cases = [(ops.rms_norm, (x, w, 1e-5)), (ops.rotary, (x, cos, sin)), (ops.swiglu, (x, x.flip(-1)))]
    for fn, args in cases:
        outs, grads = [], []
        for compiled in (False, True):
            leaves = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
                      for a in args]
            f = ops.fused(fn, *[a for a in leaves if torch.is_tensor(a)]) if compiled else fn
            assert (f is not fn) == compiled
            out = f(*leaves)
            out.float().square().sum().backward()
            outs.append(out.float())
            grads.append([a.grad.float() for a in leaves if torch.is_tensor(a) and a.grad is not None])
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2, msg=lambda m: f"{fn.__name__}: {m}")
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2, msg=lambda m: f"{fn.__name__} grad: {m}")

    from pretrain.config import load_config
    from pretrain.models import build_network
    from pretrain.models.fused import compile_blocks

    results = []
    t = torch.randint(0, 512, (2, 65), device="cuda", generator=g)
    with local_world():
        for over in ([], ["model.fused_kernels=true"]):
            cfg = load_config("launch/configs/tiny-llama.yaml", ["model.vocab_size=512", "model.seq_len=64", *over])
            torch.manual_seed(0)
            net = build_network(cfg.model).cuda()
            if over:
                compile_blocks(net)
            loss = net(t[:, :-1], t[:, 1:])
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in net.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for name, gr in ref_grads.items():
        torch.testing.assert_close(grads[name], gr, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
