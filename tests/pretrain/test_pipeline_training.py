"""`python -m pretrain train` with parallel.pipeline=2 (two processes, gloo), SUBLLM with tied
embeddings: every step's loss, LR, grad norm and val loss (top-k and the inference rule's) equal the
one-process run's; a resume from the step-3 checkpoint equals the uninterrupted pipeline run bit for
bit; `generate` on the pipeline checkpoint (its stages' layer files merged) writes the one-process
checkpoint's text; resumes across layouts (TP=2 x PP=2 -> one process, and to DP=2; one process ->
PP=2) go through a universal checkpoint and continue the uninterrupted run; a non-finite loss skips
its step under ZeRO-1 and stops ZeRO-0 with a clear error; bad layouts are refused before any process
group starts."""
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY_CONFIG, cli, tiny_overrides, worker

SUBLLM = {"model.arch": "subllm", "model.structure": "TT(TT)TT", "model.init_std": 0.1, "training.steps": 6,
          "checkpoint.every": 3, "training.eval_every": 3, "tracking.enabled": "false"}


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def train(data, run_dir: Path, nproc: int, **extra) -> str:
    res = cli("train", "--config", TINY_CONFIG, *tiny_overrides(data, run_dir, **{**SUBLLM, **extra}), nproc=nproc)
    assert res.returncode == 0, res.stdout[-4000:]
    return res.stdout


def from_step(run: Path, step: int, to: Path) -> Path:
    """A copy of `run` whose newest checkpoint is the one of `step` (and no metrics yet)."""
    shutil.copytree(run, to)
    for later in (to / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (to / "checkpoints" / "latest").write_text(f"step_{step:06d}")
    (to / "metrics.jsonl").write_text("")
    return to


def continues(resumed: Path, run: dict[int, dict], rel: float, keys=("loss", "lr", "grad_norm", "val_loss",
                                                                     "samples_consumed")) -> None:
    again = metrics(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in again:
        for key in keys:
            want = run[step].get(key)
            assert again[step].get(key) == (want if want is None else pytest.approx(want, rel=rel)), (step, key)


def test_pp2_trains_resumes_and_generates_like_one_process(tiny_data, tmp_path):
    out = train(tiny_data, tmp_path / "pp", 2, **{"parallel.pipeline": 2})
    assert "world 2 = tp 1 x dp 1 x pp 2" in out and "pipeline partition (cost), 2 stages" in out
    train(tiny_data, tmp_path / "one", 1)
    pp, one = metrics(tmp_path / "pp"), metrics(tmp_path / "one")
    assert sorted(pp) == sorted(one) == list(range(1, 7))
    for step in pp:
        for key in ("loss", "lr", "grad_norm", "val_loss", "val_loss_threshold"):
            want = one[step].get(key)  # (validation only every 3 steps)
            assert pp[step].get(key) == (want if want is None else pytest.approx(want, rel=1e-6)), (step, key)

    # resume the pipeline run from its step-3 checkpoint: steps 4-6 exactly as uninterrupted
    resumed = from_step(tmp_path / "pp", 3, tmp_path / "resumed")
    out = train(tiny_data, resumed, 2, **{"parallel.pipeline": 2})
    assert "at step 3" in out and "universal" not in out
    continues(resumed, pp, rel=0)

    # generation merges the stages' layer files: the same text as the one-process checkpoint
    texts = []
    for run in ("pp", "one"):
        res = cli("generate", "--checkpoint", str(tmp_path / run), "--prompt", "def ", "--max-new-tokens", "12",
                  "--seed", "0")
        assert res.returncode == 0, res.stdout[-3000:]
        texts.append(res.stdout.strip().splitlines())
    assert texts[0] == texts[1]

    # the one-process checkpoint resumes at PP=2 through a universal checkpoint (its ZeRO shards re-cut
    # per stage): steps 4-6 as the one-process run's
    out = train(tiny_data, from_step(tmp_path / "one", 3, tmp_path / "one_to_pp"), 2, **{"parallel.pipeline": 2})
    assert "converted universal checkpoint" in out and "tp 1 x dp 1 x pp 2" in out, out[-3000:]
    continues(tmp_path / "one_to_pp", one, rel=1e-6)


def test_resume_tp2_pp2_at_other_layouts(tiny_data, tmp_path):
    """Save at TP=2 x PP=2 (4 processes); resume through one universal checkpoint at one process, with
    ZeRO-2 (the stage may change too): the uninterrupted run's steps. Then at DP=2, which re-splits the
    rest of the epoch over two ranks (other micro-batches, so other losses): exactly what a one-process
    checkpoint of the same step gives when it resumes at DP=2."""
    from pretrain.safe_load import safe_load

    train(tiny_data, tmp_path / "grid", 4, **{"parallel.pipeline": 2, "parallel.tensor": 2})
    grid = metrics(tmp_path / "grid")
    out = train(tiny_data, from_step(tmp_path / "grid", 3, tmp_path / "one"), 1, **{"parallel.zero_stage": 2})
    assert "converted universal checkpoint" in out and "world 1 = tp 1 x dp 1 | zero 2" in out, out[-3000:]
    continues(tmp_path / "one", grid, rel=1e-5)
    # every stage's TP layout maps reached the converter: stage 1's row-parallel weight joined whole
    zero = tmp_path / "one" / "checkpoints" / "step_000003" / "universal" / "zero"
    assert safe_load(zero / "layers.7.attn.o.weight" / "fp32.pt")["param"].shape == (32, 32)

    out = train(tiny_data, from_step(tmp_path / "one", 3, tmp_path / "dp2"), 2)
    assert "reusing universal checkpoint" in out and "world 2 = tp 1 x dp 2" in out, out[-3000:]
    train(tiny_data, tmp_path / "ref", 1)  # an uninterrupted one-process run, resumed at DP=2 from step 3
    train(tiny_data, from_step(tmp_path / "ref", 3, tmp_path / "ref_dp2"), 2)
    continues(tmp_path / "dp2", metrics(tmp_path / "ref_dp2"), rel=1e-5)
    assert metrics(tmp_path / "dp2")[4]["loss"] != grid[4]["loss"]  # (DP=2's micro-batches are others)


@pytest.mark.parametrize("extra, message", [
    ({"parallel.pipeline": 2, "parallel.zero_stage": 2}, "supports ZeRO stages 0 and 1 only"),
    ({"parallel.pipeline": 8}, "parallel.pipeline=8 stages for the 6 blocks"),
])
def test_bad_pipeline_layouts_are_refused(tiny_data, tmp_path, extra, message):
    res = cli("train", "--config", TINY_CONFIG, *tiny_overrides(tiny_data, tmp_path / "run", **{**SUBLLM, **extra}))
    assert res.returncode == 2 and message in res.stdout, res.stdout[-2000:]
    assert not (tmp_path / "run").exists()


def test_nonfinite_loss_under_pp(tiny_data, tmp_path):
    script = Path(__file__).with_name("pipeline_skip_worker.py")
    worker(script, str(tiny_data), str(tmp_path / "z1"), "1", nproc=2, timeout=300)
    r = json.loads((tmp_path / "z1" / "result.json").read_text())
    assert r["poisoned"] == {"skipped": 1.0} and r["untouched"] and r["lr_moved"], r
    assert r["consumed"] == 3 * 8 and all(v == v for v in r["after"].values()), r  # (no NaN after it)
    worker(script, str(tiny_data), str(tmp_path / "z0"), "0", nproc=2, timeout=300)
    r = json.loads((tmp_path / "z0" / "result.json").read_text())
    assert "cannot skip it; stage 1 does" in r["poisoned"]["error"], r
