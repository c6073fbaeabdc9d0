"""One measurement in a fresh process: `python -m pretrain.bench.worker '<json spec>'`.

A DeepSpeed engine is not fully released inside one process, so the next configuration's peak
memory would include the previous one's leftovers: every training configuration runs alone, and
`run` below starts it and reads back the one `RESULT {...}` line it prints.

Spec kinds:
    train     the framework's path: {"config", "overrides", "micro_tokens", "tokens_per_step", "steps", "warmup"}
    hf_train  HF transformers' LlamaForCausalLM of a config's shape (SDPA, bf16 weights, fused AdamW),
              the reference the issue names: {"config", "micro_batch", "grad_accum", "compile", ...}
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def run(spec: dict, timeout: float = 900) -> dict:
    """Runs one spec in a subprocess; a failure comes back as {"error": the output's tail}."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        out = subprocess.run([sys.executable, "-m", "pretrain.bench.worker", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (out.stdout[-1500:] + out.stderr[-2500:])}
    return json.loads(line[len("RESULT "):])


def _load(spec: dict):
    from pretrain.config import load_config

    return load_config(spec["config"], list(spec.get("overrides", [])))


def train(spec: dict) -> dict:
    import torch

    from parallel.distributed import init_distributed
    from pretrain.bench.timing import bench_train
    from pretrain.models import build_network

    init_distributed(1)
    cfg = _load(spec)
    torch.manual_seed(0)
    model = build_network(cfg.model).cuda()
    if cfg.training.compile:
        from pretrain.models.fused import compile_blocks

        compile_blocks(model)
    seq = cfg.model.seq_len
    mb = max(1, spec["micro_tokens"] // seq)
    return bench_train(cfg, model, micro_batch=mb, grad_accum=max(1, spec["tokens_per_step"] // (mb * seq)),
                       steps=spec["steps"], warmup=spec["warmup"])


def hf_train(spec: dict) -> dict:
    """The same shape as the config in HF transformers: pure bf16 weights and AdamW states (no fp32
    master copy: cheaper than the framework's ZeRO-1 mixed precision), fused AdamW, SDPA attention,
    HF's own loss (which upcasts the logits to fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.bench.timing import cuda_time, summarize
    from pretrain.trainer import flops_per_token

    cfg = _load(spec)
    m = cfg.model
    hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden,
                     num_hidden_layers=m.n_blocks, num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads,
                     max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_base,
                     tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if spec.get("compile") else model
    mb, accum, seq = spec["micro_batch"], spec["grad_accum"], m.seq_len
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch = torch.randint(0, m.vocab_size, (mb, seq), device="cuda", generator=gen)

    def step():
        for _ in range(accum):
            (fwd(input_ids=batch, labels=batch).loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = cuda_time(step, spec["steps"])
    import transformers

    return {**summarize(times, mb * accum * seq, flops_per_token(cfg)), "micro_batch": mb, "grad_accum": accum,
            "seq": seq, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "transformers": transformers.__version__}


KINDS = {"train": train, "hf_train": hf_train}


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    spec = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(KINDS[spec["kind"]](spec)), flush=True)


if __name__ == "__main__":
    main()
