"""`python -m pretrain bench --suite all|llama|subllm|hgrnbit|flextron|griffin [--out DIR]`."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from pretrain.bench.suites import NAMES


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="GPU speed of every architecture against its baseline (docs/benchmarks.md)")
    b.add_argument("--suite", nargs="+", default=["all"], choices=["all", *NAMES],
                   help="suites to run (all = every one, ~30 min on one H200; each fits one 10-minute call)")
    b.add_argument("--out", default="docs/results/bench", help="folder of latest.json (suites merged into it)")
    b.add_argument("--doc", default="docs/benchmarks.md", help="markdown file whose bench section is rewritten")
    b.add_argument("--no-doc", action="store_true", help="write only the JSON")
    b.add_argument("--steps", type=int, default=6, help="timed optimizer steps per training configuration (median)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
    b.add_argument("--levers", nargs="*", default=None,
                   help="llama: only these levers (names in pretrain/bench/llama.py; none = skip the levers)")
    b.add_argument("--no-sizes", action="store_true", help="llama: skip the 125M/350M/1.3B pairs")
    b.add_argument("--no-hf", action="store_true", help="llama: skip the HF transformers reference")
    b.set_defaults(fn=cmd_bench)


def cmd_bench(args) -> int:
    if args.steps < 1 or args.warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    from pretrain.bench import llama

    unknown = [n for n in args.levers or [] if n not in llama.LEVERS]
    if unknown:
        print(f"error: unknown lever(s) {unknown}; known: {list(llama.LEVERS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: `bench` measures GPU speed and needs CUDA; no CUDA device is visible here", file=sys.stderr)
        return 2
    from pretrain.bench import report, suites
    from pretrain.bench.timing import machine

    run_id = time.strftime("%Y-%m-%d %H:%M")  # tags the llama rows: ratios only within one run
    names = NAMES if "all" in args.suite else list(dict.fromkeys(args.suite))
    run = {"machine": machine(), "command": "python -m pretrain bench " + shlex.join(sys.argv[2:]), "suites": {}}
    print(f"bench {names} on {run['machine']}", flush=True)
    for name in names:
        kw = dict(levers=args.levers, sizes=not args.no_sizes, hf=not args.no_hf) if name == "llama" else {}
        run["suites"][name] = suites.run(name, steps=args.steps, warmup=args.warmup, run_id=run_id,
                                         log=lambda s: print(s, flush=True), **kw)
        data = report.merge_json(Path(args.out) / "latest.json", {**run, "suites": {name: run["suites"][name]}})
        section = report.render(data)
        if not args.no_doc:
            report.update_doc(Path(args.doc), section)
    print(section)
    return 0
