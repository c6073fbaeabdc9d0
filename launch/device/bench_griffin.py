"""GRIFFIN decode throughput on one GPU: LLaMA-1.3B at FF density 0.5 (and 0.75) vs the full FF,
with the plain and the compiled decode step side by side.

    source .gpu/gpu-env.sh && python3 launch/device/bench_griffin.py --out $OUT/bench_griffin.json

The generation engine's own path: prefill a random prompt (GRIFFIN scores and selects each row's
neurons there), then the CUDA-graph decode step (`graphs`), or the same step compiled by
torch.compile before capture (`compiled`, Generator.compile). Tokens/s over the decode steps after
the first (warm-up, compile and capture: reported as `first_step_s`), median of 3. Kernels per step
are counted by the profiler on one step run outside the graphs. Selected-weight buffers are reported
as bytes. Untrained weights: speed does not depend on which neurons are chosen.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def kernels_per_step(step, token) -> tuple[int, float]:
    """(CUDA kernels one decode step launches, seconds of the step before: warm-up and compile), both
    run outside the graphs."""
    graphs, step.cuda_graphs = step.cuda_graphs, False
    t0 = time.perf_counter()
    step(token)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(token)
        torch.cuda.synchronize()
    step.cuda_graphs = graphs
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()), warm


@torch.no_grad()
def bench(gen, cfg, *, batch: int, prompt_len: int, new_tokens: int, density: float, compiled: bool) -> dict:
    from pretrain.models.griffin import FFSelection

    ff = FFSelection(density=density) if density < 1 else None
    gen.compile = compiled
    g = torch.Generator(device="cuda").manual_seed(3)
    times, first, extra, kernels, warm = [], [], 0, None, None
    for rep in range(3):
        prompt = torch.randint(0, cfg.model.vocab_size, (batch, prompt_len), device="cuda", generator=g)
        feed = torch.randint(0, cfg.model.vocab_size, (batch, new_tokens + 1), device="cuda", generator=g)
        _, step = gen.prefill(prompt, new_tokens + 2, ff)
        extra = sum(e.nbytes() for e in step.experts) if step.experts else 0
        if rep == 0:  # before the graphs exist: the eager (or compiled) step, once
            kernels, warm = kernels_per_step(step, feed[:, -1:])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(feed[:, :1])  # warm-up (compile) and capture
        torch.cuda.synchronize()
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(1, new_tokens):
            step(feed[:, i:i + 1])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del step
    t = statistics.median(times)
    return {"tokens_per_s": batch * (new_tokens - 1) / t, "ms_per_step": t / (new_tokens - 1) * 1e3,
            "selected_weight_gib": extra / 2**30, "kernels_per_step": kernels, "warm_s": warm,
            "first_step_s": first}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="launch/configs/llama-1.3b.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. a 7B shape: model.d_model=4096 model.n_heads=32 ...")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--modes", nargs="+", default=["graphs", "compiled"], choices=["graphs", "compiled"])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="bench_griffin.json")
    args = ap.parse_args()

    from parallel.distributed import init_distributed
    from pretrain.config import load_config
    from pretrain.generate import Generator
    from pretrain.models import build_network

    init_distributed(1)
    cfg = load_config(args.config, args.set)
    torch.manual_seed(0)
    gen = Generator.from_model(build_network(cfg.model).to(device="cuda", dtype=torch.bfloat16), dtype=torch.bfloat16)
    ff_gib = sum(sum(p.numel() for p in b.mlp.parameters()) for b in gen.model.blocks()) * 2 / 2**30
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "config": args.config, "overrides": args.set, "ff_weight_gib": ff_gib, "runs": {}}
    print("| batch | step | FF density | decode tokens/s | ms/step | kernels/step | vs full (same step) | "
          "vs full (graphs) | selected-weight buffers |\n|---|---|---|---|---|---|---|---|---|")
    for b in args.batches:
        ref = None  # the first mode at the first density: the plain step of the full model
        for mode in args.modes:
            base = None  # this mode's first density (1.0 by default)
            for d in args.densities:
                r = bench(gen, cfg, batch=b, prompt_len=args.prompt_len, new_tokens=args.new_tokens, density=d,
                          compiled=mode == "compiled")
                results["runs"][f"b{b}@{d}/{mode}"] = r
                base, ref = base or r, ref or r
                print(f"| {b} | {mode} | {d:.2f} | {r['tokens_per_s']:,.1f} | {r['ms_per_step']:.2f} | "
                      f"{r['kernels_per_step']} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                      f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {r['selected_weight_gib']:.2f} GiB "
                      f"(FF weights {ff_gib:.2f} GiB) | warm-up {r['warm_s']:.1f} s, capture "
                      f"{max(r['first_step_s']):.1f} s", flush=True)
                with open(args.out, "w") as f:  # after every row: a timeout keeps what was measured
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
