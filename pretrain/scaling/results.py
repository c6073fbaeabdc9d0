"""`scaling fit`: read a study's runs back from MLflow, fit L(N, D) per architecture, plot, and log
the fit as its own MLflow run (under the study's parent run) with the plots as artifacts.

One point per WSD decay end of every finished or partial run: (N, D, val_loss_decayed). N is the
study's n_kind count logged by the trainer; D = step x tokens_per_step; FLOPs = the trainer's
FLOPs per token x D; GPU-hours from the run's median measured tokens/s (its speed, not an MFU
guess, so SUBLLM's and ternary's speed shows in the speed-adjusted frontier)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from pretrain.errors import FrugalError
from pretrain.scaling.fit import Point, fits_from_report, markdown_table, report
from pretrain.scaling.study import Study


def collect_points(study: Study) -> dict[str, list[Point]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=study.uri())
    runs = study.mlflow_runs("run")
    if not runs:
        raise FrugalError(f"study {study.name}: no runs in MLflow experiment {study.experiment!r} at "
                          f"{study.uri()}; run `python -m pretrain scaling run --study {study.name}` first")
    n_key = "params_non_embedding" if study.n_kind == "non_embedding" else "params_total"
    by_arch: dict[str, list[Point]] = {}
    for run in runs:
        params, tags = run.data.params, run.data.tags
        if n_key not in params or "tokens_per_step" not in params:
            continue  # a run that died before logging its parameters
        n, per_step, fpt = float(params[n_key]), int(params["tokens_per_step"]), float(params["flops_per_token"])
        gpus = int(params.get("layout.world_size", 1))
        speed = [m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_sec")]
        tokens_per_sec = statistics.median(speed) if speed else None
        latest: dict[int, float] = {}  # a branch re-run after a resume logs again: keep the last value
        for m in sorted(client.get_metric_history(run.info.run_id, "val_loss_decayed"), key=lambda m: m.timestamp):
            latest[m.step] = m.value
        for step, loss in sorted(latest.items()):
            d = step * per_step
            by_arch.setdefault(tags["arch"], []).append(Point(
                arch=tags["arch"], n=n, d=d, loss=loss, flops=fpt * d, run=run.info.run_name,
                gpu_hours=d / tokens_per_sec * gpus / 3600 if tokens_per_sec else None))
    if not by_arch:
        raise FrugalError(f"study {study.name}: no run has reached a decay end yet (no val_loss_decayed in "
                          f"{study.uri()})")
    return by_arch


def points_table(by_arch: dict[str, list[Point]]) -> str:
    lines = ["| run | N | D | FLOPs | val loss | GPU-hours |", "|---|---:|---:|---:|---:|---:|"]
    for arch in sorted(by_arch):
        for p in sorted(by_arch[arch], key=lambda p: (p.n, p.d)):
            hours = f"{p.gpu_hours:.4f}" if p.gpu_hours is not None else "-"
            lines.append(f"| {p.run} | {p.n / 1e6:.2f}M | {p.d / 1e6:.1f}M | {p.flops:.3g} | {p.loss:.4f} | {hours} |")
    return "\n".join(lines)


def fit_study(study: Study, *, bootstrap: int = 200) -> dict:
    """Fit, plot, write <dir>/fit/ (fit.json, fit.md, PNGs) and log the fit run; returns the report."""
    from pretrain.scaling.plots import plot_all
    from pretrain.tracking import Tracker

    by_arch = collect_points(study)
    rep = report(by_arch, targets=study.predict, bootstrap_samples=bootstrap)
    out = Path(study.dir) / "fit"
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(by_arch, fits_from_report(rep), out, budgets=study.tokens.budgets)
    table = markdown_table(rep)
    (out / "fit.json").write_text(json.dumps({"report": rep, "points": {
        a: [p.__dict__ for p in pts] for a, pts in by_arch.items()}}, indent=1))
    (out / "fit.md").write_text(f"## Fit\n\n{table}\n\n## Points\n\n{points_table(by_arch)}\n")

    parent = study.mlflow_runs("study", max_results=1)
    tags = {"study": study.name, "role": "fit"}
    with Tracker(out, tracking_uri=study.uri(), experiment=study.experiment, run_name=f"fit-{study.name}",
                 parent_run_id=parent[0].info.run_id if parent else None, tags=tags) as tracker:
        params, metrics = {}, {}
        for arch, entry in rep.items():
            params[f"{arch}.n_points"] = entry["n_points"]
            for k, v in entry.get("fit", {}).items():
                metrics[f"{arch}.{k}"] = v
            ci = entry.get("ci", {})
            for k, (lo, hi) in ({} if "error" in ci else ci).items():
                metrics[f"{arch}.{k}_lo"], metrics[f"{arch}.{k}_hi"] = lo, hi
            loo = entry.get("leave_largest_out", {})
            if "mean_abs_rel_error" in loo:
                metrics[f"{arch}.leave_largest_out_error"] = loo["mean_abs_rel_error"]
        tracker.log_params({**params, "bootstrap": bootstrap, "n_kind": study.n_kind})
        tracker.log_metrics(metrics, step=0)
        for path in [*plots, out / "fit.json", out / "fit.md"]:
            tracker.log_artifact(path)
    return {"report": rep, "table": table, "plots": plots, "dir": out}
