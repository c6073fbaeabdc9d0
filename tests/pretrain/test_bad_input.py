"""Bad input gets a clear error naming the problem, exit code 2, and nothing already saved changes."""
import hashlib
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY_CONFIG, cli, subprocess_env, tiny_overrides


def train(data, run_dir, *extra, env=None):
    return cli("train", "--config", TINY_CONFIG, *tiny_overrides(data, run_dir), *extra, env=env, timeout=240)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_error(res, *needles):
    assert res.returncode == 2, res.stdout[-3000:]
    for n in needles:
        assert n in res.stdout, (n, res.stdout[-3000:])
    assert "Traceback" not in res.stdout


@pytest.mark.parametrize("extra, needles, env", [
    (["model.n_layers=4"], ["model.n_layers: unknown key"], None),
    (["parallel.tensor=2", "model.n_heads=2", "model.n_kv_heads=1"],
     ["model.n_kv_heads=1 is not divisible by parallel.tensor=2"], {"WORLD_SIZE": "2"}),
    (["data.path=/nonexistent/frugal-data"], ["/nonexistent/frugal-data"], None),
])
def test_config_errors_fail_fast(tiny_data, tmp_path, extra, needles, env):
    res = train(tiny_data, tmp_path / "run", *extra, env=env and subprocess_env(**env))
    expect_error(res, *needles)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_damaged_data_and_foreign_checkpoints_leave_checkpoints_untouched(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    ok = train(tiny_data, run_dir, "training.steps=3")
    assert ok.returncode == 0, ok.stdout[-3000:]
    before = snapshot(run_dir / "checkpoints")
    assert "latest" in before

    # a checkpoint of another architecture
    res = train(tiny_data, run_dir, "training.steps=6", "model.d_model=64")
    expect_error(res, "was written for another model", "model.d_model: checkpoint has 32, this run has 64")
    # refusing to start over on top of existing checkpoints
    res = train(tiny_data, run_dir, "training.steps=6", "checkpoint.resume=never")
    expect_error(res, "checkpoint.resume=never", "refusing to overwrite")
    assert snapshot(run_dir / "checkpoints") == before

    # a truncated shard is caught before training starts
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = sorted(data.glob("train-*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    res = train(data, run_dir, "training.steps=6")
    expect_error(res, shard.name)
    assert snapshot(run_dir / "checkpoints") == before

    # a corrupted shard (same size, garbage inside) is caught when it is read
    shutil.rmtree(data)
    shutil.copytree(tiny_data, data)
    for shard in sorted(data.glob("train-*.tar")):
        raw = bytearray(shard.read_bytes())
        raw[512:len(raw) - 2048] = b"\x5a" * (len(raw) - 2560)
        shard.write_bytes(bytes(raw))
    res = train(data, run_dir, "training.steps=60", "data.workers=1")
    expect_error(res, "train-0")
    assert snapshot(run_dir / "checkpoints") == before
