"""One run of the framework's training step on a TP x PP x DP grid, on every rank under torchrun:

    torchrun --nproc-per-node N -m pretrain.bench.grid '<json spec>'

spec: {"config", "overrides", "steps", "warmup", "out"}; the layout comes from the overrides
(parallel.tensor, parallel.pipeline, parallel.zero_stage) and the world size.

The whole training path runs (pretrain.trainer.Trainer: megatron-core's TP layers, DeepSpeed's ZeRO
or pipeline engine, the same train_step), fed a stream of global batches that does not depend on the
layout: global batch k is [G, seq + 1] random tokens drawn from k alone, and data-parallel rank r
takes its G / D rows, in micro-batches. The losses of any layout with the same global batch are
therefore the same numbers up to reduction order and bf16 rounding (the correctness check of
pretrain/bench/multigpu.py), and the step times give tokens/s per GPU.

Rank 0 writes {"losses", "step_s", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "peak_gib",
"layout"} to spec["out"]: "losses" of every step (warm-up included), the rest over the timed steps.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def global_batches(vocab: int, rows: int, seq: int, dp_rank: int, dp_size: int, micro: int):
    """This DP rank's micro-batches [micro, seq + 1] of the layout-independent global batches."""
    k = 0
    while True:
        g = torch.Generator().manual_seed(1000 + k)
        batch = torch.randint(0, vocab, (rows, seq + 1), generator=g)  # random, never zeros
        yield from batch.chunk(dp_size)[dp_rank].split(micro)
        k += 1


def run(spec: dict) -> dict:
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(spec["config"], [*spec.get("overrides", []), "tracking.enabled=false"])
    t = Trainer(cfg)
    cfg, layout = t.cfg, t.layout
    t.batches = global_batches(cfg.model.vocab_size, cfg.training.global_batch_size, cfg.model.seq_len,
                               layout.dp_rank, t.dp_size, cfg.training.micro_batch_size)
    cuda = t.device.type == "cuda"
    losses, times = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"] and cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        t.model.set_step(t.step)  # SUBLLM's bypass floor follows the step, as in Trainer.fit
        out = t.train_step()  # ends with an all-reduce read on the host: the step is done everywhere
        t.step += 1
        if cuda:
            torch.cuda.synchronize()
        losses.append(out.get("loss", float("nan")))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=t.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    step_s = statistics.median(times)
    tokens = cfg.training.global_batch_size * cfg.model.seq_len / step_s
    return {"losses": losses, "step_s": step_s, "tokens_per_s": tokens, "tokens_per_s_per_gpu": tokens / layout.world_size,
            "mfu": tokens * t.flops_per_token / (t.peak_flops * layout.world_size) if t.peak_flops else None,
            "peak_gib": float(peak), "layout": {"tp": layout.tp_size, "pp": layout.pp_size, "dp": t.dp_size,
                                                "zero": cfg.parallel.zero_stage, "world": layout.world_size}}


def main() -> None:
    import warnings

    import torch.distributed as dist

    from parallel.distributed import destroy_distributed

    warnings.filterwarnings("ignore")
    spec = json.loads(sys.argv[1])
    result = run(spec)
    if dist.get_rank() == 0:
        with open(spec["out"], "w") as f:
            json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
