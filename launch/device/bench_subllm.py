"""SUBLLM-1.3B vs LLaMA-1.3B of the same dimensions, side by side in one process on one GPU.

    source .gpu/gpu-env.sh && python3 launch/device/bench_subllm.py --out $OUT/bench_subllm.json

Training: the framework's own path (megatron-core TP layers, DeepSpeed ZeRO-1, bf16, fused
AdamW) on random tokens at context 4096 and 8192, 64k tokens per optimizer step (gradient
accumulation, so the optimizer's fixed cost is amortized as in real training, where the 1.3B
configs take 2M tokens per step); tokens/s and step time from CUDA events over timed steps after
warm-up (median), peak memory from torch.cuda.max_memory_allocated. Every configuration runs in
its own subprocess: a DeepSpeed engine is not fully released inside one process, and the next
model's peak memory would include the previous one's leftovers.
Decode: the generation engine's decode step (per-level KV caches, threshold rule, replayed as CUDA
graphs; the same step eager for reference) after a prompt filling the context but the decoded
tokens, batch 1 and 16; tokens/s over the decode steps.

The models are untrained: a SUBLLM scorer at initialization keeps about half of the tokens at
inference, not the 64% a trained one keeps (the balancer holds the positive fraction at the keep
ratio). For decode, each level's scores are therefore shifted by the constant that makes the
prompt's positive fraction equal the keep ratio, the state a trained model is in.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

CONFIGS = {"llama": "launch/configs/llama-1.3b.yaml", "subllm": "launch/configs/subllm-1.3b.yaml"}


SUBLLM_OVERRIDES: list[str] = []  # --subllm-override, e.g. model.subsample.keep_ratio=1.0


def build(name: str, seq: int):
    from pretrain.config import load_config
    from pretrain.models import build_network

    cfg = load_config(CONFIGS[name], [f"model.seq_len={seq}", *(SUBLLM_OVERRIDES if name == "subllm" else [])])
    torch.manual_seed(0)
    return cfg, build_network(cfg.model).cuda()


def bench_train(name: str, seq: int, micro_batch: int, grad_accum: int, steps: int, warmup: int) -> dict:
    from train_bench import bench_train as measure  # beside this script

    cfg, model = build(name, seq)
    return measure(cfg, model, micro_batch=micro_batch, grad_accum=grad_accum, steps=steps, warmup=warmup)


def run_one(kind: str, name: str, seq: int, args) -> dict:
    """One measurement in a fresh process (see the module docstring)."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--one", kind, name, str(seq), "--tokens-per-step", str(args.tokens_per_step),
           "--micro-tokens", str(args.micro_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--decode-tokens", str(args.decode_tokens), "--decode-batches", *map(str, args.decode_batches),
           *[a for o in args.subllm_override for a in ("--subllm-override", o)]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{kind} {name} {seq} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def one(kind: str, name: str, seq: int, args) -> dict:
    from parallel.distributed import init_distributed

    init_distributed(1)
    if kind == "train":
        mb = max(1, args.micro_tokens // seq)
        return bench_train(name, seq, mb, max(1, args.tokens_per_step // (mb * seq)), args.steps, args.warmup)
    from decode_bench import bench_decode  # beside this script

    cfg, model = build(name, seq)
    return {str(b): bench_decode(cfg, model, batch=b, prompt_len=seq - args.decode_tokens,
                                 new_tokens=args.decode_tokens) for b in args.decode_batches}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=3, metavar=("KIND", "MODEL", "SEQ"), help=argparse.SUPPRESS)
    ap.add_argument("--micro-tokens", type=int, default=16384, help="tokens per micro-batch")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--subllm-override", action="append", default=[],
                    help="dotted override for the SUBLLM model only (e.g. model.subsample.keep_ratio=1.0)")
    ap.add_argument("--out", default="bench_subllm.json")
    args = ap.parse_args()
    SUBLLM_OVERRIDES.extend(args.subllm_override)
    if args.one:
        kind, name, seq = args.one
        print("RESULT " + json.dumps(one(kind, name, int(seq), args)), flush=True)
        return

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "train": {}, "decode": {}}
    for seq in [] if args.skip_train else args.contexts:
        for name in ("llama", "subllm"):
            r = run_one("train", name, seq, args)
            results["train"][f"{name}@{seq}"] = r
            print(f"train {name:6s} seq {seq}: {r['tokens_per_s']:,.0f} tok/s, {r['step_s'] * 1e3:.0f} ms/step, "
                  f"peak {r['peak_gib']:.1f} GiB", flush=True)
    if not args.skip_decode:
        for seq in args.contexts:
            for name in ("llama", "subllm"):
                for b, r in run_one("decode", name, seq, args).items():
                    results["decode"][f"{name}@{seq}xb{b}"] = r
                    print(f"decode {name:6s} ctx {seq} batch {b}: {r['tokens_per_s']:,.1f} tok/s (eager "
                          f"{r['eager']['tokens_per_s']:,.1f}; {r['kernels_per_step']} kernels/step) {r.get('keep', '')}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    print("\n| context | metric | LLaMA-1.3B | SUBLLM-1.3B | ratio |\n|---|---|---|---|---|")

    def row(seq, metric, a, b, fmt):
        print(f"| {seq} | {metric} | {fmt(a)} | {fmt(b)} | {b / a:.2f}x |")

    for seq in args.contexts:
        if f"llama@{seq}" in results["train"]:
            a, b = results["train"][f"llama@{seq}"], results["train"][f"subllm@{seq}"]
            row(seq, "train tokens/s", a["tokens_per_s"], b["tokens_per_s"], "{:,.0f}".format)
            row(seq, "train step", a["step_s"] * 1e3, b["step_s"] * 1e3, "{:.0f} ms".format)
            row(seq, "train peak memory", a["peak_gib"], b["peak_gib"], "{:.1f} GiB".format)
        for bs in args.decode_batches:
            key = f"@{seq}xb{bs}"
            if f"llama{key}" in results["decode"]:
                a, b = results["decode"][f"llama{key}"], results["decode"][f"subllm{key}"]
                row(seq, f"decode tokens/s, batch {bs}", a["tokens_per_s"], b["tokens_per_s"], "{:,.1f}".format)
                row(seq, f"decode tokens/s, batch {bs}, eager", a["eager"]["tokens_per_s"],
                    b["eager"]["tokens_per_s"], "{:,.1f}".format)
                row(seq, f"decode KV cache, batch {bs}", a["kv_cache_gib"], b["kv_cache_gib"], "{:.2f} GiB".format)


if __name__ == "__main__":
    main()
