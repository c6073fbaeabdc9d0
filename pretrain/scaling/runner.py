"""`scaling run`: the study's parent MLflow run, one config file per run, and the runs themselves —
here one after another (or a few at once), or as a slurm array job.

Every run is an ordinary `python -m pretrain train --config <study dir>/configs/<run>.yaml` (under
torchrun when it has several GPUs): it nests its MLflow run under the study's parent run, resumes
from its own latest checkpoint if it was interrupted, and a finished run is skipped, so
`scaling run` can simply be started again after a failure or a preemption."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain.errors import FrugalError
from pretrain.scaling.plan import RunPlan, describe
from pretrain.scaling.study import Study

REPO = Path(__file__).resolve().parents[2]


def parent_run(study: Study, study_file: Path, plans: list[RunPlan]) -> str:
    """The study's parent MLflow run (created once, found again by its tags)."""
    from pretrain.tracking import Tracker

    found = study.mlflow_runs("study", max_results=1)
    if found:
        return found[0].info.run_id
    with Tracker(Path(study.dir), tracking_uri=study.uri(), experiment=study.experiment,
                 run_name=f"study-{study.name}", tags={"study": study.name, "role": "study"}) as tracker:
        if tracker.run_id is None:
            raise FrugalError(f"cannot create the study's MLflow run at {study.uri()}")
        tracker.log_params({"study": study.model_dump(mode="json")})
        tracker.log_text(study_file.read_text(), "study.yaml")
        tracker.log_text(json.dumps(describe(plans), indent=1), "plan.json")
        return tracker.run_id


def write_configs(study: Study, plans: list[RunPlan], parent_id: str) -> dict[str, Path]:
    """One self-contained run config per run (what a slurm task or a user re-running it reads)."""
    folder = Path(study.dir) / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for p in plans:
        cfg = p.config.model_copy(deep=True)
        cfg.tracking.parent_run_id = parent_id
        path = folder / f"{p.name}.yaml"
        path.write_text(cfg.to_yaml())
        paths[p.name] = path
    (folder / "plan.json").write_text(json.dumps(describe(plans), indent=1))
    return paths


def is_finished(plan: RunPlan) -> bool:
    from pretrain import checkpoint as ckpt

    latest = ckpt.read_latest(Path(plan.config.dir) / "checkpoints")
    return latest is not None and ckpt.read_meta(latest)["step"] >= plan.steps


def train_command(plan: RunPlan, config: Path) -> list[str]:
    if plan.gpus == 1:
        return [sys.executable, "-m", "pretrain", "train", "--config", str(config)]
    # --standalone: a local rendezvous on a free port, so runs started together never collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(plan.gpus),
            "-m", "pretrain", "train", "--config", str(config)]


def _child_env(gpus: list[int] | None, processes: int) -> dict[str, str]:
    # a parent launched under torchrun must not hand its rendezvous to the children
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # the cores are shared by every training process running at once (and their loader workers)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env


def _gpu_slots(plans: list[RunPlan], concurrent: int) -> list[list[int] | None]:
    """GPUs for each concurrent slot: disjoint when the machine has enough, else shared (small
    models that cannot fill a GPU alone run several to one)."""
    try:
        import torch

        n = torch.cuda.device_count()
    except ImportError:
        n = 0
    if n == 0:
        return [None] * concurrent
    need = max(p.gpus for p in plans)
    return [[(slot * need + i) % n for i in range(need)] for slot in range(concurrent)]


def run_local(study: Study, plans: list[RunPlan], configs: dict[str, Path], *, concurrent: int) -> list[str]:
    """Run the unfinished runs, `concurrent` at a time; returns the names of those that failed."""
    todo = [p for p in plans if not is_finished(p)]
    for p in plans:
        if p not in todo:
            print(f"[scaling] {p.name}: finished earlier, skipped", flush=True)
    slots = _gpu_slots(plans, max(1, concurrent))
    free, running, failed = list(range(len(slots))), {}, []
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a job's time limit / preemption: stop the children too
    try:
        _loop(todo, configs, slots, free, running, failed)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in running:  # interrupted: each child stops and resumes later from its checkpoint
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return failed


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _loop(todo, configs, slots, free, running, failed) -> None:
    while todo or running:
        while todo and free:
            p, slot = todo.pop(0), free.pop(0)
            log = Path(p.config.dir) / "train.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as out:
                proc = subprocess.Popen(train_command(p, configs[p.name]), stdout=out, stderr=subprocess.STDOUT,
                                        env=_child_env(slots[slot], len(slots) * p.gpus), cwd=REPO)
            running[proc] = (p, slot, time.time())
            print(f"[scaling] {p.name}: started ({p.steps} steps, log {log})", flush=True)
        time.sleep(0.5)
        for proc in [q for q in running if q.poll() is not None]:
            p, slot, t0 = running.pop(proc)
            free.append(slot)
            ok = proc.returncode == 0
            print(f"[scaling] {p.name}: {'finished' if ok else f'FAILED (exit {proc.returncode})'} in "
                  f"{time.time() - t0:.0f}s", flush=True)
            if not ok:
                failed.append(p.name)


SBATCH = """#!/usr/bin/env bash
# Study {name}: one slurm array task per run (written by `python -m pretrain scaling run --slurm`).
#SBATCH --job-name=scaling-{name}
#SBATCH --array=0-{last}%{concurrent}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --output={logs}/%x-%A_%a.out
#SBATCH --requeue
set -euo pipefail
cd {repo}
configs=({configs})
# launch/torchrun.sh: one process per GPU; the run resumes from its latest checkpoint when requeued
NPROC_PER_NODE={gpus} MASTER_PORT=$((20000 + SLURM_ARRAY_TASK_ID)) exec launch/torchrun.sh "${{configs[$SLURM_ARRAY_TASK_ID]}}"
"""


def write_sbatch(study: Study, plans: list[RunPlan], configs: dict[str, Path]) -> Path:
    todo = [p for p in plans if not is_finished(p)]
    if not todo:
        raise FrugalError(f"study {study.name}: every run has finished; nothing to submit")
    if len({p.gpus for p in todo}) != 1:
        raise FrugalError("a slurm array needs the same GPU count for every run")
    folder = Path(study.dir).resolve()
    (folder / "slurm").mkdir(parents=True, exist_ok=True)
    path = folder / "slurm" / "array.sbatch"
    path.write_text(SBATCH.format(
        name=study.name, last=len(todo) - 1, concurrent=max(1, study.resources.concurrent), gpus=todo[0].gpus,
        logs=folder / "slurm", repo=REPO, configs=" ".join(shlex.quote(str(configs[p.name].resolve())) for p in todo)))
    path.chmod(0o755)
    return path
