"""Experiment tracking: one MLflow run per training job, plus a metrics.jsonl mirror.

Only global rank 0 talks to MLflow; on every other rank each method is a no-op, so the
trainer can call the tracker unconditionally.

Tracking must never take training down. Any exception from MLflow (at start or later)
produces one warning, after which MLflow is switched off for the rest of the job. The
metrics.jsonl mirror in run_dir is written regardless, so a run with a dead tracking
server still leaves a complete, greppable metric log behind.

MLflow is imported lazily (inside the class): importing it costs seconds and pulls in a
large dependency tree, which the non-zero ranks and quick CLI commands should not pay for.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# MLflow's own limits (mlflow.utils.validation). Copied so this module does not have to
# import mlflow just to know them.
MAX_PARAM_VAL_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# MLflow's HTTP defaults are 7 retries with exponential backoff and a 120 s timeout: an
# unreachable server stalls the first training step for minutes. For an http(s) tracking
# uri we use these instead, unless the user set the variables themselves.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

Scalar = str | int | float | bool


def flatten(d: dict, prefix: str = "") -> dict[str, Scalar]:
    """Nested dicts -> {"a.b.c": value}. Lists, tuples and other non-scalars become their repr;
    None becomes "None" (MLflow params are strings anyway)."""
    out: dict[str, Scalar] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        else:
            out[name] = repr(value)
    return out


def default_tracking_uri(run_dir: Path) -> str:
    # mlflow >= 3 refuses the plain ./mlruns file store, so the default is a sqlite db per run dir.
    return f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def _param_value(value: Scalar) -> str:
    """What MLflow will store for a param value: a string of at most 6000 chars."""
    s = str(value)
    if len(s) > MAX_PARAM_VAL_LENGTH:
        marker = "...[truncated]"
        s = s[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
    return s


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        *,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        enabled: bool = True,
        is_rank0: bool = True,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri or default_tracking_uri(self.run_dir)
        self.is_rank0 = is_rank0
        self._client = None  # MlflowClient while MLflow is usable, else None
        self._run_id: str | None = None
        self._jsonl = None
        self._closed = False
        if not is_rank0:
            return  # non-zero ranks create nothing: no directory, no files, no run

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Append mode: a resumed job keeps extending the same mirror.
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if enabled:
            self._start(experiment, run_name, resume_run_id)
            # mlflow.parentRunId is how MLflow nests runs (a scaling study's parent run)
            self.set_tags({**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})

    # ---- lifecycle ---------------------------------------------------------------------------

    def _start(self, experiment: str, run_name: str, resume_run_id: str | None) -> None:
        if urlparse(self.tracking_uri).scheme in ("http", "https"):
            for k, v in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            if resume_run_id is not None:
                # Reopen the run the previous job wrote to, so the resumed job's metrics
                # continue the same curves instead of starting a new run.
                client.update_run(resume_run_id, status="RUNNING")
                self._run_id = resume_run_id
            else:
                exp = client.get_experiment_by_name(experiment)
                if exp is not None:
                    exp_id = exp.experiment_id
                else:
                    exp_id = client.create_experiment(
                        experiment, artifact_location=self._artifact_location()
                    )
                self._run_id = client.create_run(exp_id, run_name=run_name).info.run_id
            self._client = client
        except Exception as e:  # noqa: BLE001 - whatever MLflow throws, training goes on
            self._run_id = None
            self._disable(e)

    def _artifact_location(self) -> str | None:
        """For a local sqlite store, put artifacts next to the db file. Left to itself MLflow
        would use ./mlruns relative to whatever the current working directory happens to be.
        For a server (http) the server decides."""
        parsed = urlparse(self.tracking_uri)
        if parsed.scheme != "sqlite":
            return None
        db_path = self.tracking_uri[len("sqlite:///") :]
        if not db_path or db_path == ":memory:":
            return None
        return (Path(db_path).resolve().parent / "mlartifacts").as_uri()

    def _disable(self, err: BaseException) -> None:
        self._client = None
        warnings.warn(
            f"MLflow tracking at {self.tracking_uri} unavailable: {type(err).__name__}: {err}; "
            "continuing without it (metrics still go to metrics.jsonl)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _call(self, fn, *args, **kwargs) -> Any:
        """Run one MLflow call; on any failure warn once and turn MLflow off for good."""
        if self._client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._disable(e)
            return None

    def close(self, status: str = "FINISHED") -> None:
        """End the run with status FINISHED, FAILED or KILLED. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            self._call(self._client.set_terminated, self._run_id, status=status)
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")

    # ---- properties ----------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None when MLflow is disabled or never came up. Stays None after
        a later failure turns MLflow off too, so nobody tries to resume into a half-written run
        without knowing."""
        return self._run_id if self._client is not None else None

    @property
    def active(self) -> bool:
        return self._client is not None

    def ui_command(self) -> str:
        """What to tell the user to look at the run. A tracking server already serves the UI,
        so for http(s) that is just its address."""
        if urlparse(self.tracking_uri).scheme in ("http", "https"):
            return self.tracking_uri
        return f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}"

    # ---- logging --------------------------------------------------------------------------------

    def log_params(self, params: dict) -> None:
        """Log (nested) params. MLflow params are immutable: on resume an identical value is
        skipped, a changed one is skipped with a warning (the run keeps the original value)."""
        if self._client is None:
            return
        from mlflow.entities import Param

        new = {k: _param_value(v) for k, v in flatten(params).items()}
        run = self._call(self._client.get_run, self._run_id)
        if run is None:
            return
        existing = run.data.params
        changed = sorted(k for k, v in new.items() if k in existing and existing[k] != v)
        if changed:
            warnings.warn(
                f"MLflow run {self._run_id} already has different values for params {changed}; "
                "keeping the originals (MLflow params cannot change)",
                RuntimeWarning,
                stacklevel=2,
            )
        todo = [Param(k, v) for k, v in new.items() if k not in existing]
        for chunk in _chunks(todo, MAX_PARAMS_PER_BATCH):
            self._call(self._client.log_batch, self._run_id, params=chunk, synchronous=True)
            if self._client is None:
                return

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_rank0:
            return
        now = time.time()
        values = {k: float(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            # Written before MLflow so the mirror is complete even if the MLflow call dies.
            self._jsonl.write(json.dumps({"step": step, "time": now, **values}) + "\n")
            self._jsonl.flush()
        if self._client is None:
            return
        from mlflow.entities import Metric

        ts = int(now * 1000)
        batch = [Metric(k, v, ts, step) for k, v in values.items()]
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self._call(self._client.log_batch, self._run_id, metrics=chunk, synchronous=True)
            if self._client is None:
                return

    def set_tags(self, tags: dict) -> None:
        if self._client is None:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(k, _param_value(v)) for k, v in flatten(tags).items()]
        for chunk in _chunks(batch, MAX_PARAMS_PER_BATCH):
            self._call(self._client.log_batch, self._run_id, tags=chunk, synchronous=True)
            if self._client is None:
                return

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store text (e.g. the resolved config YAML) as a run artifact."""
        if self._client is None:
            return
        self._call(self._client.log_text, self._run_id, text, artifact_file)

    def log_artifact(self, path: Path) -> None:
        """Store a file (a plot, a fit report) as a run artifact."""
        if self._client is None:
            return
        self._call(self._client.log_artifact, self._run_id, str(path))
