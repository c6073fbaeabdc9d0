"""A whole tiny study through the CLI: plan -> run (2 sizes x 3 token counts, two runs at once) ->
fit. Runs nest under the study's MLflow parent run, every decay end is logged, a second `run`
skips the finished runs, the fit is its own MLflow run with the plots; --slurm writes an array job."""
import subprocess

import pytest
import yaml

from tests.helpers import cli


def test_tiny_study_end_to_end(tiny_data, tmp_path):
    study = {
        "name": "e2e", "dir": str(tmp_path / "study"), "data": str(tiny_data), "seq_len": 32,
        "architectures": {"llama": {"config": "launch/configs/tiny-llama.yaml",
                                    "overrides": {"data.workers": 0, "training.eval_batches": 2}}},
        "sizes": [{"name": "d16", "d_model": 16, "n_layers": 2, "n_heads": 2},
                  {"name": "d32", "d_model": 32, "n_layers": 2, "n_heads": 2}],
        "tokens": {"budgets": [3e9, 6e9, 1.2e10]},
        "rules": {"max_batch_tokens": 128, "min_steps": 4},
        "resources": {"micro_batch_size": 4, "concurrent": 2},
        "eval_batches": 2,
    }
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(study))

    plan = cli("scaling", "plan", "--study", str(path), timeout=120)
    assert plan.returncode == 0 and "llama-d32-s0" in plan.stdout, plan.stdout[-3000:]
    run = cli("scaling", "run", "--study", str(path), timeout=400)
    assert run.returncode == 0, run.stdout[-4000:]
    assert "all 2 runs finished" in run.stdout
    again = cli("scaling", "run", "--study", str(path), timeout=120)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2, again.stdout[-3000:]

    fit = cli("scaling", "fit", "--study", str(path), "--bootstrap", "20", timeout=300)
    assert fit.returncode == 0, fit.stdout[-4000:]
    assert "| llama | 6 |" in fit.stdout  # 2 sizes x 3 decay ends
    out = tmp_path / "study" / "fit"
    for name in ("loss_vs_flops.png", "isoflop.png", "fit_vs_observed.png", "speed_frontier.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("scaling-e2e")
    runs = {r.data.tags["role"]: r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") != "run"}
    children = client.search_runs([exp.experiment_id], "tags.role = 'run'")
    parent = runs["study"].info.run_id
    assert sorted(r.info.run_name for r in children) == ["llama-d16-s0", "llama-d32-s0"]
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent and r.info.status == "FINISHED"
        decayed = client.get_metric_history(r.info.run_id, "val_loss_decayed")
        assert len(decayed) == 3 and all(m.value > 0 for m in decayed)
        assert "tokens" in r.data.metrics and "flops_per_token" in r.data.params
        assert int(r.data.tags["n"]) == int(r.data.params["params_non_embedding"])  # tagged N, D, FLOPs/token
        assert int(r.data.tags["d_max"]) == int(r.data.params["training.steps"]) * int(r.data.params["tokens_per_step"])
        assert float(r.data.tags["flops_per_token"]) == pytest.approx(float(r.data.params["flops_per_token"]))
    fit_run = runs["fit"]
    assert fit_run.data.tags["mlflow.parentRunId"] == parent and "llama.alpha" in fit_run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(fit_run.info.run_id)}
    assert {"loss_vs_flops.png", "speed_frontier.png", "fit.json"} <= artifacts

    # every run finished: nothing left for slurm (a clear error, exit 2); a partial study writes a job
    done = cli("scaling", "run", "--study", str(path), "--slurm", timeout=120)
    assert done.returncode == 2 and "nothing to submit" in done.stdout
    study["sizes"].append({"name": "d48", "d_model": 48, "n_layers": 2, "n_heads": 2})
    path.write_text(yaml.safe_dump(study))
    slurm = cli("scaling", "run", "--study", str(path), "--slurm", timeout=120)
    assert slurm.returncode == 0, slurm.stdout[-3000:]
    sbatch = tmp_path / "study" / "slurm" / "array.sbatch"
    text = sbatch.read_text()
    assert "#SBATCH --array=0-0%2" in text and "llama-d48-s0.yaml" in text and "launch/torchrun.sh" in text
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0
