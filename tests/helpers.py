"""Test helpers: launchers for the CLI and for multi-process (torchrun + gloo) workers, each with a
hard timeout so nothing can hang CI, and the overrides that shrink a config to unit-test size."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from parallel.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(nproc: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)), CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def run(cmd: list[str], *, nproc: int = 1, timeout: float = 300, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout (the whole process group is killed on expiry)."""
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=env or subprocess_env(nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def torchrun(nproc: int, target: list[str]) -> list[str]:
    """`target` is either ['-m', 'module', ...] or ['script.py', ...]."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]


def cli(*args: str, nproc: int = 1, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pretrain ARGS` (under torchrun when nproc > 1)."""
    cmd = torchrun(nproc, ["-m", "pretrain", *args]) if nproc > 1 else [sys.executable, "-m", "pretrain", *args]
    return run(cmd, nproc=nproc, timeout=timeout, env=env)


def worker(script: Path, *args: str, nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    res = run(torchrun(nproc, [str(script), *args]), nproc=nproc, timeout=timeout)
    assert res.returncode == 0, res.stdout[-6000:]
    return res


def stdlib_files(n: int) -> list[str]:
    """Real text for tests: the first n modules of this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(root.glob("*.py"))[:n]]


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides that make tiny-llama.yaml fit a unit test."""
    base = {"dir": str(run_dir), "data.path": str(data), "data.workers": 0, "model.structure": "TT",
            "model.d_model": 32, "model.n_heads": 4, "model.n_kv_heads": 2, "model.ffn_hidden": 64,
            "model.seq_len": 32, "training.micro_batch_size": 4, "training.global_batch_size": 8,
            "training.steps": 6, "training.eval_every": 3, "training.eval_batches": 2, "training.log_every": 1,
            "schedule.warmup_steps": 2, "checkpoint.every": 3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


TINY_CONFIG = str(REPO / "launch/configs/tiny-llama.yaml")
