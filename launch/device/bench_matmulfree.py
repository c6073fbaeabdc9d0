"""MatMul-free LM on one GPU, side by side in one run:

    source .gpu/gpu-env.sh && python3 launch/device/bench_matmulfree.py --out $OUT/bench_matmulfree.json

1. Training, fused vs unfused BitLinear: HGRN-Bit-1.3B, the same model and batch with
   `model.bitlinear_fused` on and off: peak memory, the memory above what weights and optimizer
   states hold (activations), step time.
2. Training throughput, HGRN-Bit-1.3B (fused) vs LLaMA-1.3B at context 4096.
3. Decode at batch 1: HGRN-Bit-1.3B with packed 2-bit weights vs the same shape in bf16
   (`model.linear: dense`), and the ternary model on its fake-quantized latent weights; the
   generation engine's CUDA-graph decode step; ms per token, weight bytes, peak memory.

Training measurements use the framework's path (launch/device/train_bench.py); each runs in its
own process. Untrained weights and random tokens: speed and memory do not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

CONFIGS = {"hgrnbit": "launch/configs/hgrnbit-1.3b.yaml", "llama": "launch/configs/llama-1.3b.yaml"}
VARIANTS = {  # name -> (config, overrides)
    "fused": ("hgrnbit", []),
    "unfused": ("hgrnbit", ["model.bitlinear_fused=false"]),
    "bf16": ("hgrnbit", ["model.linear=dense"]),  # the same shape, dense bf16 linears
    "packed": ("hgrnbit", []),
    "llama": ("llama", []),
}


def build(variant: str, seq: int):
    from pretrain.config import load_config
    from pretrain.models import build_network

    name, over = VARIANTS[variant]
    cfg = load_config(CONFIGS[name], [f"model.seq_len={seq}", *over])
    torch.manual_seed(0)
    return cfg, build_network(cfg.model).cuda()


def weight_bytes(model) -> int:
    """Bytes of the linear layers' weights as inference holds them (blocks and head; not the embedding)."""
    from parallel.bitlinear import PackedBitLinear

    total = 0
    for name, m in model.named_modules():
        if isinstance(m, PackedBitLinear):
            total += m.packed.numel() + 4
        elif hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2 and "tok" not in name:
            total += m.weight.numel() * m.weight.element_size()
    return total


def one(kind: str, variant: str, seq: int, args) -> dict:
    from parallel.distributed import init_distributed

    init_distributed(1)
    cfg, model = build(variant, seq)
    if kind == "train":
        from train_bench import bench_train  # beside this script

        mb = max(1, args.micro_tokens // seq)
        return bench_train(cfg, model, micro_batch=mb, grad_accum=max(1, args.tokens_per_step // (mb * seq)),
                           steps=args.steps, warmup=args.warmup)
    from decode_bench import bench_decode

    from parallel.bitlinear import pack_bitlinears

    if variant == "packed":
        pack_bitlinears(model)
    model = model.to(torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    out = bench_decode(cfg, model, batch=1, prompt_len=args.prompt_len, new_tokens=args.decode_tokens)
    out["weight_gib"] = weight_bytes(model) / 2**30
    out["model_gib"] = torch.cuda.memory_allocated() / 2**30
    return out


def run_one(kind: str, variant: str, seq: int, args) -> dict:
    cmd = [sys.executable, __file__, "--one", kind, variant, str(seq)] + [
        a for k in ("micro_tokens", "tokens_per_step", "steps", "warmup", "prompt_len", "decode_tokens")
        for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (out.stdout[-1500:] + out.stderr[-2500:])}
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=3, metavar=("KIND", "VARIANT", "SEQ"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-seq", type=int, default=2048, help="context of the fused vs unfused comparison")
    ap.add_argument("--memory-micro-tokens", type=int, nargs="+", default=[8192, 16384],
                    help="tokens per micro-batch there (activations grow with it; weights and states do not)")
    ap.add_argument("--speed-seq", type=int, default=4096, help="context of HGRN-Bit vs LLaMA")
    ap.add_argument("--micro-tokens", type=int, default=16384)
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--skip", nargs="*", default=[], choices=["memory", "speed", "decode"])
    ap.add_argument("--out", default="bench_matmulfree.json")
    args = ap.parse_args()
    if args.one:
        kind, variant, seq = args.one
        print("RESULT " + json.dumps(one(kind, variant, int(seq), args)), flush=True)
        return

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "args": vars(args)}
    if "memory" not in args.skip:
        micro, res["memory"] = args.micro_tokens, {}
        for tokens in args.memory_micro_tokens:
            args.micro_tokens = tokens
            res["memory"][str(tokens)] = {v: run_one("train", v, args.memory_seq, args) for v in ("fused", "unfused")}
        args.micro_tokens = micro
        print("memory", json.dumps(res["memory"]), flush=True)
    if "speed" not in args.skip:
        res["speed"] = {v: run_one("train", v, args.speed_seq, args) for v in ("fused", "llama")}
        print("speed", json.dumps(res["speed"]), flush=True)
    if "decode" not in args.skip:
        res["decode"] = {v: run_one("decode", v, args.prompt_len + args.decode_tokens, args)
                         for v in ("bf16", "fused", "packed")}
        print("decode", json.dumps(res["decode"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))


def table(res: dict) -> str:
    rows = ["| measurement | baseline | MatMul-free | ratio |", "|---|---|---|---|"]

    def row(label, a, b, fmt):
        rows.append(f"| {label} | {fmt(a)} | {fmt(b)} | {b / a:.2f}× |")

    gib, ms = "{:.1f} GiB".format, "{:.0f} ms".format
    for tokens, m in res.get("memory", {}).items():
        if any("error" in r for r in m.values()):
            continue
        u, f = m["unfused"], m["fused"]
        at = f"{int(tokens) // 1024}k tokens/micro-batch"
        row(f"train peak memory, {at} (unfused → fused BitLinear)", u["peak_gib"], f["peak_gib"], gib)
        row(f"train activation memory, {at} (unfused → fused)", u["activation_gib"], f["activation_gib"], gib)
        row(f"train step, {at} (unfused → fused)", u["step_s"] * 1e3, f["step_s"] * 1e3, ms)
    if all("error" not in r for r in res.get("speed", {}).values()) and "speed" in res:
        a, b = res["speed"]["llama"], res["speed"]["fused"]
        row("train tokens/s (LLaMA-1.3B → HGRN-Bit-1.3B)", a["tokens_per_s"], b["tokens_per_s"], "{:,.0f}".format)
        row("train peak memory (LLaMA → HGRN-Bit)", a["peak_gib"], b["peak_gib"], gib)
    d = res.get("decode", {})
    if "bf16" in d and "error" not in d["bf16"]:
        for v in ("packed", "fused"):
            if "error" in d.get(v, {"error": 1}):
                continue
            label = "packed 2-bit" if v == "packed" else "fake-quant latent"
            row(f"decode ms/token, batch 1 (bf16 → {label})", d["bf16"]["ms_per_step"], d[v]["ms_per_step"],
                "{:.2f} ms".format)
            row(f"decode linear weight bytes (bf16 → {label})", d["bf16"]["weight_gib"], d[v]["weight_gib"],
                "{:.3f} GiB".format)
            row(f"decode peak memory (bf16 → {label})", d["bf16"]["peak_gib"], d[v]["peak_gib"], gib)
    return "\n".join(rows)


if __name__ == "__main__":
    main()
