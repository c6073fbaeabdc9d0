"""Command line: `python -m pretrain <command>` (also installed as `frugal`).

    train          --config launch/configs/NAME.yaml [dotted.key=value ...]   (torchrun for N > 1)
    prepare-data   --input FILES/GLOBS --tokenizer train|PATH --seq-len N --out DIR
    generate       --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [--griffin-density 0.5] [--budget 0.5|auto]
    eval-griffin   --checkpoint DIR --data DIR   (GRIFFIN vs baselines: perplexity, greedy agreement)
    export-ternary --checkpoint DIR --out DIR    (a ternary model as 2-bit packed codes + scales)
    elastify       --checkpoint DIR --calib-data DIR --out DIR [--set key=value ...]   (Flextron: sort units)
    export         --checkpoint DIR --budget 0.5 --out DIR   (Flextron: a budget's sub-network as a plain model)
    elastic-profile --config FILE --out latency.json  (Flextron: per-block decode latency of every width)
    scaling        plan|run|fit --study NAME    (scaling-law ladders tracked in MLflow; docs/scaling.md)
    bench          --suite all|llama|subllm|hgrnbit|flextron|griffin   (GPU speed vs baselines; docs/benchmarks.md)

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
    from parallel.distributed import rank_from_env
    from pretrain.config import load_config
    from pretrain.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if rank_from_env() == 0:
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
    budget = args.budget
    if budget is not None and budget != "auto":
        try:
            budget = float(budget)
        except ValueError:
            raise ConfigError(f"--budget {budget!r}: give a fraction such as 0.5, or auto") from None
    gen = Generator(args.checkpoint, packed=args.packed, budget=budget, budget_target=args.budget_target)
    gen.compile = args.compile
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

    from parallel.distributed import rank_from_env

    rows = eval_griffin.run(args.checkpoint, args.data, num_docs=args.docs, prompt_len=args.prompt_len,
                            densities=args.densities, methods=args.methods, gen_tokens=args.gen_tokens,
                            batch=args.batch, out=args.out)
    if rank_from_env() == 0:
        print(eval_griffin.table(rows))
    return 0


def cmd_export_ternary(args) -> int:
    from parallel.distributed import rank_from_env
    from pretrain.export import export_ternary

    summary = export_ternary(args.checkpoint, args.out, overwrite=args.overwrite)
    if rank_from_env() == 0:
        print(f"packed {summary['layers']} ternary layers ({summary['packed_bytes'] / 2**20:.2f} MiB of codes, "
              f"scales and norms per rank, TP={summary['tp']}) into {args.out}")
    return 0


def cmd_elastify(args) -> int:
    from pretrain.elastify import elastify, parse_overrides

    s = elastify(args.checkpoint, args.calib_data, args.out, batches=args.calib_batches, batch_size=args.batch_size,
                 overwrite=args.overwrite, elastic_overrides=parse_overrides(args.set))
    cap = s["captured_top_half"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"sorted {s['units']['mlp']} MLP neurons ({s['moved']['mlp']} moved) and {s['units']['heads']} query "
          f"groups ({s['moved']['heads']} moved) in {s['layers']} blocks by importance on {s['tokens']} tokens")
    print(f"verified: the permuted model's logits differ by at most {s['max_logit_diff']:.2e}; the top half of "
          f"the units holds {mean(cap['mlp']):.1%} of the MLP importance and {mean(cap['heads']):.1%} of the "
          f"attention importance (mean over blocks)")
    print(f"wrote {s['out']} (model.elastic enabled; train from it with checkpoint.init_from={s['out']})")
    return 0


def cmd_export(args) -> int:
    from pretrain.subnetwork import export_subnetwork

    s = export_subnetwork(args.checkpoint, args.budget, args.out, overwrite=args.overwrite)
    print(f"budget {s['budget']:g}: MLP widths {s['mlp_widths']}, query groups {s['query_groups']}; "
          f"{s['params'] / 1e6:.2f}M of {s['params_full'] / 1e6:.2f}M parameters; predicted cost "
          f"{s['predicted_cost']:.3f} of the full model ({s['cost_unit']}); wrote {args.out}")
    return 0


def cmd_elastic_profile(args) -> int:
    from pretrain.config import load_config
    from pretrain.elastic_profile import profile, write

    cfg = load_config(args.config, args.overrides)
    table = profile(cfg.model, batch=args.batch, context=args.context, repeats=args.repeats)
    write(table, args.out)
    print(f"{table['device']}: full decode step {table['full_ms']:.3f} ms predicted (batch {table['batch']}, "
          f"context {table['context']}); MLP ms per block {[round(x, 4) for x in table['mlp_ms'][0]]} for widths "
          f"{table['mlp_widths']}; attention {[round(x, 4) for x in table['attn_ms'][0]]} for query groups "
          f"{table['head_groups']}; wrote {args.out}")
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
    g.add_argument("--budget", default=None,
                   help="elastic (Flextron) models: a fraction serves the static router's sub-network for it; "
                        "auto: the adaptive router picks widths per prompt")
    g.add_argument("--budget-target", type=float, default=None,
                   help="--budget auto: the budget the adaptive router routes for (default: its middle budget)")
    g.add_argument("--packed", action="store_true",
                   help="ternary models: decode with 2-bit packed weights and int8 kernels (exports always do)")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (fewer, fused kernels; pays compile time once)")
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

    el = sub.add_parser("elastify", help="Flextron: sort MLP neurons and query groups by importance (elastic model)")
    el.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir or a step_* dir (TP=1)")
    el.add_argument("--calib-data", required=True, help="a prepare-data folder: the first train sequences calibrate")
    el.add_argument("--out", required=True, help="the weights-only elastic model folder")
    el.add_argument("--calib-batches", type=int, default=8)
    el.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch")
    el.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    el.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="model.elastic fields (YAML values), e.g. 'ffn_fractions=[1.0,0.5]' neuron_granularity=64")
    el.set_defaults(fn=cmd_elastify)

    ex = sub.add_parser("export", help="Flextron: write a budget's sub-network as a standalone plain model")
    ex.add_argument("--checkpoint", required=True, help="an elastic model: run dir, checkpoints/ dir or a folder")
    ex.add_argument("--budget", type=float, required=True, help="a budget the static router was trained for")
    ex.add_argument("--out", required=True, help="the export folder (train, generate, export from it)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    ex.set_defaults(fn=cmd_export)

    pr = sub.add_parser("elastic-profile", help="Flextron: measure per-block decode latency of every offered width")
    pr.add_argument("--config", required=True, help="a run config with model.elastic enabled and model.vocab_size")
    pr.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    pr.add_argument("--out", required=True, help="the latency table (JSON) for model.elastic.latency_table")
    pr.add_argument("--batch", type=int, default=1, help="decode batch")
    pr.add_argument("--context", type=int, default=1024, help="tokens already in the KV cache")
    pr.add_argument("--repeats", type=int, default=20)
    pr.set_defaults(fn=cmd_elastic_profile)

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

    from pretrain.bench.cli import add_parser as add_bench

    add_bench(sub)
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
