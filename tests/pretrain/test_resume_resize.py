"""Resume a ZeRO run at another data- or tensor-parallel size, through DeepSpeed's universal checkpoint:
the losses, grad norms and learning rates continue as an uninterrupted run's on the same global
batches, no sample is repeated or skipped, the conversion is cached beside the checkpoint (outside its
manifest, pruned with it). TP changes cover megatron's contiguous shards, replicated norms and a
Flextron model's round-robin units; a ZeRO-0 TP change and an undescribed TP>1 checkpoint are refused."""
import json
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain import universal
from pretrain.errors import CheckpointError
from tests.helpers import worker

WORKER = Path(__file__).with_name("resize_worker.py")
N, M = 3, 3  # steps before / after the change (resize_worker.py)


def check(out: Path, stages: str, saved_dp: int, resumed_dp: int, stdout: str, tp: tuple[int, int] = (1, 1)) -> None:
    save, resume = json.loads((out / "save.json").read_text()), json.loads((out / "resume.json").read_text())
    for stage in stages.split(","):
        s, r = save[stage], resume[stage]
        assert (s["dp"], r["dp"]) == (saved_dp, resumed_dp) and (s["tp"], r["tp"]) == tp
        ref = r["reference"]
        assert len(s["losses"]) + len(r["resumed"]) == len(ref) == N + M
        for i, (got, want) in enumerate(zip(s["losses"] + r["resumed"], ref)):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (stage, i)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (stage, i)
            assert got["lr"] == want["lr"], (stage, i)
        assert r["again"][0]["loss"] == pytest.approx(ref[N]["loss"], rel=1e-5), stage
        assert r["weights_gap"] < 1e-5, (stage, r["weights_gap"])  # every unit back in its place
        # the data: no sample twice; with the rest of the epoch, exactly a fresh loader's epoch
        assert r["repeated"] == 0 and r["epoch_matches"], stage
        assert r["samples_consumed"] == (N + M) * 8
        path = out / f"zero{stage}" / "checkpoints" / ckpt.tag_for(N)
        assert (path / universal.UNIVERSAL).is_dir() and not (path / "universal.partial").exists()
        assert not (path / "latest_universal").exists()
        assert ckpt.check_folder(path) is None  # the cache leaves the manifest's verification intact
    # converted once per stage; the second resume reuses it
    n = len(stages.split(","))
    assert stdout.count("converted universal checkpoint") == n, stdout[-3000:]
    assert stdout.count("reusing universal checkpoint") == n, stdout[-3000:]


def test_resume_zero123_dp2_as_dp1(tiny_data, tmp_path):
    worker(WORKER, str(tiny_data), str(tmp_path), "1,2,3", "save", nproc=2, timeout=300)
    res = worker(WORKER, str(tiny_data), str(tmp_path), "1,2,3", "resume", nproc=1, timeout=300)
    check(tmp_path, "1,2,3", 2, 1, res.stdout)


def test_resume_zero1_dp1_as_dp2(tiny_data, tmp_path):
    worker(WORKER, str(tiny_data), str(tmp_path), "1", "save", nproc=1, timeout=300)
    res = worker(WORKER, str(tiny_data), str(tmp_path), "1", "resume", nproc=2, timeout=300)
    check(tmp_path, "1", 1, 2, res.stdout)


def test_resume_zero123_tp2_as_tp1_dp2_elastic(tiny_data, tmp_path):
    """TP 2 x DP 1 -> TP 1 x DP 2 at once, for a Flextron model (round-robin units, a replicated router)."""
    worker(WORKER, str(tiny_data), str(tmp_path), "1,2,3", "save", "2", "elastic", nproc=2, timeout=300)
    res = worker(WORKER, str(tiny_data), str(tmp_path), "1,2,3", "resume", "1", "elastic", nproc=2, timeout=400)
    check(tmp_path, "1,2,3", 1, 2, res.stdout, tp=(2, 1))


def test_resume_zero1_tp1_as_tp2(tiny_data, tmp_path):
    worker(WORKER, str(tiny_data), str(tmp_path), "1", "save", "1", nproc=1, timeout=300)
    res = worker(WORKER, str(tiny_data), str(tmp_path), "1", "resume", "2", nproc=2, timeout=300)
    check(tmp_path, "1", 1, 1, res.stdout, tp=(1, 2))


