"""Flextron's latency cost model: per-block decode latency of every offered width, measured.

    python -m pretrain elastic-profile --config launch/configs/NAME.yaml --out latency.json [--batch 1]

For one decode token per row over a KV cache of `--context` tokens, it times, on this device:
    attn_ms[l][c]  RMSNorm + attention of block l with the c-th offered number of query groups
    mlp_ms[l][c]   RMSNorm + SwiGLU of block l with the c-th offered MLP width
    fixed_ms       embedding + final norm + LM head (what no budget shrinks)
Each is a CUDA graph of several calls replayed (what generation's decode step does: no launch
overhead in the figure), median over repeats. Blocks of one model share their shapes, so block 0 is
measured and its row repeated. `model.elastic.cost: latency` + `latency_table: latency.json` then
makes budgets fractions of this latency; the predicted latency of a sub-network is the table's sum.
On a CPU it runs the same calls eagerly (a rough table: use cost=params there).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from pretrain.errors import ConfigError

INNER = 10  # calls per captured graph


def _timer(fn, repeats: int, device: torch.device) -> float:
    """Milliseconds per call of fn (a CUDA graph of INNER calls on a GPU), median of `repeats`."""
    if device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up (autotuning, allocator) before capture
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(INNER):
                fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / INNER)
        return statistics.median(times)
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(INNER):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / INNER)
    return statistics.median(times)


@torch.no_grad()
def profile(model_cfg, *, batch: int = 1, context: int = 1024, repeats: int = 20) -> dict:
    """The latency table of `model_cfg` (an elastic ModelConfig, vocab_size set) on this device."""
    from pretrain.models import build_network
    from pretrain.models.attention import KVCache
    from parallel.distributed import init_distributed

    if not model_cfg.elastic.enabled:
        raise ConfigError("elastic-profile measures an elastic model: set model.elastic.enabled=true")
    if model_cfg.vocab_size is None:
        raise ConfigError("elastic-profile needs model.vocab_size (the config leaves it to the data)")
    if context + 1 > model_cfg.seq_len:
        raise ConfigError(f"--context {context} leaves no room in the model's seq_len {model_cfg.seq_len}")
    layout = init_distributed(1)
    device = layout.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    net = build_network(model_cfg).to(device=device, dtype=dtype).eval()
    block, e = net.blocks()[0], model_cfg.elastic
    widths, groups = e.ffn_widths(model_cfg.ffn_hidden), e.head_groups(model_cfg.kv_heads)
    x = torch.randn(batch, 1, model_cfg.d_model, device=device, dtype=dtype)
    rope = net.layers[0].rotary(torch.full((batch, 1), context, device=device))
    active = torch.zeros(batch, dtype=torch.bool, device=device)  # the write never advances: same cost each call

    def attn_at(g: int):
        cache = KVCache(batch, g, context + 1, block.attn.head_dim, dtype=dtype, device=device)
        cache.k.normal_(), cache.v.normal_()
        cache.lengths = torch.full((batch,), context)
        cache.device_lengths()
        return lambda: block.attn(block.attn_norm(x), rope, cache, None, active, groups=g)

    attn = [_timer(attn_at(g), repeats, device) for g in groups]
    mlp = [_timer(lambda w=w: block.mlp(block.mlp_norm(x), width=w), repeats, device) for w in widths]
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, 1), device=device)
    emb, norm, head = net.layers[0], net.layers[-2], net.layers[-1]
    fixed = _timer(lambda: head(norm(emb(net.payload(tokens, start_pos=context)))), repeats, device)
    L = model_cfg.n_blocks
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "batch": batch, "context": context, "mlp_widths": widths, "head_groups": groups,
            "mlp_ms": [mlp] * L, "attn_ms": [attn] * L, "fixed_ms": fixed,
            "full_ms": fixed + L * (mlp[0] + attn[0])}


def write(table: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))
    return out
