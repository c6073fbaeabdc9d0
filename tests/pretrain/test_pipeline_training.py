"""`python -m pretrain train` with parallel.pipeline=2 (two processes, gloo), SUBLLM with tied
embeddings: every step's loss, LR, grad norm and val loss (top-k and the inference rule's) equal the
one-process run's; a resume from
the step-3 checkpoint equals the uninterrupted pipeline run bit for bit; `generate` on the pipeline
checkpoint (its stages' layer files merged) writes the one-process checkpoint's text; a non-finite
loss skips its step under ZeRO-1 and stops ZeRO-0 with a clear error; bad layouts are refused before
any process group starts."""
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
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "pp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    (resumed / "checkpoints" / "latest").write_text("step_000003")
    (resumed / "metrics.jsonl").write_text("")
    out = train(tiny_data, resumed, 2, **{"parallel.pipeline": 2})
    assert "at step 3" in out
    again = metrics(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in again:
        for key in ("loss", "lr", "grad_norm", "val_loss", "samples_consumed"):
            assert again[step].get(key) == pp[step].get(key), (step, key)

    # generation merges the stages' layer files: the same text as the one-process checkpoint
    texts = []
    for run in ("pp", "one"):
        res = cli("generate", "--checkpoint", str(tmp_path / run), "--prompt", "def ", "--max-new-tokens", "12",
                  "--seed", "0")
        assert res.returncode == 0, res.stdout[-3000:]
        texts.append(res.stdout.strip().splitlines())
    assert texts[0] == texts[1]

    # a pipeline checkpoint resumes at its own pipeline size only
    res = cli("train", "--config", TINY_CONFIG, *tiny_overrides(tiny_data, tmp_path / "pp", **SUBLLM))
    assert res.returncode == 2 and "written at parallel.pipeline=2" in res.stdout, res.stdout[-2000:]


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
