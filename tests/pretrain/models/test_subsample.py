"""SUBLLM's training-time pieces: top-k subsampling, upsample + bypass math, the scorer's gradient
path, the bypass floor and the keep-ratio control."""
import math

import pytest
import torch

from parallel.distributed import init_distributed
from pretrain.config import ModelConfig
from pretrain.models import build_network
from pretrain.models.balancer import balance
from pretrain.models.layers import Rotary
from pretrain.models.network import Payload
from pretrain.models.subsample import Subsample, Upsample

CFG = dict(arch="subllm", d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=128, seq_len=24)


@pytest.fixture(scope="module", autouse=True)
def world():
    init_distributed(1)


def payload(b=2, n=10, d=32):
    torch.manual_seed(0)
    pos = torch.arange(n).expand(b, n)
    return Payload(hidden=torch.randn(b, n, d), positions=pos, rope=Rotary(8)(pos))


def test_topk_keeps_order_and_original_positions():
    cfg = ModelConfig(structure="T(T)T", **CFG, subsample={"keep_ratio": 0.64})
    sub = Subsample(cfg, level=0)
    p = payload()
    out = sub(p)
    k = math.ceil(10 * 0.64)
    kept = out.levels[-1].kept
    assert kept.shape == (2, k) and torch.all(kept[:, 1:] > kept[:, :-1])  # ascending, distinct
    s = sub.scores(p.hidden)
    top = s.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(kept, top)
    assert torch.equal(out.positions, kept)  # original positions travel with the tokens
    cos, sin = Rotary(8)(kept)
    assert torch.allclose(out.rope[0], cos) and torch.allclose(out.rope[1], sin)
    assert torch.equal(out.hidden, torch.stack([p.hidden[i, kept[i]] for i in range(2)]))
    w = out.levels[-1].weight.squeeze(-1)
    assert torch.equal(w, s.gather(1, kept).clamp(0, 1))


def test_upsample_and_bypass_formula():
    cfg = ModelConfig(structure="T(T)T", **CFG)
    sub, up = Subsample(cfg, level=0), Upsample(cfg, level=0)
    with torch.no_grad():
        sub.score.weight.normal_(std=1.0)  # scores of order 1: weights strictly inside (0, 1) too
        up.bypass.uniform_(0.3, 1.2)
    up.set_step(10**9)  # floor at scale_min_end = 0.2
    p = sub(payload())
    x_sub = torch.randn_like(p.hidden)
    y = up(p._replace(hidden=x_sub)).hidden
    lvl = p.levels[-1]
    x, c = lvl.hidden, up.bypass.clamp(0.2, 1.0)
    expect = x.clone()
    for b in range(2):
        for j, t in enumerate(lvl.kept[b]):
            w = lvl.weight[b, j]
            x_up = w * x_sub[b, j] + (1 - w) * x[b, t]
            expect[b, t] = x[b, t] + c * (x_up - x[b, t])
    assert torch.allclose(y, expect, atol=1e-6)
    assert 0 < (lvl.weight > 0).sum() < lvl.weight.numel() * 2


def test_bypass_floor_follows_the_trainer_step():
    cfg = ModelConfig(structure="T(T)T", **CFG, subsample={"scale_min_steps": 100})
    up = Upsample(cfg, level=0)
    up.set_step(0)
    assert up.scale_min == pytest.approx(0.9)
    up.set_step(50)
    assert up.scale_min == pytest.approx(0.55)
    up.set_step(1000)
    assert up.scale_min == pytest.approx(0.2)


def test_scorer_and_bypass_get_gradients():
    cfg = ModelConfig(structure="TT(T(T)T)T", **CFG)
    torch.manual_seed(0)
    net = build_network(cfg)
    net.set_step(0)  # floor 0.9 > c = 0.5: c only gets gradient that pushes it up into range
    x = torch.randint(0, 128, (4, 25))
    net(x[:, :-1], x[:, 1:]).backward()
    subs = [m for m in net.layers if isinstance(m, Subsample)]
    ups = [m for m in net.layers if isinstance(m, Upsample)]
    assert all(m.score.weight.grad.abs().sum() > 0 for m in subs)
    for u in ups:
        g = u.bypass.grad
        assert (g <= 0).all() and (g < 0).any()  # descent raises c towards the floor, never lowers it
    net.set_step(10**9)  # floor 0.2 < c: free gradient both ways
    net.zero_grad()
    net(x[:, :-1], x[:, 1:]).backward()
    assert all((u.bypass.grad > 0).any() and (u.bypass.grad < 0).any() for u in ups)


def test_balancer_gradient_term():
    s = torch.tensor([[2.0, -1.5, 0.5, -3.0]], requires_grad=True)  # half positive, mean |s| 1.75
    g = torch.tensor([[0.1, -0.2, 0.3, -0.4]])
    kw = dict(tolerance=0.05, abs_min=1.0, abs_max=4.0, strength=0.8)
    balance(s, target=0.8, **kw).backward(g)  # too few positive: push every score up, by 0.8 * err / n
    assert torch.allclose(s.grad - g, torch.full_like(g, 0.8 * (0.5 - 0.8) / 4))
    s.grad = None
    balance(s, target=0.2, **kw).backward(g)  # too many positive: push down
    assert torch.allclose(s.grad - g, torch.full_like(g, 0.8 * (0.5 - 0.2) / 4))
    s.grad = None
    balance(s, target=0.5, **{**kw, "abs_max": 1.0, "abs_min": 0.5}).backward(g)  # fraction right, too large
    assert torch.allclose(s.grad - g, 0.8 / 4 * torch.sign(s.detach()))
    s.grad = None
    balance(s, target=0.8, **{**kw, "abs_max": 1.0, "abs_min": 0.5}).backward(g)  # fraction first
    assert torch.allclose(s.grad - g, torch.full_like(g, 0.8 * (0.5 - 0.8) / 4))
    s.grad = None  # the push does not vanish with the incoming gradient (a dead level recovers)
    balance(s, target=0.8, **kw).backward(torch.zeros_like(g))
    assert (s.grad < 0).all()
    assert torch.equal(balance(s, target=0.5, **kw), s)  # identity forward


def test_keep_ratio_control_moves_positive_fraction_toward_target():
    torch.manual_seed(0)
    cfg = ModelConfig(structure="T(TT)T", **CFG, subsample={"keep_ratio": 0.8})
    net = build_network(cfg)
    sub = next(m for m in net.layers if isinstance(m, Subsample))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    data = torch.randint(0, 128, (8, 25))
    fractions = []
    for _ in range(70):
        loss = net(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        fractions.append(sub.positive_fraction.item())
    start, end = sum(fractions[:3]) / 3, sum(fractions[-3:]) / 3
    assert abs(end - 0.8) < abs(start - 0.8) - 0.1, fractions
