"""`python -m pretrain bench --suite multigpu --gpus N`: the TP x PP x DP grid on N GPUs of one host
(NCCL), in three parts, each a series of torchrun launches (docs/benchmarks.md, multi-GPU section):

1. correctness  SUBLLM-1.3B, a few steps at TP=2 x PP=2 x DP=2 (8 GPUs), TP=2 x PP=2 (4), TP=2 and
                PP=2 separately (2) against TP=1 x PP=1 x DP=1, on the same global batches
                (pretrain/bench/grid.py feeds every layout the same ones): the losses, within bf16.
2. scaling      LLaMA-1.3B and SUBLLM-1.3B, tokens/s per GPU at one GPU (ZeRO-1, ZeRO-2), at DP=N
                (ZeRO-1, ZeRO-2; the per-GPU batch fixed: weak scaling), at TP=2 and at PP=2 (one
                model replica, the one-GPU global batch): DP efficiency, TP and PP overheads.
3. resume       SUBLLM-250M through `python -m pretrain train` on a real corpus: save at the largest
                grid (TP=2 x PP=2 x DP=N/4), resume at DP=N and at one GPU through a universal checkpoint:
                the steps after it, the samples consumed.

Runs on CPU too (gloo, processes for GPUs), with small configs: the tests drive it so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {"llama": "launch/configs/llama-1.3b.yaml", "subllm": "launch/configs/subllm-1.3b.yaml"}
RESUME_CONFIG = "launch/configs/subllm-250m.yaml"
PARTS = ("correctness", "scaling", "resume")


def correctness_layouts(gpus: int) -> list[tuple[int, int]]:
    """(tp, pp) grids checked against one GPU; DP fills the rest of the GPUs."""
    return [(2, 1), (1, 2)] if gpus == 2 else [(2, 2)] if gpus % 4 == 0 else []


def launch(nproc: int, argv: list[str], *, timeout: float, log=print) -> tuple[int, str]:
    """`argv` under torchrun on `nproc` local processes (or one plain process); (return code, output)."""
    from parallel.distributed import free_port

    cmd = [sys.executable, *argv] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *argv]
    # a fresh rendezvous: none of a surrounding job's (or an in-process group's) rank and port settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return 124, out + f"\ntimed out after {timeout:.0f} s"
    if proc.returncode:
        log(f"FAILED ({proc.returncode}): {' '.join(argv[:3])} ...\n{out[-3000:]}")
    return proc.returncode, out


def grid_run(config: str, overrides: list[str], nproc: int, *, steps: int, warmup: int, timeout: float,
             log=print) -> dict:
    """One pretrain/bench/grid.py run; its result, or {"error"}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {"config": config, "overrides": [f"dir={tmp}/run", *overrides], "steps": steps, "warmup": warmup,
                "out": str(out)}
        rc, text = launch(nproc, ["-m", "pretrain.bench.grid", json.dumps(spec)], timeout=timeout, log=log)
        if rc or not out.exists():
            return {"error": text[-2000:], "overrides": overrides, "nproc": nproc}
        return {**json.loads(out.read_text()), "overrides": overrides, "nproc": nproc}


