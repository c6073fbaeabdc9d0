"""`python -m pretrain bench --suite all|llama|subllm|hgrnbit|flextron|griffin [--out DIR]`, and
`python -m pretrain bench --suite multigpu --gpus N [--parts ...]` (pretrain/bench/multigpu.py)."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from pretrain.bench.suites import NAMES


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="GPU speed of every architecture against its baseline (docs/benchmarks.md)")
    b.add_argument("--suite", nargs="+", default=["all"], choices=["all", *NAMES, "multigpu"],
                   help="suites to run (all = every one-GPU suite, ~30 min on one H200; each fits one 10-minute "
                        "call); multigpu: the TP x PP x DP grid on --gpus GPUs, run alone")
    b.add_argument("--gpus", type=int, default=None, help="multigpu: GPUs of this host to use (2, 4 or 8)")
    b.add_argument("--parts", nargs="+", default=None, choices=["correctness", "scaling", "resume"],
                   help="multigpu: which parts (default all three)")
    b.add_argument("--models", nargs="+", default=None, choices=["llama", "subllm"],
                   help="multigpu scaling: which models (default both)")
    b.add_argument("--data", default=None, help="multigpu resume: a prepared corpus of seq 4096 (default: one "
                                                "made from the standard library)")
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

    if "multigpu" in args.suite:
        return _multigpu(args)

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


def _multigpu(args) -> int:
    import json
    import tempfile

    import torch

    from pretrain.bench import multigpu, report
    from pretrain.bench.timing import machine

    if len(args.suite) > 1:
        print("error: --suite multigpu runs alone", file=sys.stderr)
        return 2
    visible = torch.cuda.device_count()
    if args.gpus is None or not 1 <= args.gpus <= visible:
        print(f"error: --suite multigpu needs --gpus N with 1 <= N <= the {visible} GPUs visible here "
              "(1: the one-GPU rows only)", file=sys.stderr)
        return 2
    models = {m: multigpu.MODELS[m] for m in args.models or multigpu.MODELS}
    command = "python -m pretrain bench " + shlex.join(sys.argv[2:])
    out, res = Path(args.out) / "multigpu.json", {"gpus": args.gpus}
    out.parent.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(multigpu.stdlib_corpus(multigpu.RESUME_CONFIG, Path(tmp) / "corpus", log=log))
        for part in args.parts or multigpu.PARTS:  # written after each part: a long series keeps what it measured
            res.update(multigpu.run(args.gpus, data=data, parts=(part,), models=models, steps=args.steps,
                                    warmup=args.warmup, log=log))
            out.write_text(json.dumps({"machine": machine(), "command": command, **res}, indent=1))
            section = multigpu.render(res, command, machine())
            if not args.no_doc:
                report.update_doc(Path(args.doc), section, markers=(multigpu.BEGIN, multigpu.END))
    print(section)
    return 0
