"""launch/slurm.sbatch on a real two-node Slurm cluster (tests/launch/conftest.py): torchrun under
srun on both nodes, rendezvous on the first, a tiny data-parallel run to its checkpoint."""
import re
from pathlib import Path

from parallel.distributed import free_port
from tests.helpers import TINY_CONFIG, run, subprocess_env, tiny_overrides

SCRIPT = "launch/slurm.sbatch"


def sbatch(cluster, log: Path, *args: str, timeout: int = 420) -> tuple[int, str, str]:
    """`sbatch --wait` from the repository root; returns (exit code, sbatch's output, the job's log)."""
    env = cluster.env(subprocess_env(1, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                                     OMP_NUM_THREADS="1"))
    # `timeout` inside, helpers.run's process-group kill outside: sbatch --wait can never hang the suite
    res = run(["timeout", str(timeout), "sbatch", "--wait", f"--output={log}", *args],
              env=env, timeout=timeout + 30)
    return res.returncode, res.stdout, log.read_text() if log.exists() else ""


def test_two_nodes_train_to_a_checkpoint(slurm_cluster, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    over = tiny_overrides(tiny_data, run_dir, **{"tracking.enabled": "false"})
    rc, out, log = sbatch(slurm_cluster, tmp_path / "job.out", "--nodes=2", "--job-name=frugal-test",
                          SCRIPT, TINY_CONFIG, *over)
    assert rc == 0, f"{out}\n{log[-6000:]}\n{slurm_cluster.logs()}"
    assert "2 node(s) x 1 process(es), rendezvous 127.0.0.1:" in log, log[-3000:]
    assert f"run folder (checkpoints, metrics.jsonl, mlflow.db): {run_dir}" in log
    assert re.search(r"world 2 = tp 1 x dp 2\b", log), log[-3000:]
    assert "training finished with exit code 0" in log

    # really two Slurm nodes, one torchrun agent each
    job = re.search(r"Submitted batch job (\d+)", out).group(1)
    info = slurm_cluster.cmd("scontrol", "show", "job", job).stdout
    assert "NodeList=node[1-2]" in info and "NumNodes=2" in info, info

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000006"
    assert (ckpts / "step_000006").is_dir()
    assert any((ckpts / "step_000006").iterdir())


def test_missing_config_is_a_clear_error(slurm_cluster, tmp_path):
    rc, out, log = sbatch(slurm_cluster, tmp_path / "missing.out", SCRIPT, "launch/configs/no-such.yaml",
                          timeout=120)
    assert rc == 2, f"{out}\n{log}"
    assert "error: config launch/configs/no-such.yaml does not exist" in log, log

    rc, out, log = sbatch(slurm_cluster, tmp_path / "noargs.out", SCRIPT, timeout=120)
    assert rc == 2 and "error: no config given; usage: sbatch" in log, f"{out}\n{log}"

    # a bad override fails once, before srun, with the config loader's message
    rc, out, log = sbatch(slurm_cluster, tmp_path / "override.out", SCRIPT, TINY_CONFIG, "training.steps=abc",
                          timeout=120)
    assert rc == 2 and "error:" in log and "training.steps" in log and "srun" not in log, f"{out}\n{log}"


def test_preemption_signal_saves_requeues_and_resumes(slurm_cluster, tiny_data, tmp_path):
    """The time limit's warning (SIGUSR1 to the batch script, as --signal=B:USR1@120 sends it): the
    trainer saves and stops, the script requeues the job, the second start resumes from that checkpoint."""
    import time

    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = 150
    over = tiny_overrides(tiny_data, run_dir, **{"tracking.enabled": "false", "training.steps": steps,
                                                  "checkpoint.every": steps, "training.eval_every": steps})
    # 0.1 s per step: the signal must land before the run's end (a bare tiny run takes ~5 s, and a busy
    # CI machine can be that late with the scancel)
    env = slurm_cluster.env(subprocess_env(1, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                                           OMP_NUM_THREADS="1", FRUGAL_TEST_STEP_DELAY="0.1"))
    res = run(["sbatch", "--parsable", "--nodes=2", f"--output={log}", SCRIPT, TINY_CONFIG, *over],
              env=env, timeout=60)
    assert res.returncode == 0, res.stdout
    job = res.stdout.strip().split(";")[0]

    def state() -> str:
        info = slurm_cluster.cmd("scontrol", "show", "job", job).stdout
        found = re.search(r"JobState=(\w+)", info)
        return found.group(1) if found else "UNKNOWN"

    deadline = time.time() + 240
    while "step 3/" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and state() in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.2)
    assert slurm_cluster.cmd("scancel", "--batch", "--signal=USR1", job).returncode == 0
    released = False
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    while "restart 1" not in log.read_text() or state() not in ended:
        assert "restart 1" in log.read_text() or "training finished" not in log.read_text(), \
            f"the run ended before the signal reached it:\n{log.read_text()[-3000:]}"
        if not released and "requeueing job" in log.read_text() and state() == "PENDING":
            # Slurm holds a requeued job back for a couple of minutes (its BeginTime); shorten that
            # wait, but not to zero: a start in the same second as the requeue meets the first run's
            # revoked credential and fails ("Job credential revoked")
            released = slurm_cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now+3").returncode == 0
        if released and "restart 1" not in log.read_text():
            assert state() not in ended, f"the requeued job did not start: {state()}\n{slurm_cluster.logs()}"
        assert time.time() < deadline + 240, f"{state()}\n{log.read_text()[-4000:]}\n{slurm_cluster.logs()}"
        time.sleep(0.5)
    text = log.read_text()
    assert state() == "COMPLETED", text[-4000:]
    assert "got SIGUSR1" in text and "requeueing job" in text, text[-4000:]
    saved = re.search(r"resumed from \S+step_(\d+) at step (\d+)", text)
    assert saved and 3 <= int(saved.group(2)) < steps, text[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"
