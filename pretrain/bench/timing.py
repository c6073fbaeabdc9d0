"""CUDA-event timing, the framework's training step measured, and the machine's description."""
from __future__ import annotations

import statistics
import time

import torch

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 datasheet peak, the MFU denominator


def cuda_time(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, from CUDA events around it (device time, not host)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def summarize(times: list[float], tokens_per_step: int, flops_per_token: float | None) -> dict:
    t = statistics.median(times)
    out = {"step_s": t, "tokens_per_s": tokens_per_step / t, "step_spread": (max(times) - min(times)) / t}
    if flops_per_token:
        out["mfu"] = tokens_per_step / t * flops_per_token / PEAK_BF16
    return out


def bench_train(cfg, model, *, micro_batch: int, grad_accum: int, steps: int, warmup: int) -> dict:
    """tokens/s and step time (median of `steps` CUDA-event-timed optimizer steps after `warmup`),
    MFU, peak memory, and the part of it above the memory held before the first forward (weights,
    optimizer states, gradients): what activations and temporaries add. Random tokens (never zeros:
    they can run faster than real data)."""
    from parallel import zero
    from pretrain.optim import build_optimizer, build_scheduler
    from pretrain.trainer import flops_per_token

    seq = cfg.model.seq_len
    opt = build_optimizer(model, cfg.optimizer, fused=True)
    ds = zero.engine_config(micro_batch=micro_batch, grad_accum=grad_accum, zero_stage=1, bf16=True, grad_clip=1.0)
    engine = zero.initialize(model, opt, build_scheduler(opt, cfg), ds)
    engine.module.set_step(10**6)  # SUBLLM: bypass floor at its final value (irrelevant for speed)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (micro_batch, seq + 1), device="cuda", generator=gen)
               for _ in range(min(grad_accum, 2))]

    def step():
        for i in range(grad_accum):
            b = batches[i % len(batches)]
            engine.backward(engine(b[:, :-1], b[:, 1:]))
        engine.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    times = cuda_time(step, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    out = summarize(times, micro_batch * grad_accum * seq, flops_per_token(cfg))
    return {**out, "peak_gib": peak, "activation_gib": peak - resident, "micro_batch": micro_batch,
            "grad_accum": grad_accum, "seq": seq}


def machine() -> dict:
    """What a table needs to be reproducible: GPU, driver, torch/triton/CUDA versions, date."""
    import subprocess

    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    return info
