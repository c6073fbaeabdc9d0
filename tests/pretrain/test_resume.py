"""Kill a run after its step-K checkpoint, resume it: the losses of steps K+1..2K are bit-identical
to an uninterrupted run's, the data order continues exactly, and MLflow keeps one run."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, TINY_CONFIG, cli, subprocess_env, tiny_overrides

K = 6


def metrics(run_dir: Path) -> dict[int, dict]:
    """Last record per step (a killed run may have logged steps that the resumed run repeats)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_resume_after_kill_is_bit_exact(tiny_data, tmp_path):
    args = ["train", "--config", TINY_CONFIG]
    over = dict(**{"training.steps": 2 * K, "checkpoint.every": K, "training.eval_every": K, "data.workers": 1})
    full = cli(*args, *tiny_overrides(tiny_data, tmp_path / "full", **over))
    assert full.returncode == 0, full.stdout[-3000:]

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pretrain", *args, *tiny_overrides(tiny_data, run_dir, **over)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not (latest.is_file() and latest.read_text() == f"step_{K:06d}"):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert latest.read_text() == f"step_{K:06d}", "the kill came too late to test a resume"

    resumed = cli(*args, *tiny_overrides(tiny_data, run_dir, **over))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{K:06d}'} at step {K}" in resumed.stdout

    a, b = metrics(tmp_path / "full"), metrics(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 2 * K + 1))
    for step in range(1, 2 * K + 1):
        for key in ("loss", "lr", "grad_norm", "samples_consumed"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
        assert a[step].get("val_loss") == b[step].get("val_loss")
    assert a[2 * K]["loss"] < a[1]["loss"]

    # one MLflow run for the killed job and its resumption, holding every step
    from mlflow.tracking import MlflowClient

    meta = json.loads((run_dir / "checkpoints" / f"step_{2 * K:06d}" / "frugal.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [meta["mlflow_run_id"]]
    run = runs[0]
    assert run.data.params["model.d_model"] == "32" and run.data.params["layout.dp"] == "1"
    assert int(run.data.params["params_total"]) > 0
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert steps == set(range(1, 2 * K + 1))
    assert "val_loss" in run.data.metrics and "tokens_per_sec" in run.data.metrics

    # the checkpoint is self-contained for generation (tokenizer inside); greedy decoding is deterministic
    outs = [cli("generate", "--checkpoint", str(run_dir), "--prompt", "def ", "--temperature", "0",
                "--max-new-tokens", "8") for _ in range(2)]
    assert outs[0].returncode == 0, outs[0].stdout[-2000:]
    assert "--- sample 0 ---\ndef " in outs[0].stdout
    assert outs[0].stdout.split("--- sample 0 ---")[1] == outs[1].stdout.split("--- sample 0 ---")[1]
