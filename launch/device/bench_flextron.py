"""Flextron decode latency on one GPU: the sub-networks of a 1.3B-shaped elastic LLaMA at budgets
1.0 / 0.75 / 0.5 / 0.25, measured, against the latency its cost model predicts.

    source .gpu/gpu-env.sh && python3 launch/device/bench_flextron.py --out $OUT/bench_flextron.json

Per batch size: `elastic-profile`'s latency table (per-block attention / MLP decode latency of every
offered width, CUDA graphs, at the mean context of the decode), then for each budget the static router's
widths (cost = that table), the predicted latency Σ table, and the measured decode step of the exported
sub-network through the generation engine (KV caches, CUDA-graph step; decode_bench.py). Random weights:
latency does not depend on them (the router's untrained prior names widths near the budget).
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch
from decode_bench import bench_decode  # beside this script

from pretrain import subnetwork
from pretrain.config import load_config
from pretrain.elastic_profile import profile, write
from pretrain.models import build_network

BUDGETS = (1.0, 0.75, 0.5, 0.25)


def bench_train(cfg, *, micro: int, seq: int, steps: int = 6) -> list[dict]:
    """Forward + backward of the elastic model itself at each budget (the static router's sliced
    sub-network, no teacher): tokens/s and peak memory. What elastic training costs per sub-network."""
    import time

    from parallel.tensor_parallel import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    net = build_network(cfg.model).cuda().to(torch.bfloat16)
    x = torch.randint(0, cfg.model.vocab_size, (micro, seq + 1), device="cuda")
    rows = []
    for budget in BUDGETS:
        state = net.elastic_state(micro, budget)
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = net(x[:, :-1], elastic=state)
            vocab_parallel_cross_entropy(logits, x[:, 1:]).mean().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            net.zero_grad(set_to_none=True)
        t = sorted(times[2:])[len(times[2:]) // 2]
        rows.append({"budget": budget, "tokens_per_s": micro * seq / t, "step_ms": t * 1e3,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--train", action="store_true", help="only the training forward+backward per budget")
    args = ap.parse_args()
    elastic = ["model.elastic.enabled=true", "model.seq_len=2048"]
    cfg = load_config("launch/configs/llama-1.3b.yaml", elastic)
    if args.train:
        from parallel.distributed import init_distributed

        init_distributed(1)
        rows = bench_train(cfg, micro=4, seq=2048)
        json.dump({"train": rows}, open(args.out, "w"), indent=1)
        for r in rows:
            print(f"| {r['budget']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | "
                  f"{r['step_ms']:.1f} | {r['peak_gib']:.1f} |")
        return
    rows = []
    for batch in args.batch:
        table = profile(cfg.model, batch=batch, context=args.prompt + args.new // 2)
        path = write(table, tempfile.mkdtemp() + "/latency.json")
        lat = load_config("launch/configs/llama-1.3b.yaml",
                          elastic + ["model.elastic.cost=latency", f"model.elastic.latency_table={path}"])
        torch.manual_seed(0)
        net = build_network(lat.model).cuda().to(torch.bfloat16).eval()
        full = None
        for budget in BUDGETS:
            L = lat.model.n_blocks
            mi, hi = ([0] * L, [0] * L) if budget == 1.0 else net.router.static_choice(budget)
            widths, groups = subnetwork.widths(net, mi, hi)
            sub = subnetwork.build(net, net.state_dict(), widths, groups).cuda()
            res = bench_decode(lat, sub, batch=batch, prompt_len=args.prompt, new_tokens=args.new)
            predicted = net.router.cost.predict(mi, hi)
            full = full or (res["ms_per_step"], predicted)
            rows.append({"batch": batch, "budget": budget, "mlp_widths": sorted(set(widths)),
                         "heads": sorted(set(groups)), "params": sum(p.numel() for p in sub.parameters()),
                         "ms_per_step": res["ms_per_step"], "predicted_ms": predicted,
                         "latency_ratio": res["ms_per_step"] / full[0], "predicted_ratio": predicted / full[1],
                         "prediction_error": predicted / res["ms_per_step"] - 1, "tokens_per_s": res["tokens_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
            del sub
        rows.append({"batch": batch, "table": table})
        del net
        torch.cuda.empty_cache()
    json.dump({"rows": rows, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, open(args.out, "w"),
              indent=1)
    print("| batch | budget | MLP width | heads | params | decode ms/token | × full | predicted ms | predicted × | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "table" not in r:
            print(f"| {r['batch']} | {r['budget']} | {r['mlp_widths']} | {r['heads']} | {r['params'] / 1e9:.2f}B | "
                  f"{r['ms_per_step']:.3f} | {r['latency_ratio']:.2f} | {r['predicted_ms']:.3f} | "
                  f"{r['predicted_ratio']:.2f} | {r['prediction_error']:+.1%} |")


if __name__ == "__main__":
    main()
