import pytest
import torch

from pretrain.optim import build_optimizer, lr_multiplier
from pretrain.config import OptimizerConfig


def test_cosine_schedule():
    f = lambda s: lr_multiplier(s, total=100, warmup=10, kind="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warmup reaches the peak
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_wsd_schedule():
    f = lambda s: lr_multiplier(s, total=100, warmup=10, kind="wsd", min_ratio=0.0, decay_fraction=0.2)
    assert [f(s) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable phase
    assert f(80) == pytest.approx(1 - 1 / 20) and f(89) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.0)
    assert lr_multiplier(50, total=100, warmup=10, kind="constant", min_ratio=0.0) == 1.0


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1), fused=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, norm weight, norm bias