def _meta(tp: int, dp: int, stage: int, pp: int = 1) -> dict:
    return {"dp_size": dp, "config": {"model": {"d_model": 32},
                                      "parallel": {"tensor": tp, "pipeline": pp, "zero_stage": stage}}}


def _run(tp: int, dp: int, stage: int, pp: int = 1) -> dict:
    return {"tensor": tp, "pipeline": pp, "zero_stage": stage, "dp_size": dp}


def test_which_resumes_convert():
    model = {"d_model": 32}
    # a DP change passes the compatibility check at any ZeRO stage ...
    for stage in (0, 1, 2, 3):
        ckpt.check_compatible(_meta(1, 2, stage), model, _run(1, 1, stage), Path("c"))
    # ... and goes through a universal checkpoint only when the optimizer state is cut into ZeRO shards
    assert not universal.needs_universal(_meta(1, 2, 0), _run(1, 1, 0))  # ZeRO-0: the state is whole in every file
    assert not universal.needs_universal(_meta(1, 2, 1), _run(1, 2, 1))
    assert not universal.needs_universal(_meta(2, 2, 1, pp=2), _run(2, 2, 1, pp=2))
    assert all(universal.needs_universal(_meta(1, 2, s), _run(1, 1, s)) for s in (1, 2, 3))
    # a TP or PP change, or another ZeRO stage >= 1, converts too (any DP size) ...
    for saved, run in [(_meta(2, 1, 1), _run(1, 1, 1)), (_meta(2, 2, 1, pp=2), _run(1, 8, 1)),
                       (_meta(1, 1, 1), _run(1, 1, 1, pp=2)), (_meta(1, 2, 1), _run(1, 2, 2))]:
        ckpt.check_compatible(saved, model, run, Path("c"))
        assert universal.needs_universal(saved, run)
    # ... a ZeRO-0 checkpoint cannot, and nothing crosses between ZeRO-0 and ZeRO >= 1: refused, clearly
    for saved, run in [(_meta(2, 1, 0), _run(1, 1, 0)), (_meta(1, 1, 0, pp=2), _run(1, 2, 0)),
                       (_meta(1, 2, 0, pp=2), _run(1, 1, 0, pp=2))]:
        with pytest.raises(CheckpointError, match="ZeRO-0 checkpoint resumes only at the same tensor- and pipeline"):
            ckpt.check_compatible(saved, model, run, Path("c"))
    with pytest.raises(CheckpointError, match=r"written at parallel.tensor=1 x parallel.pipeline=1 x 2 data-parallel "
                                              r"ranks, zero_stage=0; this run uses .* zero_stage=1: resuming between"):
        ckpt.check_compatible(_meta(1, 2, 0), model, _run(1, 2, 1), Path("c"))


def test_undescribed_tp_checkpoint_is_refused(tmp_path):
    """A TP=2 checkpoint without the layout maps (written before them): the converter would join its
    shards wrongly, so it is refused before converting, naming the problem, and nothing is written."""
    path = tmp_path / ckpt.tag_for(3)
    path.mkdir()
    (path / ckpt.META).write_text(json.dumps({"step": 3, "dp_size": 1, "checkpoint_format": 2,  # manifests, no maps
                                              "config": {"parallel": {"tensor": 2}}}))
    for r in (0, 1):
        torch.save({"module": {"w": torch.ones(2)}}, path / ckpt.model_file(r))
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(CheckpointError, match="parallel.tensor=2 without its parameters' tensor-parallel layouts"):
        universal.to_universal(path)
    assert sorted(p.name for p in path.iterdir()) == before


def test_pruning_deletes_the_universal_cache(tmp_path):
    for step in (1, 2, 3):
        path = tmp_path / ckpt.tag_for(step)
        (path / universal.UNIVERSAL / "zero").mkdir(parents=True)
        (path / universal.UNIVERSAL / "zero" / "x.pt").write_bytes(b"x")
        (path / ckpt.META).write_text(json.dumps({"step": step, "checkpoint_format": ckpt.FORMAT}))
        ckpt._write_manifest(path, step, {})
        assert [f["name"] for f in json.loads((path / ckpt.MANIFEST).read_text())["files"]] == [ckpt.META]
        assert ckpt.check_folder(path) is None
    ckpt._prune(tmp_path, keep_last=1, current=ckpt.tag_for(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.tag_for(3)]
