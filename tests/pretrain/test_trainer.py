"""In-process trainer checks (a world of one on gloo): a non-finite loss skips the step exactly as if
its data had been skipped, under every ZeRO stage; too many in a row abort with a clear message."""
import pytest
import torch

from pretrain.config import load_config
from pretrain.errors import FrugalError
from pretrain.trainer import Trainer, flops_per_token
from tests.helpers import TINY_CONFIG, tiny_overrides


def make_trainer(data, run_dir, stage: int) -> Trainer:
    cfg = load_config(TINY_CONFIG, tiny_overrides(data, run_dir, **{
        "training.steps": 40, "training.max_bad_steps": 3, "tracking.enabled": False,
        "checkpoint.every": 0, "training.eval_every": 0, "parallel.zero_stage": stage}))
    return Trainer(cfg)  # grad accum 2: two micro-batches per step


def poison(trainer, calls: set[int] | None):
    """Make the forward return NaN on the given call numbers (None: restore; empty set: always)."""
    module = trainer.engine.module
    if calls is None:
        module.forward = module._clean_forward
        return
    module._clean_forward = module.forward
    count = iter(range(10**9))

    def forward(*a, **k):
        out = module._clean_forward(*a, **k)
        return out * float("nan") if not calls or next(count) in calls else out

    module.forward = forward


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_nonfinite_loss_skips_the_step_as_if_its_data_were_skipped(tiny_data, tmp_path, stage):
    runs = []
    for poisoned in (True, False):
        tr = make_trainer(tiny_data, tmp_path / f"run{poisoned}", stage)
        first = tr.train_step()
        if poisoned:
            poison(tr, {1})  # the SECOND micro-batch: the first one's gradients must go too
            assert tr.train_step() == {"skipped": 1.0}
            poison(tr, None)
        else:  # the reference: consume the same two micro-batches without training on them
            next(tr.batches), next(tr.batches)
            tr.engine.lr_scheduler.step()
        assert tr.loader.samples_consumed_total == 16
        runs.append((first, tr.train_step(), tr.train_step()))
    (a1, a2, a3), (b1, b2, b3) = runs
    assert a1 == b1 and a2 == b2 and a3 == b3, (runs, stage)  # bit-identical continuation
    assert all(torch.isfinite(torch.tensor(v)) for v in a3.values())


def test_divergence_aborts_after_max_bad_steps(tiny_data, tmp_path):
    tr = make_trainer(tiny_data, tmp_path / "run", 1)
    poison(tr, set())
    with pytest.raises(FrugalError, match="3 consecutive steps with a non-finite loss"):
        tr.fit()
    assert tr.skipped_steps == 3 and tr.step == 3


def test_flops_formula(tiny_data, tmp_path):
    tr = make_trainer(tiny_data, tmp_path / "run", 1)
    m = tr.cfg.model
    norms = sum(p.numel() for n, p in tr.engine.module.named_parameters() if "norm" in n)
    matmul = tr.params["params_non_embedding"] - norms  # tied embeddings: the head is the embedding
    assert flops_per_token(tr.cfg) == 6 * matmul + 6 * m.d_model * m.vocab_size + 12 * 2 * m.d_model * m.seq_len
    # SUBLLM: blocks inside levels see r = product of keep ratios of the tokens, attending over r·s
    sub = tr.cfg.model.model_copy(update={"arch": "subllm", "structure": "T(T(T)T)T"})
    cfg = tr.cfg.model_copy(update={"model": sub})
    per_block = matmul // 2
    r1, r2 = 0.64, 0.64 * 0.64
    expect = sum(r * (6 * per_block + 12 * m.d_model * r * m.seq_len) for r in (1, r1, r2, r1, 1))
    assert flops_per_token(cfg) == pytest.approx(expect + 6 * m.d_model * m.vocab_size)
    # HGRN-Bit: 6 · its matmul weights (BitLinear norms excluded), no attention term
    from pretrain.models import build_network

    hgrn = tr.cfg.model.model_copy(update={"arch": "hgrnbit", "structure": "HH", "linear": "ternary",
                                            "tie_embeddings": False})
    weights = sum(p.numel() for n, p in build_network(hgrn).blocks()[0].named_parameters() if p.dim() == 2)
    cfg = tr.cfg.model_copy(update={"model": hgrn})
    assert flops_per_token(cfg) == 2 * 6 * weights + 6 * m.d_model * m.vocab_size
