"""Fault drills (issue 10): a rank killed in the middle of a save, a preemption signal, a corrupted
checkpoint file, a full disk. Each must leave a checkpoint that the next run resumes from, with a clear
message, and never let `latest` name a folder that is not complete.

The test-only hooks (inert unless set): FRUGAL_TEST_SLOW_SAVE=STEP:RANK (that rank sleeps after
writing its files of that step's checkpoint, writing its pid to checkpoints/test_slow_save.pid),
FRUGAL_TEST_FAIL_SAVE=STEP (that step's checkpoint write fails with ENOSPC), FRUGAL_TEST_STEP_DELAY
(seconds slept after each step, so that a signal lands mid-run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, TINY_CONFIG, cli, subprocess_env, tiny_overrides, torchrun


def tag(step: int) -> str:
    return f"step_{step:06d}"


def metrics(run_dir: Path) -> dict[int, dict]:
    """Last record per step (a killed run may have logged steps that the resumed run repeats)."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written while we read
            pass
    return {r["step"]: r for r in rows if "loss" in r}


class Run:
    """`python -m pretrain train ...` in the background (under torchrun when nproc > 1), output to a file."""

    def __init__(self, tmp: Path, nproc: int, overrides: list[str], **env: str):
        args = ["train", "--config", TINY_CONFIG, *overrides]
        cmd = torchrun(nproc, ["-m", "pretrain", *args]) if nproc > 1 else [sys.executable, "-m", "pretrain", *args]
        self.log = tmp / f"run-{time.monotonic_ns()}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(nproc, **env), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                raise AssertionError(f"condition not reached (rc {self.proc.returncode}):\n{self.output()[-4000:]}")
            time.sleep(0.01)

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"timed out after {timeout}s:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text()

    def worker_pid(self, rank: int) -> int:
        """The pid of torchrun's worker of this rank."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        raise AssertionError(f"no worker of rank {rank} among {children}")


def test_dp2_kill_mid_save_corrupt_file_and_preempt_one_rank(tiny_data, tmp_path):
    run_dir, over = tmp_path / "run", {"training.steps": 9, "checkpoint.every": 3, "training.eval_every": 3}
    ck = run_dir / "checkpoints"

    # 1. rank 1 is SIGKILLed after writing its step-6 files, before the checkpoint is complete
    run = Run(tmp_path, 2, tiny_overrides(tiny_data, run_dir, **over), FRUGAL_TEST_SLOW_SAVE="6:1")
    pidfile = ck / "test_slow_save.pid"
    run.wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip())
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert run.finish(timeout=120) != 0
    pidfile.unlink()
    assert (ck / "latest").read_text() == tag(3)
    assert (ck / tag(6)).is_dir() and not (ck / tag(6) / "manifest.json").exists()  # half-written, never named

    # 2. the next run resumes from the previous complete checkpoint and trains on
    res = cli("train", "--config", TINY_CONFIG, *tiny_overrides(tiny_data, run_dir, **over), nproc=2, timeout=240)
    assert res.returncode == 0, res.stdout[-4000:]
    assert f"resumed from {ck / tag(3)} at step 3" in res.stdout
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, 10)) and m[9]["loss"] < m[1]["loss"]
    assert (ck / "latest").read_text() == tag(9)
    manifest = json.loads((ck / tag(9) / "manifest.json").read_text())
    assert manifest["layout"] == {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 1, "world_size": 2}
    assert {f["name"] for f in manifest["files"]} >= {"frugal.json", "mp_rank_00_model_states.pt",
                                                       "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank00001.pt"}
    assert sorted(p.name for p in ck.glob("step_*")) == [tag(6), tag(9)]  # keep_last=2

    # 3. flipped bytes in a shard of the newest checkpoint: detected, warned about, the previous one used
    shard = ck / tag(9) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 16] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 16])
    shard.write_bytes(bytes(raw))
    # ... and this run is preempted: SIGUSR1 reaches rank 1 only; both ranks stop after the same step
    over.update({"training.steps": 30, "checkpoint.every": 3})
    run = Run(tmp_path, 2, tiny_overrides(tiny_data, run_dir, **over), FRUGAL_TEST_STEP_DELAY="0.3")
    run.wait_for(lambda: max(metrics(run_dir)) >= 11)
    os.kill(run.worker_pid(1), signal.SIGUSR1)
    assert run.finish(timeout=120) == 0, run.output()[-4000:]
    out = run.output()
    assert f"checkpoint {ck / tag(9)} failed verification: {shard} is corrupted" in out, out[-4000:]
    assert f"falling back to the previous complete checkpoint {ck / tag(6)}" in out
    assert f"resumed from {ck / tag(6)} at step 6" in out
    assert "received SIGUSR1" in out
    stopped = max(metrics(run_dir))
    assert 11 <= stopped < 30
    assert f"step {stopped}: stop signal received; checkpoint {tag(stopped)} saved, exiting with code 0" in out
    assert (ck / "latest").read_text() == tag(stopped)
    assert (ck / tag(stopped) / "manifest.json").is_file()
    assert "rng_rank00001.pt" in (ck / tag(stopped) / "manifest.json").read_text()


def test_sigterm_resume_bit_exact_then_disk_full(tiny_data, tmp_path):
    over = {"training.steps": 20, "checkpoint.every": 4, "training.eval_every": 4, "checkpoint.keep_last": 3}
    full = cli("train", "--config", TINY_CONFIG, *tiny_overrides(tiny_data, tmp_path / "full", **over), timeout=240)
    assert full.returncode == 0, full.stdout[-3000:]

    # 1. SIGTERM mid-run: the step finishes, a checkpoint of it is saved, exit code 0
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    run = Run(tmp_path, 1, tiny_overrides(tiny_data, run_dir, **over), FRUGAL_TEST_STEP_DELAY="0.3")
    run.wait_for(lambda: max(metrics(run_dir), default=0) >= 5)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 0, run.output()[-4000:]
    stopped = max(metrics(run_dir))
    assert 5 <= stopped < 12 and stopped % 4, f"the signal came too late to test (step {stopped})"
    assert (ck / "latest").read_text() == tag(stopped)
    assert "stop signal received" in run.output()

    # 2. the requeued job resumes there and its steps equal the uninterrupted run's, bit for bit, ...
    # 3. ... until the disk is full while saving step 16: a clear error naming the path, exit 2, the
    #    step-12 checkpoint intact and still `latest`, the unfinished folder gone
    res = cli("train", "--config", TINY_CONFIG, *tiny_overrides(tiny_data, run_dir, **over), timeout=240,
              env=subprocess_env(FRUGAL_TEST_FAIL_SAVE="16"))
    assert f"resumed from {ck / tag(stopped)} at step {stopped}" in res.stdout, res.stdout[-3000:]
    a, b = metrics(tmp_path / "full"), metrics(run_dir)
    assert sorted(b) == list(range(1, 17))
    for step in range(1, 17):
        for key in ("loss", "lr", "grad_norm", "samples_consumed"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
        assert a[step].get("val_loss") == b[step].get("val_loss")

    assert res.returncode == 2, res.stdout[-3000:]
    assert f"saving checkpoint {ck / tag(16)} failed" in res.stdout
    assert "No space left on device" in res.stdout and str(ck / tag(16)) in res.stdout
    assert "Traceback" not in res.stdout
    assert (ck / "latest").read_text() == tag(12)
    assert not (ck / tag(16)).exists()
    from pretrain.checkpoint import check_folder

    assert check_folder(ck / tag(12)) is None  # every file as its manifest says
    assert {p.name for p in ck.glob("step_*")} == {tag(stopped), tag(8), tag(12)}


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_runs_pickled_code(tmp_path):
    import pickle

    import pytest
    import torch

    from pretrain.checkpoint import CheckpointError, _read_module
    from pretrain.safe_load import safe_load

    marker, f = tmp_path / "pwned", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match="cannot read the module weights"):
        _read_module(f, 1)
    with pytest.raises(pickle.UnpicklingError):
        safe_load(f)
    assert not marker.exists()


def test_fallback_and_prune_on_fake_checkpoints(tmp_path, capsys):
    """Selection and pruning without a training run: folders with a manifest are complete."""
    import pytest

    from pretrain import checkpoint as ckpt

    ck = tmp_path / "checkpoints"

    def make(step: int, manifest: bool = True, fmt: int = ckpt.FORMAT) -> Path:
        path = ck / tag(step)
        path.mkdir(parents=True)
        (path / "shard.pt").write_bytes(bytes(range(200)) * step)
        (path / ckpt.META).write_text(json.dumps({"step": step, "checkpoint_format": fmt}))
        if manifest:
            ckpt._write_manifest(path, step, {"tp": 1})
        return path

    make(2, fmt=1, manifest=False)  # a checkpoint from before manifests
    for s in (4, 6, 8):
        make(s)
    make(10, manifest=False)  # an unfinished save
    (ck / "latest").write_text(tag(8))
    assert ckpt.newest_complete(ck) == ck / tag(8)
    # an old checkpoint without a manifest loads, unverified
    assert ckpt.resolve_resume(str(ck / tag(2)), ck) == ck / tag(2)
    assert "loading it unverified" in capsys.readouterr().out

    (ck / tag(8) / "shard.pt").write_bytes(b"x" * (200 * 8))  # same size, other bytes
    (ck / tag(6) / "shard.pt").unlink()
    assert ckpt.newest_complete(ck) == ck / tag(4)
    err = capsys.readouterr().out
    assert f"{ck / tag(8) / 'shard.pt'} is corrupted" in err and f"{ck / tag(6) / 'shard.pt'} is missing" in err
    assert ckpt.newest_complete(ck, verify=False) == ck / tag(8)  # sizes only

    # pruning after a save at step 5 that fell back to 4: keeps 4 (protected) and 5, and 6/8/10 (newer);
    # 2 (complete, older) goes
    make(5)
    ckpt._prune(ck, keep_last=1, current=tag(5), protect=tag(4))
    assert sorted(p.name for p in ck.glob("step_*")) == [tag(s) for s in (4, 5, 6, 8, 10)]
    ckpt._prune(ck, keep_last=1, current=tag(5))
    assert sorted(p.name for p in ck.glob("step_*")) == [tag(s) for s in (5, 6, 8, 10)]

    # nothing verifies: a clear error, nothing deleted
    names_before = sorted(p.name for p in ck.glob("step_*"))
    (ck / "latest").write_text(tag(8))
    (ck / tag(5) / "shard.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* verifies"):
        ckpt.newest_complete(ck)
    assert sorted(p.name for p in ck.glob("step_*")) == names_before

