"""WSD with several decay points: the decayed branch of a long run IS the shorter run, and the long
run after the branch IS the run without one (a world of one on gloo, in-process)."""
import pytest

from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.trainer import Trainer
from tests.helpers import TINY_CONFIG, tiny_overrides


def fit(data, run_dir, steps, points=()):
    cfg = load_config(TINY_CONFIG, tiny_overrides(data, run_dir, **{
        "training.steps": steps, "training.eval_every": 100, "training.log_every": 100,
        "checkpoint.every": 0, "tracking.enabled": False, "schedule.kind": "wsd",
        "schedule.warmup_steps": 2, "schedule.decay_fraction": 0.25,
        "schedule.decay_points": "[" + ",".join(map(str, points)) + "]"}))
    return Trainer(cfg).fit()["history"]


def test_decay_branch_equals_the_shorter_run_and_leaves_the_long_run_untouched(tiny_data, tmp_path):
    branched = fit(tiny_data, tmp_path / "branched", 12, points=[8])  # branch: steps 6..8
    short = fit(tiny_data, tmp_path / "short", 8)
    plain = fit(tiny_data, tmp_path / "plain", 12)
    decayed = [h for h in branched if "val_loss_decayed" in h]
    assert [h["step"] for h in decayed] == [8, 12]
    assert decayed[0]["val_loss_decayed"] == short[-1]["val_loss"] == short[-1]["val_loss_decayed"]
    main = [h for h in branched if "loss" in h]
    assert [h["step"] for h in main] == list(range(1, 13))  # the branch's steps are not in the history
    assert [(h["loss"], h["lr"]) for h in main] == [(h["loss"], h["lr"]) for h in plain]
    assert decayed[1]["val_loss_decayed"] == plain[-1]["val_loss"]
    assert main[-1]["tokens"] == 12 * 8 * 32  # global batch 8 x seq 32 per step


@pytest.mark.parametrize("overrides, message", [
    ({"schedule.kind": "cosine", "schedule.decay_points": "[50]"}, "needs schedule.kind=wsd"),
    ({"schedule.kind": "wsd", "schedule.decay_points": "[400]"}, "not within"),
    ({"schedule.kind": "wsd", "schedule.decay_points": "[30]"}, "inside the 40 warm-up steps"),
    ({"schedule.kind": "wsd", "schedule.decay_points": "[100,100]"}, "repeats"),
])
def test_bad_decay_points_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CONFIG, [f"{k}={v}" for k, v in overrides.items()])
