"""GRIFFIN decode throughput on one GPU: LLaMA-1.3B at FF density 0.5 (and 0.75) vs the full FF.

    source .gpu/gpu-env.sh && python3 launch/device/bench_griffin.py --out $OUT/bench_griffin.json

The generation engine's own path: prefill a random prompt (GRIFFIN scores and selects each row's
neurons there), then the CUDA-graph decode step; tokens/s over the decode steps after the first
(warm-up and capture), median of 3. Selected-weight buffers are reported as bytes. Untrained weights:
speed does not depend on which neurons are chosen.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


@torch.no_grad()
def bench(gen, cfg, *, batch: int, prompt_len: int, new_tokens: int, density: float) -> dict:
    from pretrain.models.griffin import FFSelection

    ff = FFSelection(density=density) if density < 1 else None
    g = torch.Generator(device="cuda").manual_seed(3)
    times, extra = [], 0
    for _ in range(3):
        prompt = torch.randint(0, cfg.model.vocab_size, (batch, prompt_len), device="cuda", generator=g)
        feed = torch.randint(0, cfg.model.vocab_size, (batch, new_tokens), device="cuda", generator=g)
        _, step = gen.prefill(prompt, new_tokens, ff)
        extra = sum(e.nbytes() for e in step.experts) if step.experts else 0
        step(feed[:, :1])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(1, new_tokens):
            step(feed[:, i:i + 1])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del step
    t = statistics.median(times)
    return {"tokens_per_s": batch * (new_tokens - 1) / t, "ms_per_step": t / (new_tokens - 1) * 1e3,
            "selected_weight_gib": extra / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="launch/configs/llama-1.3b.yaml")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="bench_griffin.json")
    args = ap.parse_args()

    from parallel.distributed import init_distributed
    from pretrain.config import load_config
    from pretrain.generate import Generator
    from pretrain.models import build_network

    init_distributed(1)
    cfg = load_config(args.config, [])
    torch.manual_seed(0)
    gen = Generator.from_model(build_network(cfg.model).cuda(), dtype=torch.bfloat16)
    ff_gib = sum(sum(p.numel() for p in b.mlp.parameters()) for b in gen.model.blocks()) * 2 / 2**30
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "config": args.config, "ff_weight_gib": ff_gib, "runs": {}}
    print("| batch | FF density | decode tokens/s | ms/step | vs first density | selected-weight buffers |\n|---|---|---|---|---|---|")
    for b in args.batches:
        base = None  # the first density (1.0 by default): the "vs" column's reference
        for d in args.densities:
            r = bench(gen, cfg, batch=b, prompt_len=args.prompt_len, new_tokens=args.new_tokens, density=d)
            results["runs"][f"b{b}@{d}"] = r
            base = base or r
            print(f"| {b} | {d:.2f} | {r['tokens_per_s']:,.1f} | {r['ms_per_step']:.2f} | "
                  f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['selected_weight_gib']:.2f} GiB "
                  f"(FF weights {ff_gib:.2f} GiB) |", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
