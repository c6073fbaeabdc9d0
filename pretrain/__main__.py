"""Command line: `python -m pretrain <command>` (also installed as `frugal`).

    train          --config launch/configs/NAME.yaml [dotted.key=value ...]   (torchrun for N > 1)
    prepare-data   --input FILES/GLOBS --tokenizer train|PATH --seq-len N --out DIR
    generate       --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [--griffin-density 0.5]
    eval-griffin   --checkpoint DIR --data DIR   (GRIFFIN vs baselines: perplexity, greedy agreement)
    export-ternary --checkpoint DIR --out DIR    (a ternary model as 2-bit packed codes + scales)
    scaling        plan|run|fit --study NAME    (scaling-law ladders tracked in MLflow; docs/scaling.md)

User errors (config, data, checkpoint) print one clear message and exit with code 2; heavy
libraries are imported only after the arguments are checked.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path


def _quiet() -> None:
    # megatron-core and DeepSpeed warn loudly about optional fused kernels we never use
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_train(args) -> int:
    from pretrain.config import load_config
    from pretrain.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        hist = result["history"]
        if hist:
            first, last = hist[0], hist[-1]
            print(f"done: loss {first['loss']:.3f} -> {last['loss']:.3f} over steps {first['step']}-{last['step']}; "
                  f"checkpoint {result['checkpoint']}")
        print(f"look at the run:  {result['ui']}")
    return 0


def cmd_prepare(args) -> int:
    from pretrain.data import prepare_data

    meta = prepare_data(args.input, args.tokenizer, args.seq_len, Path(args.out), vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                        workers=args.workers, seed=args.seed, overwrite=args.overwrite)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"wrote {tr['samples']} train / {va['samples']} val sequences of {meta['seq_len'] + 1} tokens in "
          f"{len(tr['shards']) + len(va['shards'])} shards to {args.out} (vocab {meta['vocab_size']})")
    return 0


def cmd_generate(args) -> int:
    from pretrain.errors import ConfigError
    from pretrain.generate import Generator, SamplingConfig
    from pretrain.models.griffin import FFSelection

    try:
        ff = FFSelection(density=args.griffin_density, method=args.griffin_method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    gen = Generator(args.checkpoint, packed=args.packed)
    s = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed)
    texts = gen.generate(args.prompt, s, num_samples=args.num_samples, ff=ff)
    if gen.layout.is_rank0:
        for i, t in enumerate(texts):
            print(f"--- sample {i} ---\n{t}")
        if gen.levels:  # SUBLLM: how many tokens the inference rule kept (train-time target: the keep ratio)
            stats = gen.keep_stats()
            print("kept per level (score > 0, prefill + decode): " +
                  ", ".join(f"level {lvl} {frac:.3f}" for lvl, frac in stats.items()))
    return 0


def cmd_eval_griffin(args) -> int:
    from pretrain import eval_griffin

    rows = eval_griffin.run(args.checkpoint, args.data, num_docs=args.docs, prompt_len=args.prompt_len,
                            densities=args.densities, methods=args.methods, gen_tokens=args.gen_tokens,
                            batch=args.batch, out=args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(eval_griffin.table(rows))
    return 0


def cmd_export_ternary(args) -> int:
    from pretrain.export import export_ternary

    summary = export_ternary(args.checkpoint, args.out, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"packed {summary['layers']} ternary layers ({summary['packed_bytes'] / 2**20:.2f} MiB of codes, "
              f"scales and norms per rank, TP={summary['tp']}) into {args.out}")
    return 0


def cmd_scaling(args) -> int:
    from pretrain.scaling.plan import plan_study, plan_table
    from pretrain.scaling.study import find_study, load_study

    study = load_study(args.study)
    if args.action == "fit":
        from pretrain.scaling.results import fit_study

        print(fit_study(study, bootstrap=args.bootstrap)["table"])
        return 0
    plans = plan_study(study)
    if args.only:
        plans = [p for p in plans if any(part in p.name for part in args.only)]
    print(plan_table(plans))
    if args.action == "plan":
        return 0
    from pretrain.scaling import runner

    configs = runner.write_configs(study, plans, runner.parent_run(study, find_study(args.study), plans))
    if args.slurm:
        path = runner.write_sbatch(study, plans, configs)
        print(f"wrote {path}" + ("" if args.submit else f"; submit it with: sbatch {path}"))
        if args.submit:
            return subprocess.call(["sbatch", str(path)])
        return 0
    failed = runner.run_local(study, plans, configs, concurrent=args.concurrent or study.resources.concurrent)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (logs: <run dir>/train.log); "
              "run the same command again to resume them", file=sys.stderr)
        return 1
    print(f"all {len(plans)} runs finished; next: python -m pretrain scaling fit --study {args.study}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="launch/configs/NAME.yaml")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. parallel.tensor=2")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("prepare-data", help="tokenize text into webdataset shards of packed sequences")
    d.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl files or globs (** allowed)")
    d.add_argument("--tokenizer", required=True, help="'train' (byte-level BPE on the input) or a tokenizer.json")
    d.add_argument("--seq-len", type=int, required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--vocab-size", type=int, default=8192, help="when training a tokenizer")
    d.add_argument("--val-fraction", type=float, default=0.01)
    d.add_argument("--samples-per-shard", type=int, default=2048)
    d.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    d.add_argument("--seed", type=int, default=1234)
    d.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    d.set_defaults(fn=cmd_prepare)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir or a step_* dir")
    g.add_argument("--prompt", required=True, action="append",
                   help="repeat for several prompts (of any lengths), decoded together")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--griffin-density", type=float, default=1.0,
                   help="fraction of FF neurons each decoded token uses, chosen per prompt (1.0 = full model)")
    g.add_argument("--griffin-method", default="griffin", choices=["griffin", "magnitude", "random"],
                   help="how the neurons are chosen: by the prompt's activations (GRIFFIN) or a baseline")
    g.add_argument("--packed", action="store_true",
                   help="ternary models: decode with 2-bit packed weights and int8 kernels (exports always do)")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval-griffin", help="continuation perplexity and greedy agreement of GRIFFIN vs baselines")
    e.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir or a step_* dir")
    e.add_argument("--data", required=True, help="a prepare-data folder: its val split holds the documents")
    e.add_argument("--docs", type=int, default=64, help="held-out sequences to evaluate")
    e.add_argument("--prompt-len", type=int, default=64, help="tokens of each sequence used as the prompt")
    e.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens compared with the full model's")
    e.add_argument("--densities", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    e.add_argument("--methods", nargs="+", default=["griffin", "magnitude", "random"])
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--out", default=None, help="also write the rows as JSON here")
    e.set_defaults(fn=cmd_eval_griffin)

    x = sub.add_parser("export-ternary", help="write a ternary checkpoint as 2-bit packed codes + scales")
    x.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir or a step_* dir")
    x.add_argument("--out", required=True, help="the export folder (generate --checkpoint loads it)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    x.set_defaults(fn=cmd_export_ternary)

    sc = sub.add_parser("scaling", help="scaling-law studies: plan a ladder, run it, fit L(N, D)")
    sc.add_argument("action", choices=["plan", "run", "fit"],
                    help="plan: print every run's N, D, FLOPs, batch, LR, GPU-hours (dry run); run: train them; "
                         "fit: read the runs back from MLflow, fit, plot, log the fit")
    sc.add_argument("--study", required=True, help="launch/studies/NAME.yaml, or just NAME")
    sc.add_argument("--only", nargs="+", default=None, help="plan/run: only runs whose name contains one of these")
    sc.add_argument("--concurrent", type=int, default=None, help="run: runs at once (default: the study's)")
    sc.add_argument("--slurm", action="store_true", help="run: write a slurm array job instead of running here")
    sc.add_argument("--submit", action="store_true", help="run --slurm: also sbatch it")
    sc.add_argument("--bootstrap", type=int, default=200, help="fit: bootstrap resamples for the intervals")
    sc.set_defaults(fn=cmd_scaling)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    from pretrain.errors import FrugalError

    try:
        return args.fn(args)
    except FrugalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
