"""torchrun worker (2 processes) for test_pipeline_training.py: a non-finite loss under PP=2.

    pipeline_skip_worker.py DATA RUN_DIR ZERO

One good step, then a step whose last-stage loss is NaN on its second micro-batch, then a good one.
ZeRO-1: the NaN step is skipped (weights and optimizer untouched on both stages, the LR schedule and
the data move on) -> RUN_DIR/result.json from rank 0. ZeRO-0: the trainer stops with a clear error,
whose text goes to result.json.
"""
import json
import sys
from pathlib import Path

import torch


def main(data: str, run_dir: str, zero: str) -> None:
    from pretrain.config import load_config
    from pretrain.errors import FrugalError
    from pretrain.trainer import Trainer
    from tests.helpers import TINY_CONFIG, tiny_overrides

    cfg = load_config(TINY_CONFIG, tiny_overrides(Path(data), Path(run_dir), **{
        "parallel.pipeline": 2, "parallel.zero_stage": zero, "tracking.enabled": False, "checkpoint.every": 0,
        "training.eval_every": 0}))
    tr = Trainer(cfg)  # grad accum 2
    first = tr.train_step()
    module = tr.engine.module
    clean, calls = module.loss_fn, iter(range(10**9))
    module.loss_fn = lambda out, labels: clean(out, labels) * (float("nan") if next(calls) == 1 else 1.0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    sched_before = tr.engine.lr_scheduler.last_epoch
    try:
        poisoned = tr.train_step()
    except FrugalError as e:
        poisoned = {"error": str(e)}
    module.loss_fn = clean
    result = {"first": first, "poisoned": poisoned}
    if "error" not in poisoned:
        result["untouched"] = all(torch.equal(before[n], p) for n, p in module.named_parameters())
        result["lr_moved"] = tr.engine.lr_scheduler.last_epoch == sched_before + 1
        result["after"] = tr.train_step()
        result["consumed"] = tr.loader.samples_consumed_total
    if tr.layout.rank == 0:
        (Path(run_dir) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
    from parallel.distributed import destroy_distributed

    destroy_distributed()
