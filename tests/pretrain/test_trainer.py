"""In-process trainer checks (a world of one on gloo): non-finite losses skip the step without
touching weights or optimizer state, and too many in a row abort with a clear message."""
import pytest
import torch

from pretrain.config import load_config
from pretrain.errors import FrugalError
from pretrain.trainer import Trainer, flops_per_token
from tests.helpers import TINY_CONFIG, tiny_overrides


@pytest.fixture
def trainer(tiny_data, tmp_path):
    cfg = load_config(TINY_CONFIG, tiny_overrides(tiny_data, tmp_path / "run", **{
        "training.steps": 40, "training.max_bad_steps": 3, "tracking.enabled": False,
        "checkpoint.every": 0, "training.eval_every": 0}))
    return Trainer(cfg)


def _poison(trainer, on: bool):
    module = trainer.engine.module
    if on:
        module._clean_forward = module.forward
        module.forward = lambda *a, **k: module._clean_forward(*a, **k) * float("nan")
    else:
        module.forward = module._clean_forward


def test_nonfinite_loss_skips_the_step(trainer):
    first = trainer.train_step()
    assert "loss" in first and torch.isfinite(torch.tensor(first["loss"]))
    weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    opt_state = [t.clone() for t in _tensors(trainer.engine.optimizer.optimizer.state)]  # torch AdamW inside ZeRO
    consumed = trainer.loader.samples_consumed_total

    _poison(trainer, True)
    assert trainer.train_step() == {"skipped": 1.0}
    _poison(trainer, False)
    for n, p in trainer.engine.module.named_parameters():
        assert torch.equal(p, weights[n]), f"{n} changed during a skipped step"
    after = list(_tensors(trainer.engine.optimizer.optimizer.state))
    assert len(after) == len(opt_state) > 0
    assert all(torch.equal(a, b) for a, b in zip(after, opt_state)), "optimizer state changed"
    assert trainer.loader.samples_consumed_total == consumed + 8  # the step's data counts as consumed

    nxt = trainer.train_step()
    assert torch.isfinite(torch.tensor(nxt["loss"]))
    assert any(not torch.equal(p, weights[n]) for n, p in trainer.engine.module.named_parameters())


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_divergence_aborts_after_max_bad_steps(trainer):
    _poison(trainer, True)
    with pytest.raises(FrugalError, match="3 consecutive steps with a non-finite loss"):
        trainer.fit()
    assert trainer.skipped_steps == 3


def test_flops_formula(trainer):
    m = trainer.cfg.model
    n = trainer.params["params_non_embedding"]
    assert flops_per_token(trainer.cfg, n) == 6 * n + 6 * m.d_model * m.vocab_size + 12 * 2 * m.d_model * m.seq_len
