"""Tracker against a real MLflow sqlite store in tmp_path, plus the failure paths."""

import json
import time
import warnings

import pytest

from pretrain.tracking import Tracker, flatten


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def our_warnings(record):
    return [w for w in record if "MLflow" in str(w.message)]


def test_flatten():
    cfg = {"model": {"dim": 512, "act": "swiglu", "layers": [1, 2]}, "lr": 3e-4, "bf16": True}
    assert flatten(cfg) == {
        "model.dim": 512,
        "model.act": "swiglu",
        "model.layers": "[1, 2]",
        "lr": 3e-4,
        "bf16": True,
    }


def test_log_and_resume_same_run(tmp_path):
    from mlflow.tracking import MlflowClient

    params = {"model": {"dim": 64, "layers": [2, 2]}, "train": {"lr": 1e-3}, "notes": "x" * 7000}
    t = Tracker(tmp_path, tracking_uri=None, experiment="exp", run_name="tiny")
    assert t.run_id is not None
    assert (tmp_path / "mlflow.db").exists()  # default store lives in the run dir
    assert str(tmp_path.resolve() / "mlflow.db") in t.ui_command()
    t.log_params(params)
    t.set_tags({"git_sha": "abc123"})
    t.log_text("model:\n  dim: 64\n", "config.yaml")
    for step in (1, 2):
        t.log_metrics({"loss": 4.0 / step, "lr": 1e-3}, step=step)
    t.close("KILLED")
    run_id = t.run_id

    client = MlflowClient(t.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.params["model.dim"] == "64"
    assert run.data.params["model.layers"] == "[2, 2]"
    assert len(run.data.params["notes"]) == 6000  # truncated to MLflow's limit, not rejected
    assert run.data.tags["git_sha"] == "abc123"
    assert run.data.metrics["loss"] == pytest.approx(2.0)
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]

    # The resumed job re-logs the same config (must be silent), then one changed value (warns).
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t2 = Tracker(tmp_path, tracking_uri=None, experiment="exp", run_name="tiny", resume_run_id=run_id)
        assert t2.run_id == run_id
        t2.log_params(params)
        assert our_warnings(record) == []
        t2.log_params({"train": {"lr": 5e-4}})
        assert len(our_warnings(record)) == 1
        assert "train.lr" in str(our_warnings(record)[0].message)
    assert t2.active  # a changed param is not an MLflow failure
    for step in (3, 4):
        t2.log_metrics({"loss": 4.0 / step, "lr": 1e-3}, step=step)
    t2.close()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001"  # params are immutable: original kept
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    rows = read_jsonl(tmp_path / "metrics.jsonl")  # the mirror also spans both jobs
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == 4.0 and rows[0]["time"] > 0


def test_unreachable_server_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"http://127\.0\.0\.1:9 unavailable.*metrics\.jsonl"):
        t = Tracker(tmp_path, tracking_uri="http://127.0.0.1:9", experiment="exp", run_name="r")
    assert time.monotonic() - t0 < 15
    assert t.run_id is None and not t.active
    assert t.ui_command() == "http://127.0.0.1:9"  # a server serves its own UI

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # after the one warning: silent no-ops
        t.log_params({"a": 1})
        t.set_tags({"b": "c"})
        t.log_text("x", "x.txt")
        t.log_metrics({"loss": 1.5}, step=1)
        t.close("FAILED")
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1.5]


def test_failure_mid_run_disables_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    t = Tracker(tmp_path, tracking_uri=f"sqlite:///{tmp_path}/shared.db", experiment="e", run_name="r")
    assert t.active
    t.log_metrics({"loss": 3.0}, step=1)

    def broken(*args, **kwargs):
        raise ConnectionError("database is gone")

    monkeypatch.setattr(MlflowClient, "log_batch", broken)
    with pytest.warns(RuntimeWarning, match="database is gone"):
        t.log_metrics({"loss": 2.0}, step=2)
    assert not t.active and t.run_id is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.log_metrics({"loss": 1.0}, step=3)
        t.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    # Artifacts go next to the db, not into ./mlruns of whatever the cwd happened to be.
    exp = MlflowClient(t.tracking_uri).get_experiment_by_name("e")
    assert exp.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()


def test_disabled_writes_only_jsonl(tmp_path):
    t = Tracker(tmp_path, tracking_uri=None, experiment="e", run_name="r", enabled=False)
    t.log_params({"a": 1})
    t.log_metrics({"loss": 2.0}, step=7)
    t.close()
    assert t.run_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["step"] == 7


def test_non_rank0_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    t = Tracker(run_dir, tracking_uri=None, experiment="e", run_name="r", is_rank0=False)
    t.log_params({"a": 1})
    t.set_tags({"b": 2})
    t.log_text("x", "x.txt")
    t.log_metrics({"loss": 2.0}, step=1)
    t.close()
    assert t.run_id is None
    assert not run_dir.exists()
