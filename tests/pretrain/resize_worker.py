"""torchrun worker for test_resume_resize.py: resume a ZeRO run at another data- or tensor-parallel size.

    resize_worker.py DATA OUT STAGES save [TP] [elastic]   (at one layout: this world size, TP = TP,
        default 1; `elastic`: a Flextron model, whose units are dealt round-robin over TP) per ZeRO
        stage in STAGES ("1,2,3"): N steps
        on the real loader, recording each rank's micro-batches, then a checkpoint;
    resize_worker.py DATA OUT STAGES resume [TP] [elastic]  (at another) per stage: resume it (through a universal
        checkpoint) for M more steps on the real loader, then drain the loader to the epoch's end; a
        second resume of the same checkpoint (reuses the conversion); a fresh loader's whole epoch;
        and a reference run from scratch at this DP size fed the same global batches for all N + M
        steps. Rank 0 writes OUT/save.json or OUT/resume.json.
"""
import json
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist

from pretrain.config import load_config
from pretrain.trainer import Trainer
from tests.helpers import TINY_CONFIG, tiny_overrides

N, M = 3, 3


def rest_of_epoch(loader) -> list:
    """The micro-batches a loader yields until its epoch ends."""
    out = []
    while True:
        batch = next(loader)
        if loader.epoch > 0:
            return out
        out.append(batch)


LAYOUT: dict = {}  # this phase's parallel.tensor (+ the elastic model's settings), from the command line
ELASTIC = {"model.elastic.enabled": True, "model.elastic.neuron_granularity": 8, "model.elastic.budgets": [0.5],
           "model.elastic.ffn_fractions": [1.0, 0.5], "model.elastic.head_fractions": [1.0]}


def trainer(data: str, run_dir: str, stage: int, **extra) -> Trainer:
    return Trainer(load_config(TINY_CONFIG, tiny_overrides(data, run_dir, **{
        "parallel.zero_stage": stage, "tracking.enabled": False, "training.steps": N + M,
        "checkpoint.keep_last": 0, **LAYOUT, **extra})))


def recorded(tr: Trainer, into: list):
    """tr's micro-batches, each also appended to `into`."""
    source = tr.batches
    return (into.append(batch.clone()) or batch for batch in source)


def step(tr: Trainer) -> dict:
    out = tr.train_step()
    tr.step += 1
    return out


def gathered(tr: Trainer, batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every data-parallel rank's micro-batches, by DP rank (everyone gets all; the TP ranks of one
    DP rank read the same ones)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, (tr.layout.dp_rank, tr.layout.tp_rank, batches))
    return [b for _, _, b in sorted(o for o in out if o[1] == 0)]


def weights_gap(a: Trainer, b: Trainer) -> float:
    """The largest |difference| between two runs' weights at the same layout, over all ranks. Losses
    alone would miss units restored in another order: permuting an MLP's neurons or attention's heads
    consistently leaves the full model's function unchanged, but not its Flextron sub-networks."""
    import deepspeed

    gap = torch.zeros(())
    pa, pb = list(a.engine.module.parameters()), list(b.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(pa), deepspeed.zero.GatheredParameters(pb):  # no-op below ZeRO-3
        for x, y in zip(pa, pb, strict=True):
            gap = torch.maximum(gap, (x.detach() - y.detach()).abs().max())
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return gap.item()


def rows(batches) -> Counter:
    return Counter(tuple(r.tolist()) for b in batches for r in b)


def main(data: str, out: str, stages: str, phase: str, tp: str = "1", elastic: str = "") -> None:
    rank = int(os.environ["RANK"])
    LAYOUT.update({"parallel.tensor": int(tp), **(ELASTIC if elastic == "elastic" else {})})
    results = {}
    for stage in map(int, stages.split(",")):
        run = f"{out}/zero{stage}"
        if phase == "save":
            tr = trainer(data, run, stage)
            mine = []
            tr.batches = recorded(tr, mine)
            losses = [step(tr) for _ in range(N)]
            tr.save()
            results[stage] = {"losses": losses, "dp": tr.dp_size, "tp": tr.layout.tp_size,
                              "batches": gathered(tr, mine)}
            if rank == 0:
                torch.save(results[stage]["batches"], f"{run}/batches.pt")
            continue
        saved = torch.load(f"{run}/batches.pt")  # [rank][micro-batch] of the saving run
        tr = trainer(data, run, stage)
        assert tr.step == N, tr.step
        mine = []
        tr.batches = recorded(tr, mine)
        resumed = [step(tr) for _ in range(M)]
        after = gathered(tr, mine)
        consumed = tr.loader.samples_consumed_total
        # no skip: what is left of the epoch after the resumed run's steps
        rest = gathered(tr, rest_of_epoch(tr.loader))
        fresh = trainer(data, f"{out}/fresh{stage}", stage)
        epoch = gathered(fresh, rest_of_epoch(fresh.loader))
        # a second resume of the same checkpoint: the conversion is reused
        again = trainer(data, f"{out}/again{stage}", stage, **{"checkpoint.resume": f"{run}/checkpoints"})
        again_losses = [step(again) for _ in range(1)]
        # the reference: this DP size from scratch, on the same global batches (a global batch = the
        # ranks' micro-batches of that step, in rank order), re-cut for this DP size
        per_step_saved = len(saved[0]) // N
        global_batches = [torch.cat([saved[r][s * per_step_saved + i] for r in range(len(saved))
                                     for i in range(per_step_saved)]) for s in range(N)]
        per_step_now = len(after[0]) // M
        global_batches += [torch.cat([after[r][s * per_step_now + i] for r in range(len(after))
                                      for i in range(per_step_now)]) for s in range(M)]
        ref = trainer(data, f"{out}/ref{stage}", stage)
        per_rank, dp_rank = global_batches[0].shape[0] // ref.dp_size, ref.layout.dp_rank
        mb = ref.cfg.training.micro_batch_size
        ref.batches = iter([gb[dp_rank * per_rank:(dp_rank + 1) * per_rank][i:i + mb]
                            for gb in global_batches for i in range(0, per_rank, mb)])
        reference = [step(ref) for _ in range(N + M)]
        used = rows([b for r in saved for b in r]) + rows([b for r in after for b in r])
        results[stage] = {
            "resumed": resumed, "again": again_losses, "reference": reference, "dp": tr.dp_size,
            "tp": tr.layout.tp_size, "weights_gap": weights_gap(tr, ref),
            "repeated": sum(n - 1 for n in used.values() if n > 1),
            "epoch_matches": used + rows([b for r in rest for b in r]) == rows([b for r in epoch for b in r]),
            "samples_consumed": consumed,
        }
    if rank == 0:
        for r in results.values():
            r.pop("batches", None)
        with open(f"{out}/{phase}.json", "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    from parallel.distributed import destroy_distributed

    main(*sys.argv[1:])
    destroy_distributed()  # an orderly exit: process groups torn down before the interpreter
