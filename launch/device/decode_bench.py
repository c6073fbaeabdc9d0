"""Decode throughput of a model through the generation engine (KV caches; for SUBLLM per-level
caches under the inference rule keep iff score > 0; HGRN-Bit's recurrent states; the decode step
replayed as CUDA graphs). Used by bench_subllm.py and bench_matmulfree.py.

An untrained SUBLLM scorer keeps ~50% of a level's tokens; a trained one keeps the keep ratio
(the balancer holds the positive-score fraction there). `calibrate` shifts each level's scores by
the constant that makes it keep the keep ratio of the prompt's tokens, the trained model's state.
"""
from __future__ import annotations

import time

import torch

from pretrain.decode_step import DecodeStep
from pretrain.generate import Generator
from pretrain.models.subsample import Subsample


@torch.no_grad()
def calibrate(model, prompt: torch.Tensor) -> None:
    """Per level: offset = the (1 - ratio) quantile of the scores its tokens get in a top-k pass."""
    levels = [m for m in model.layers if isinstance(m, Subsample)]
    seen: dict[int, torch.Tensor] = {}
    originals = {m.level: m.scores for m in levels}
    for m in levels:
        def record(h, m=m):
            s = originals[m.level](h)
            seen[m.level] = s.float().flatten()
            return s
        m.scores = record
    model(prompt)  # top-k: every level sees exactly what it sees in training
    for m in levels:
        offset = torch.quantile(seen[m.level][:2**20], 1 - m.ratio).item()
        m.scores = lambda h, m=m, offset=offset: originals[m.level](h) - offset


@torch.no_grad()
def bench_decode(cfg, model, *, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> dict:
    """Decode tokens/s with the CUDA-graph step (what generation uses) and, for reference, the same
    step run eagerly (its host overhead). The first step (warm-up and capture) is not timed."""
    model = model.to(torch.bfloat16).eval()
    gen = Generator.from_model(model, dtype=torch.bfloat16)
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(2)
    prompt = torch.randint(0, cfg.model.vocab_size, (batch, prompt_len), device=device, generator=g)
    if model.subsampled:
        calibrate(model, prompt[:1])
    out = {}
    for mode in ("graphs", "eager"):
        results = []
        for _ in range(repeats):
            caches = gen.new_caches(batch, prompt_len + new_tokens)
            for m in gen.levels:
                m.reset_counts()
            gen.logits(prompt, caches)  # prefill (per row for SUBLLM)
            torch.cuda.synchronize()
            prefill_counts = gen.keep_counts()
            for m in gen.levels:
                m.reset_counts()
            # teacher-forced random tokens: a random model's greedy output repeats one token, whose one
            # score would make every decode step keep (or drop) alike; the cost per step is the same
            feed = torch.randint(0, cfg.model.vocab_size, (batch, new_tokens), device=device, generator=g)
            step = DecodeStep(model, caches, torch.full((batch,), prompt_len), new_tokens,
                              cuda_graphs=mode == "graphs")
            kv_bytes = sum(c.nbytes() for c in caches)  # after DecodeStep's trim (HGRN-Bit: recurrent states)
            if mode == "eager" and not results:  # kernels launched by one step, for the profile
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step(feed[:, :1])
                    torch.cuda.synchronize()
                out["kernels_per_step"] = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
            else:
                step(feed[:, :1])
            torch.cuda.synchronize()
            t0 = time.perf_counter()  # host clock after a device sync on both ends
            for i in range(1, new_tokens):
                step(feed[:, i:i + 1])
            torch.cuda.synchronize()
            results.append(time.perf_counter() - t0)
            decode_keep = {lvl: kept / max(1, seen) for lvl, (seen, kept) in gen.keep_counts().items()}
            del step, caches
        t = sorted(results)[len(results) // 2]
        out[mode] = {"tokens_per_s": batch * (new_tokens - 1) / t, "ms_per_step": t / (new_tokens - 1) * 1e3}
    out["tokens_per_s"], out["ms_per_step"] = out["graphs"]["tokens_per_s"], out["graphs"]["ms_per_step"]
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["kv_cache_gib"] = kv_bytes / 2**30
    if model.subsampled:
        out["keep"] = {"prefill": {k: round(v[1] / v[0], 3) for k, v in prefill_counts.items()},
                       "decode": {k: round(v, 3) for k, v in decode_keep.items()}}
    return out
