"""The LLaMA suite: the baseline's training speed levers, each measured alone against the plain
configuration in the same run, the shipped optimized setting at 125M / 350M / 1.3B, and HF
transformers' LlamaForCausalLM of the 1.3B shape as the outside reference.

Every row is one process (worker.py); all of them see 64k tokens per optimizer step (gradient
accumulation), so the optimizer's fixed cost is amortized the same way.
"""
from __future__ import annotations

from pretrain.bench import worker

LLAMA_1B = "launch/configs/llama-1.3b.yaml"
LLAMA_125M = "launch/configs/llama-125m.yaml"
# GPT-3-medium-shaped LLaMA: 24 blocks, d 1024, 16 heads, SwiGLU 2816 (8/3 d rounded up to 256)
SHAPE_350M = ["model.structure=" + "T" * 24, "model.d_model=1024", "model.n_heads=16", "model.ffn_hidden=2816"]

# the plain framework, whatever the config ships with: every lever is measured on top of this
PLAIN = ["model.fused_kernels=false", "training.compile=false", "model.attention_backend=auto",
         "model.cross_entropy=megatron"]
FUSED = ["model.fused_kernels=true"]
CUDNN = ["model.attention_backend=cudnn"]
FLASH = ["model.attention_backend=flash"]
CHUNKED = ["model.cross_entropy=chunked"]
COMPILE = ["training.compile=true"]
# the setting the 1.3B config ships with (launch/configs/llama-1.3b.yaml), chosen from the levers below
BEST = [*FUSED, *COMPILE]

# name -> (overrides on the 1.3B config at seq 4096, tokens per micro-batch)
LEVERS: dict[str, tuple[list[str], int]] = {
    "baseline": ([], 16384),
    "attention: flash": (FLASH, 16384),
    "attention: cudnn": (CUDNN, 16384),
    "fused norm/RoPE/SwiGLU": (FUSED, 16384),
    "chunked cross-entropy": (CHUNKED, 16384),
    "compile blocks": (COMPILE, 16384),
    "fused + chunked cross-entropy": ([*FUSED, *CHUNKED], 16384),
    "fused, micro 8k": (FUSED, 8192),
    "fused, micro 32k": (FUSED, 32768),
    "compile + fused": ([*COMPILE, *FUSED], 16384),
}

# (label, config, shape overrides, tokens per micro-batch): baseline vs BEST at each size
SIZES = [("LLaMA-125M", LLAMA_125M, [], 32768), ("LLaMA-350M", LLAMA_125M, SHAPE_350M, 32768),
         ("LLaMA-1.3B", LLAMA_1B, [], 16384)]

# HF reference at the issue's two settings: eager micro-batch 2, torch.compile micro-batch 6
HF = {"HF LlamaForCausalLM, eager, micro 2": dict(micro_batch=2, grad_accum=8, compile=False),
      "HF LlamaForCausalLM, compiled, micro 6": dict(micro_batch=6, grad_accum=3, compile=True)}


def run(*, steps: int, warmup: int, tokens_per_step: int = 65536, levers: list[str] | None = None,
        sizes: bool = True, hf: bool = True, run_id: str = "", log=print) -> dict:
    """{"levers": {name: result}, "sizes": {label: {"baseline", "optimized"}}, "hf": {name: result}};
    every result carries `run_id`: the report takes ratios only between rows of one run."""
    common = dict(kind="train", tokens_per_step=tokens_per_step, steps=steps, warmup=warmup)
    out: dict = {"levers": {}, "sizes": {}, "hf": {}, "best": BEST}
    for name in levers if levers is not None else LEVERS:
        over, micro = LEVERS[name]
        r = worker.run({**common, "config": LLAMA_1B, "overrides": [*PLAIN, *over], "micro_tokens": micro})
        out["levers"][name] = {**r, "run": run_id}
        log(f"lever {name}: {line(r)}")
    for label, config, shape, micro in SIZES if sizes else []:
        pair = {}
        for variant, over in (("baseline", PLAIN), ("optimized", [*PLAIN, *BEST])):
            if label == "LLaMA-1.3B" and variant == "baseline" and "baseline" in out["levers"]:
                pair[variant] = out["levers"]["baseline"]  # the same measurement; not run twice
            elif label == "LLaMA-1.3B" and "compile + fused" in out["levers"]:
                pair[variant] = out["levers"]["compile + fused"]
            else:
                pair[variant] = {**worker.run({**common, "config": config, "overrides": [*shape, *over],
                                               "micro_tokens": micro}), "run": run_id}
            log(f"{label} {variant}: {line(pair[variant])}")
        out["sizes"][label] = pair
    for name, kw in HF.items() if hf else []:
        r = worker.run({"kind": "hf_train", "config": LLAMA_1B, "overrides": PLAIN, "steps": steps,
                        "warmup": warmup, **kw})
        out["hf"][name] = {**r, "run": run_id}
        log(f"{name}: {line(r)}")
    return out


def line(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"][-600:]
    return (f"{r['tokens_per_s']:,.0f} tok/s, {r['step_s'] * 1e3:.0f} ms/step, MFU {r.get('mfu', 0):.1%}, "
            f"peak {r['peak_gib']:.1f} GiB")
