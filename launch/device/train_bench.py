"""Training throughput and peak memory of one model through the framework's own path (megatron-core
TP layers, DeepSpeed ZeRO-1, bf16, fused AdamW) on random tokens. Used by bench_subllm.py and
bench_matmulfree.py; each measurement runs in its own process (a DeepSpeed engine is not fully
released inside one, and the next model's peak memory would include the previous one's leftovers).
"""
from __future__ import annotations

import statistics

import torch


def cuda_time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def bench_train(cfg, model, *, micro_batch: int, grad_accum: int, steps: int, warmup: int) -> dict:
    """tokens/s and step time (median of `steps` CUDA-event-timed optimizer steps after `warmup`),
    peak memory, and the part of it above the memory held before the first forward (weights,
    optimizer states, gradients): what activations and temporaries add."""
    from parallel import zero
    from pretrain.optim import build_optimizer, build_scheduler

    seq = cfg.model.seq_len
    opt = build_optimizer(model, cfg.optimizer, fused=True)
    ds = zero.engine_config(micro_batch=micro_batch, grad_accum=grad_accum, zero_stage=1, bf16=True, grad_clip=1.0)
    engine = zero.initialize(model, opt, build_scheduler(opt, cfg), ds)
    engine.module.set_step(10**6)  # SUBLLM: bypass floor at its final value (irrelevant for speed)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq + 1), device="cuda", generator=gen)

    def step():
        for _ in range(grad_accum):
            engine.backward(engine(batch[:, :-1], batch[:, 1:]))
        engine.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    times = cuda_time(step, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    t = statistics.median(times)
    return {"step_s": t, "tokens_per_s": micro_batch * grad_accum * seq / t, "peak_gib": peak,
            "activation_gib": peak - resident, "micro_batch": micro_batch, "grad_accum": grad_accum}