def layout(tp: int = 1, pp: int = 1, zero: int = 1) -> list[str]:
    return [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.zero_stage={zero}"]


def correctness(gpus: int, *, config: str, extra: list[str], steps: int, rel_tol: float, timeout: float,
                log=print) -> dict:
    """Each grid's per-step losses against one GPU's on the same global batches (8 sequences in
    micro-batches of one: every DP rank gets several, every pipeline more micro-batches than stages)."""
    extra = [*extra, "training.global_batch_size=8", "training.micro_batch_size=1",
             "schedule.warmup_steps=1"]  # the full learning rate at once: the steps move the weights
    ref = grid_run(config, [*extra, *layout()], 1, steps=steps, warmup=0, timeout=timeout, log=log)
    out = {"reference": ref, "grids": []}
    for tp, pp in correctness_layouts(gpus):
        r = grid_run(config, [*extra, *layout(tp, pp)], gpus, steps=steps, warmup=0, timeout=timeout, log=log)
        if "error" not in r and "error" not in ref:
            gaps = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"], strict=True)]
            r["max_rel_gap"] = max(gaps)
            r["ok"] = r["max_rel_gap"] <= rel_tol
        out["grids"].append(r)
        log(f"correctness tp {tp} x pp {pp} x dp {gpus // (tp * pp)}: "
            f"{r.get('max_rel_gap', r.get('error', '')[-200:])}")
    return out


def scaling(gpus: int, *, models: dict[str, str], extra: list[str], per_gpu_batch: int, steps: int, warmup: int,
            timeout: float, log=print) -> dict:
    """tokens/s per GPU: one GPU (ZeRO-1, ZeRO-2), DP=N (ZeRO-1, ZeRO-2; per-GPU batch fixed), TP=2 and
    PP=2 (one replica with the one-GPU batch); efficiencies against one GPU at the same ZeRO stage."""
    out = {}
    for name, config in models.items():
        runs = {}
        for label, nproc, lay, batch in [
            ("1 GPU, ZeRO-1", 1, layout(zero=1), per_gpu_batch), ("1 GPU, ZeRO-2", 1, layout(zero=2), per_gpu_batch),
            (f"DP={gpus}, ZeRO-1", gpus, layout(zero=1), per_gpu_batch * gpus),
            (f"DP={gpus}, ZeRO-2", gpus, layout(zero=2), per_gpu_batch * gpus),
            ("TP=2", 2, layout(tp=2), per_gpu_batch), ("PP=2", 2, layout(pp=2), per_gpu_batch),
        ]:
            if nproc > gpus or (label.startswith("DP=") and gpus == 1):
                continue
            runs[label] = r = grid_run(config, [*extra, *lay, f"training.global_batch_size={batch}"], nproc,
                                       steps=steps, warmup=warmup, timeout=timeout, log=log)
            base = runs.get(f"1 GPU, ZeRO-{2 if 'ZeRO-2' in label else 1}", {})
            if "error" not in r and "tokens_per_s_per_gpu" in base:
                r["efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
            eff = f", {r['efficiency']:.1%} of one GPU" if "efficiency" in r else ""
            log(f"{name} {label}: {r.get('tokens_per_s_per_gpu', 0):,.0f} tokens/s per GPU{eff}"
                f"{r.get('error', '')[-300:]}")
        out[name] = runs
    return out


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {str(r["step"]): r for r in rows if "loss" in r}  # (str: the JSON's keys)


def resume(gpus: int, *, config: str, extra: list[str], timeout: float, workdir: Path, log=print) -> dict:
    """Save at the largest grid, resume its middle checkpoint at DP=N and at one GPU (CLI train)."""
    tp, pp = (2, 2) if gpus >= 4 else (1, 2)
    base = ["training.steps=6", "checkpoint.every=3", "training.eval_every=3",
            "training.global_batch_size=16", "training.micro_batch_size=1", "tracking.enabled=false", *extra]
    saved = workdir / "saved"
    train = ["-m", "pretrain", "train", "--config", config]
    rc, text = launch(gpus, [*train, f"dir={saved}", *base, *layout(tp, pp)], timeout=timeout, log=log)
    if rc:
        return {"error": text[-2000:]}
    out = {"saved_at": {"tp": tp, "pp": pp, "dp": gpus // (tp * pp)}, "uninterrupted": _metrics(saved), "resumed": {}}
    for label, nproc in ((f"DP={gpus}", gpus), ("1 GPU", 1)):
        run = workdir / label.replace(" ", "").replace("=", "")
        shutil.copytree(saved, run, ignore=shutil.ignore_patterns("step_000006"))
        (run / "checkpoints" / "latest").write_text("step_000003")
        (run / "metrics.jsonl").write_text("")
        rc, text = launch(nproc, [*train, f"dir={run}", *base, *layout()], timeout=timeout, log=log)
        res = {"error": text[-2000:]} if rc else {"steps": _metrics(run), "converted": "universal checkpoint" in text}
        out["resumed"][label] = res
        log(f"resume at {label}: " + ("failed" if rc else ", ".join(
            f"step {s} loss {m['loss']:.4f} (uninterrupted {out['uninterrupted'][s]['loss']:.4f})"
            for s, m in res["steps"].items())))
    return out


def run(gpus: int, *, data: str, parts=PARTS, models: dict[str, str] = MODELS, resume_config: str = RESUME_CONFIG,
        extra: list[str] = (), steps: int = 5, warmup: int = 2, per_gpu_batch: int = 16, rel_tol: float = 2e-2,
        timeout: float = 900, log=print) -> dict:
    """The parts asked for, every run on the prepared corpus `data` (grid runs read only its layout,
    the resume drill its samples; `stdlib_corpus` makes one); `extra`: overrides for every run (the
    tests shrink the models with them)."""
    out = {"gpus": gpus}
    extra = [f"data.path={data}", *extra]
    if "correctness" in parts:
        out["correctness"] = correctness(gpus, config=models.get("subllm", MODELS["subllm"]), extra=extra,
                                         steps=steps, rel_tol=rel_tol, timeout=timeout, log=log)
    if "scaling" in parts:
        out["scaling"] = scaling(gpus, models=models, extra=extra, per_gpu_batch=per_gpu_batch, steps=steps,
                                 warmup=warmup, timeout=timeout, log=log)
    if "resume" in parts and gpus < 2:
        out["resume"] = {"error": "a layout change needs 2 or more GPUs"}
    elif "resume" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            out["resume"] = resume(gpus, config=resume_config, extra=extra, timeout=timeout, workdir=Path(tmp), log=log)
    return out


def stdlib_corpus(config: str, out: Path, log=print) -> Path:
    """A real corpus where none is given: this interpreter's standard library, tokenized for the
    config's sequence length and vocabulary."""
    import sysconfig

    from pretrain.config import load_config
    from pretrain.data import prepare_data

    m = load_config(config, []).model
    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    log(f"preparing a corpus of {len(files)} standard-library files (seq {m.seq_len}, vocab {m.vocab_size})")
    prepare_data(files, "train", m.seq_len, out, vocab_size=m.vocab_size or 32000, val_fraction=0.02)
    return out


BEGIN, END = "<!-- multigpu:begin (written by python -m pretrain bench --suite multigpu) -->", "<!-- multigpu:end -->"


def render(res: dict, command: str, machine: dict) -> str:
    """The multi-GPU section of docs/benchmarks.md."""
    lines = [BEGIN, f"### Latest run: {res['gpus']} GPU{'s' if res['gpus'] > 1 else ''} of one host (`{command}`)", "",
             ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    if "correctness" in res:
        c = res["correctness"]
        lines += ["#### Correctness: SUBLLM-1.3B losses against one GPU, same global batches", "",
                  "| layout | losses | max relative gap | within bf16 |", "|---|---|---|---|",
                  f"| 1 GPU | {_losses(c['reference'])} | | |"]
        for g in c["grids"]:
            lay = g.get("layout") or {}
            lines.append(f"| TP={lay.get('tp', '?')} x PP={lay.get('pp', '?')} x DP={lay.get('dp', '?')} | {_losses(g)} | "
                         f"{g.get('max_rel_gap', float('nan')):.2e} | {'yes' if g.get('ok') else 'NO'} |")
        lines.append("")
    for name, runs in res.get("scaling", {}).items():
        lines += [f"#### Scaling: {name}", "", "| run | tokens/s per GPU | of one GPU | MFU | peak GiB |",
                  "|---|---|---|---|---|"]
        for label, r in runs.items():
            if "error" in r:
                lines.append(f"| {label} | failed | | | |")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else ""
            eff = f"{r['efficiency']:.1%}" if "efficiency" in r else ""
            lines.append(f"| {label} | {r['tokens_per_s_per_gpu']:,.0f} | {eff} | {mfu} | {r['peak_gib']:.1f} |")
        lines.append("")
    if "resume" in res:
        r = res["resume"]
        lines += ["#### Resume on another layout: SUBLLM-250M, saved at step 3", ""]
        if "error" in r:
            lines += ["failed: " + r["error"].strip()[-300:], ""]
        else:
            s = r["saved_at"]
            lines += [f"Saved at TP={s['tp']} x PP={s['pp']} x DP={s['dp']}.", "",
                      "| run | loss, steps 4-6 | samples consumed at step 6 |", "|---|---|---|",
                      f"| uninterrupted | {_steps(r['uninterrupted'])} | {r['uninterrupted']['6']['samples_consumed']} |"]
            for label, x in r["resumed"].items():
                lines.append(f"| resumed at {label} | " + ("failed |  |" if "error" in x else
                             f"{_steps(x['steps'])} | {x['steps']['6']['samples_consumed']} |"))
            lines.append("")
    return "\n".join(lines + [END])


def _losses(r: dict) -> str:
    return "failed" if "error" in r else " ".join(f"{x:.4f}" for x in r["losses"])


def _steps(m: dict) -> str:
    return " ".join(f"{m[s]['loss']:.4f}" for s in ("4", "5", "6") if s in m)
