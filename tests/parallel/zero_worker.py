"""torchrun worker: four optimizer steps through Trainer.train_step under ZeRO stages 1, 2 and 3 with
the same global batches whatever the data-parallel size. Usage: zero_worker.py DATA OUT_DIR"""
import json
import os
import sys

import torch

from pretrain.config import load_config
from pretrain.trainer import Trainer
from tests.helpers import TINY_CONFIG, tiny_overrides

GLOBAL_BATCH, MICRO, STEPS = 8, 2, 4


def global_batches(vocab: int, seq: int):
    """Two random global batches, alternating: different data per step, and learnable (the loss falls)."""
    gen = torch.Generator().manual_seed(7)
    pair = [torch.randint(0, vocab, (GLOBAL_BATCH, seq + 1), generator=gen) for _ in range(2)]
    return [pair[i % 2] for i in range(STEPS)]


def main(data: str, out: str) -> None:
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for stage in (1, 2, 3):
        cfg = load_config(TINY_CONFIG, tiny_overrides(data, f"{out}/zero{stage}-dp{world}", **{
            "parallel.zero_stage": stage, "training.micro_batch_size": MICRO,
            "training.global_batch_size": GLOBAL_BATCH, "tracking.enabled": False, "training.steps": STEPS}))
        tr = Trainer(cfg)
        rank, dp = tr.layout.dp_rank, tr.dp_size
        per_rank = GLOBAL_BATCH // dp
        # rank r takes rows [r*per_rank, (r+1)*per_rank) of every global batch, in micro-batches
        tr.batches = iter([gb[rank * per_rank:(rank + 1) * per_rank][i:i + MICRO]
                           for gb in global_batches(256, cfg.model.seq_len) for i in range(0, per_rank, MICRO)])
        results[stage] = [tr.train_step() for _ in range(STEPS)]
    if int(os.environ["RANK"]) == 0:
        with open(f"{out}/dp{world}.json", "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    from parallel.distributed import destroy_distributed

    destroy_distributed()  # process groups torn down before the interpreter (else gloo's threads may abort the exit)
