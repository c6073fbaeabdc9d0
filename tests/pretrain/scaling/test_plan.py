"""The planner's arithmetic on known configs: exact N (against the built model and a hand count),
D, FLOPs, batch/LR/warm-up rules, structure rule; bad studies are named."""
import math

import pytest
import torch
import yaml

from pretrain.errors import ConfigError
from pretrain.models.structure import u_shaped
from pretrain.scaling.plan import design_warning, plan_study
from pretrain.scaling.study import load_study
from pretrain.trainer import flops_per_token


def write_study(tmp_path, data, **changes):
    study = {
        "name": "t", "dir": str(tmp_path / "study"), "data": str(data), "seq_len": 32,
        "architectures": {"llama": {"config": "launch/configs/tiny-llama.yaml", "overrides": {"data.workers": 0}},
                          "subllm": {"config": "launch/configs/subllm-tiny.yaml", "overrides": {"data.workers": 0}}},
        "sizes": [{"name": "a", "d_model": 32, "n_layers": 6, "n_heads": 2},
                  {"name": "b", "d_model": 48, "n_layers": 6, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 96}],
        "tokens": {"multiples": [4, 8, 16]},
        "rules": {"max_batch_tokens": 256, "min_steps": 4},
        "resources": {"micro_batch_size": 4},
    }
    study.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def llama_params(d, layers, heads, kv, ffn, vocab, tied):
    hd = d // heads
    block = d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * ffn + 2 * d  # q, o, k, v, SwiGLU, two norms
    emb = vocab * d * (1 if tied else 2)
    return layers * block + d + emb, layers * block + d


def test_plan_arithmetic(tiny_data, tmp_path):
    plans = {p.name: p for p in plan_study(load_study(str(write_study(tmp_path, tiny_data))))}
    a, b = plans["llama-a-s0"], plans["llama-b-s0"]
    # N: a hand count of the LLaMA shape (ffn 8/3 d rounded up to 64; vocab 384 padded to 384; tied)
    assert (a.n_total, a.n_non_embedding) == llama_params(32, 6, 2, 2, 128, 384, tied=True)
    assert (b.n_total, b.n_non_embedding) == llama_params(48, 6, 2, 1, 96, 384, tied=True)
    # SUBLLM: the same blocks plus two scorers (d) and two bypass vectors (d)
    assert plans["subllm-a-s0"].n_total == a.n_total + 4 * 32
    assert plans["subllm-a-s0"].config.model.structure == u_shaped(6) == "T(T(TT)T)T"
    for p in plans.values():
        cfg = p.config
        assert p.flops_per_token == flops_per_token(cfg)
        assert p.tokens_per_step == cfg.training.global_batch_size * 32
        # D = m N, rounded to whole steps (at most half a step away)
        for m, d in zip([4, 8, 16], p.tokens):
            assert abs(d - m * p.n) <= p.tokens_per_step / 2
        assert cfg.schedule.decay_points == p.decay_points and cfg.training.steps == p.steps
        branches = sum(round(0.2 * q) for q in p.decay_points)
        assert p.flops == pytest.approx(p.flops_per_token * p.tokens_per_step * (p.steps + branches))
        compute = p.flops_per_token * p.tokens[-1]
        assert p.lr == pytest.approx(min(1e-2, 0.3118 * compute ** -0.125))
        assert cfg.optimizer.min_lr == pytest.approx(0.1 * p.lr)
        assert p.global_batch * 32 <= 256 + 4 * 32 and p.global_batch % p.micro_batch == 0
        assert 1 <= p.warmup <= cfg.schedule.decay_points[0] - round(0.2 * cfg.schedule.decay_points[0])
        assert cfg.tracking.tags["arch"] == p.arch and cfg.tracking.experiment == "scaling-t"
    assert design_warning(list(plans.values())) is not None  # m over 4x: collinear N and D


def test_model_size_matches_the_built_model(tiny_data, tmp_path):
    from parallel.distributed import init_distributed
    from pretrain.models import build_network
    from pretrain.models.network import count_parameters

    init_distributed(1)
    for p in plan_study(load_study(str(write_study(tmp_path, tiny_data)))):
        torch.manual_seed(0)
        assert count_parameters(build_network(p.config.model), p.config.model) == {
            "params_total": p.n_total, "params_non_embedding": p.n_non_embedding}


def test_isoflop_budgets_give_d_from_flops(tiny_data, tmp_path):
    plans = plan_study(load_study(str(write_study(tmp_path, tiny_data, tokens={"budgets": [2e10, 6e10, 2e11]}))))
    for p in plans:
        for c, d in zip([2e10, 6e10, 2e11], p.tokens):
            assert abs(d * p.flops_per_token - c) <= p.tokens_per_step * p.flops_per_token / 2
    assert design_warning(plans) is None


@pytest.mark.parametrize("changes, message", [
    ({"tokens": {"multiples": [1], "budgets": [1e12]}}, "exactly one of tokens.multiples"),
    ({"tokens": {"multiples": [-1]}}, "positive"),
    ({"sizes": [{"name": "a", "d_model": 32, "n_layers": 6, "n_heads": 2, "structures": {"gpt": "TT"}}]},
     "unknown architectures"),
    ({"architectures": {"llama": {"config": "launch/configs/nope.yaml"}}}, "does not exist"),
    ({"sizes": [{"name": "a", "d_model": 30, "n_layers": 6, "n_heads": 4}]}, "not divisible by n_heads"),
    ({"seq_len": 64}, "holds sequences of 32"),
    ({"widths": 3}, "unknown key"),
])
def test_bad_studies_are_named(tiny_data, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        plan_study(load_study(str(write_study(tmp_path, tiny_data, **changes))))


def test_u_shaped_keeps_the_released_proportions():
    assert u_shaped(24) == "TTTTT(TTTTT(TTTT)TTTTT)TTTTT"
    assert u_shaped(12, "H") == "HH(HH(HHHH)HH)HH"
    with pytest.raises(ConfigError, match="at least 5 blocks"):
        u_shaped(4)
    assert math.isclose(sum(c == "T" for c in u_shaped(16)), 16)
