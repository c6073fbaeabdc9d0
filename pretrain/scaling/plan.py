"""From a study to its runs: N, D, FLOPs, batch, LR, warm-up and layout of every run, by the rules
in study.Rules. `python -m pretrain scaling plan --study NAME` prints this table (a dry run).

N is counted exactly: each run's model is built on the meta device (no memory, every block type
and the padded vocabulary included). FLOPs per token come from the trainer's formula, so a
SUBLLM run is charged for the tokens its levels actually process."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.config import RunConfig, _merge, config_from_dict, decay_start, nest, read_yaml_mapping
from pretrain.errors import ConfigError
from pretrain.scaling.fit import si
from pretrain.scaling.study import Study


@dataclass
class RunPlan:
    name: str  # <arch>-<size>-s<seed>
    arch: str
    size: str
    seed: int
    n_total: int
    n_non_embedding: int
    n: int  # the N of the study (non-embedding or total)
    flops_per_token: float
    tokens_per_step: int
    steps: int  # the run's end = its largest D
    decay_points: list[int]  # the other D's, as steps
    global_batch: int  # sequences
    micro_batch: int
    lr: float
    warmup: int
    flops: float  # all FLOPs of the run, decay branches included
    gpu_hours: float  # estimate: flops / (peak x mfu)
    epochs: float  # passes over the training split
    tp: int
    dp: int
    config: RunConfig = field(repr=False)

    @property
    def tokens(self) -> list[int]:
        """The D values this run measures (after each decay), ascending."""
        return [p * self.tokens_per_step for p in sorted([*self.decay_points, self.steps])]

    @property
    def gpus(self) -> int:
        return self.tp * self.dp


def _base(study: Study, arch: str) -> dict[str, Any]:
    spec = study.architectures[arch]
    return _merge(read_yaml_mapping(spec.config), nest(spec.overrides))


def _structure(study: Study, arch: str, size, base: dict) -> str:
    from pretrain.models.structure import u_shaped

    if arch in size.structures:
        return size.structures[arch]
    family = base.get("model", {}).get("arch", "llama")
    if family == "subllm":
        return u_shaped(size.n_layers)
    return ("H" if family == "hgrnbit" else "T") * size.n_layers


def _config(study: Study, dotted: dict[str, Any], base: dict, where: str) -> RunConfig:
    try:
        return config_from_dict(_merge(base, nest(dotted)))
    except ConfigError as e:
        raise ConfigError(f"study {study.name}, {where}: {e}") from None


def _batch(study: Study, compute: float, d_min: float, dp: int) -> tuple[int, int]:
    """(global batch, micro-batch) in sequences: B = clamp(coef C^exp), but small enough that the
    smallest D still gets rules.min_steps steps; whole micro-batches on every DP rank."""
    r, seq = study.rules, study.seq_len
    tokens = min(max(r.batch_coef * compute ** r.batch_exp, r.min_batch_tokens), r.max_batch_tokens)
    tokens = min(tokens, d_min / r.min_steps)
    wanted = tokens / seq / dp  # sequences per rank
    micro = max(1, min(study.resources.micro_batch_size, int(wanted)))
    seqs = max(1, round(wanted / micro)) * micro * dp
    return seqs, micro


def plan_study(study: Study) -> list[RunPlan]:
    from pretrain.config import padded_vocab
    from pretrain.data import PackedDataset
    from pretrain.models.network import model_size
    from pretrain.trainer import flops_per_token

    data = PackedDataset(study.data, "train")
    if data.seq_len != study.seq_len:
        raise ConfigError(f"study {study.name}: seq_len={study.seq_len} but {study.data} holds sequences of "
                          f"{data.seq_len} tokens")
    res, rules = study.resources, study.rules
    if res.gpus_per_run % res.tensor:
        raise ConfigError(f"study {study.name}: resources.gpus_per_run={res.gpus_per_run} is not a multiple of "
                          f"resources.tensor={res.tensor}")
    dp = res.gpus_per_run // res.tensor
    plans = []
    for arch in study.architectures:
        base = _base(study, arch)
        for size in study.sizes:
            where = f"architecture {arch}, size {size.name}"
            # the study's data decides the vocabulary of every run (a base config's own is ignored)
            vocab = padded_vocab(data.vocab_size, base.get("model", {}).get("vocab_multiple", 128))
            shape = {"model.d_model": size.d_model, "model.n_heads": size.n_heads, "model.n_kv_heads": size.n_kv_heads,
                     "model.ffn_hidden": size.ffn, "model.structure": _structure(study, arch, size, base),
                     "model.seq_len": study.seq_len, "model.vocab_size": vocab}
            cfg = _config(study, shape, base, where)
            counts = model_size(cfg.model)
            n = counts["params_non_embedding" if study.n_kind == "non_embedding" else "params_total"]
            fpt = flops_per_token(cfg)
            t = study.tokens
            wanted = sorted({m * n for m in t.multiples} if t.multiples else {c / fpt for c in t.budgets})
            seqs, micro = _batch(study, fpt * wanted[-1], wanted[0], dp)
            per_step = seqs * study.seq_len
            points = sorted({max(1, round(d / per_step)) for d in wanted})
            steps, decay = points[-1], points[:-1]
            warmup = max(1, round(rules.warmup_tokens_per_param * n / per_step))
            warmup = min(warmup, decay_start(points[0], rules.decay_fraction))
            compute = fpt * per_step * steps
            lr = min(rules.max_lr, rules.lr_coef * compute ** rules.lr_exp)
            branch_steps = sum(p - decay_start(p, rules.decay_fraction) for p in decay)
            flops = fpt * per_step * (steps + branch_steps)
            for seed in study.seeds:
                name = f"{arch}-{size.name}-s{seed}"
                run = {
                    **shape, "name": name, "dir": str(Path(study.dir).resolve() / "runs" / name),
                    "data.path": str(Path(study.data).resolve()),
                    "training.steps": steps, "training.global_batch_size": seqs,
                    "training.micro_batch_size": micro, "training.seed": seed,
                    "training.eval_every": max(1, steps // 8), "training.eval_batches": study.eval_batches,
                    "training.log_every": max(1, steps // 20),
                    "optimizer.lr": lr, "optimizer.min_lr": lr * rules.min_lr_ratio,
                    "schedule.kind": "wsd", "schedule.warmup_steps": warmup,
                    "schedule.decay_fraction": rules.decay_fraction, "schedule.decay_points": decay,
                    "checkpoint.every": max(1, steps // 4), "checkpoint.keep_last": 1,
                    "checkpoint.resume": "auto",
                    "parallel.tensor": res.tensor, "parallel.zero_stage": res.zero_stage,
                    "tracking.enabled": True, "tracking.uri": study.uri(), "tracking.experiment": study.experiment,
                    "tracking.tags": {"study": study.name, "role": "run", "arch": arch, "size": size.name,
                                      "seed": str(seed), "n": str(n), "n_total": str(counts["params_total"]),
                                      "d_max": str(steps * per_step), "flops_per_token": f"{fpt:.6g}"},
                }
                plans.append(RunPlan(
                    name=name, arch=arch, size=size.name, seed=seed, n_total=counts["params_total"],
                    n_non_embedding=counts["params_non_embedding"], n=n, flops_per_token=fpt,
                    tokens_per_step=per_step, steps=steps, decay_points=decay, global_batch=seqs,
                    micro_batch=micro, lr=lr, warmup=warmup, flops=flops,
                    gpu_hours=flops / (res.peak_tflops * 1e12 * res.mfu) / 3600,
                    epochs=steps * per_step / (data.num_samples * study.seq_len), tp=res.tensor, dp=dp,
                    config=_config(study, run, base, where)))
    return plans


def plan_table(plans: list[RunPlan]) -> str:
    head = ["run", "N total", "N non-emb", "FLOPs/tok", "D (tokens, each decay end)", "steps", "batch",
            "lr", "warmup", "FLOPs", "GPU-h", "layout", "epochs"]
    rows = [[p.name, si(p.n_total), si(p.n_non_embedding), si(p.flops_per_token),
             ", ".join(si(d) for d in p.tokens), str(p.steps), f"{p.global_batch}x{p.micro_batch}",
             f"{p.lr:.2e}", str(p.warmup), si(p.flops), f"{p.gpu_hours:.3g}",
             f"tp{p.tp} dp{p.dp} ({p.gpus} GPU)", f"{p.epochs:.2f}"] for p in plans]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    total_flops, total_h = sum(p.flops for p in plans), sum(p.gpu_hours for p in plans)
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows),
             f"{len(plans)} runs, {si(total_flops)}FLOPs, ~{total_h:.3g} GPU-hours "
             f"(batch: global x micro sequences; D = steps x batch x seq_len)"]
    warning = design_warning(plans)
    if warning:
        lines.append(f"note: {warning}")
    worst = max(plans, key=lambda p: p.epochs)
    if worst.epochs > 1:
        lines.append(f"note: {worst.name} reads its data {worst.epochs:.1f} times (repeated tokens bend the "
                     "scaling law; Muennighoff et al. 2023 find up to ~4 epochs close to fresh data)")
    return "\n".join(lines)


def design_warning(plans: list[RunPlan], min_decades: float = 1.0) -> str | None:
    """L(N, D) separates N from D only if D/N varies: a ladder of D = m N with m over less than a
    decade puts every point near one line log D = log N + c, and the fit cannot tell A/N^α from
    B/D^β (the GPU study of docs/scaling.md ran into exactly this)."""
    import math

    ratios = [d / p.n for p in plans for d in p.tokens]
    spread = math.log10(max(ratios) / min(ratios))
    if spread < min_decades:
        return (f"D/N spans only {spread:.2f} decades over the ladder: N and D are nearly collinear and the "
                "fit will not separate alpha from beta; use tokens.budgets (IsoFLOP) or wider multiples")
    return None


def describe(plans: list[RunPlan]) -> list[dict[str, Any]]:
    """JSON-friendly rows (written next to the study's configs and logged to the parent run)."""
    keys = ("name", "arch", "size", "seed", "n_total", "n_non_embedding", "n", "flops_per_token",
            "tokens_per_step", "steps", "decay_points", "global_batch", "micro_batch", "lr", "warmup",
            "flops", "gpu_hours", "epochs", "tp", "dp")
    return [{**{k: getattr(p, k) for k in keys}, "tokens": p.tokens} for p in plans]

