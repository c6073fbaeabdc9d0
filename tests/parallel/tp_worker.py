"""torchrun worker: loss, logical (gathered) gradients and cached-decode logits of one model at a
given TP size. Usage: tp_worker.py OUT.pt"""
import os
import sys

import torch
import torch.distributed as dist

from parallel.distributed import init_distributed
from pretrain.config import ModelConfig


def gather_full(t: torch.Tensor, param, group) -> torch.Tensor:
    """Reassemble a TP-sharded tensor along its partition dim (replicated ones pass through)."""
    if not getattr(param, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def main(out: str) -> None:
    from megatron.core import parallel_state as ps

    from parallel.tensor_parallel import gather_vocab
    from pretrain.models import build_network
    from pretrain.models.attention import KVCache

    layout = init_distributed(int(os.environ["WORLD_SIZE"]))  # every rank in one TP group
    group = ps.get_tensor_model_parallel_group()
    results = {}
    variants = {"tie=False": dict(structure="TTT"), "tie=True": dict(structure="TTT", tie_embeddings=True),
                # SUBLLM: two nested levels; init_std 0.1 puts scores on both sides of zero
                "subllm": dict(arch="subllm", structure="T(T(T)T)T", init_std=0.1)}
    for key, extra in variants.items():
        cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=256, seq_len=16, **extra)
        sub = cfg.arch == "subllm"
        torch.manual_seed(0)
        net = build_network(cfg)
        net.set_step(10**6)  # SUBLLM: bypass floor at its end value, so c gets gradient both ways
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 256, (3, 17), generator=gen)
        loss = net(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = {n: gather_full(p.grad, p, group) for n, p in net.named_parameters()}
        # replicated parameters (norms, SUBLLM's scorer and bypass) must get the same gradient on every
        # TP rank, or they would drift apart: compare across ranks
        spread = 0.0
        for n, p in net.named_parameters():
            if not getattr(p, "tensor_model_parallel", False):
                peers = [torch.empty_like(p.grad) for _ in range(dist.get_world_size(group))]
                dist.all_gather(peers, p.grad.contiguous(), group=group)
                spread = max(spread, max((q - p.grad).abs().max().item() for q in peers))
        # cached decode: prefill 10 tokens, then 6 single-token steps; compare to one full forward
        with torch.no_grad():
            full = gather_vocab(net(tokens[:, :16], threshold=sub))
            caches = [KVCache(3, cfg.kv_heads // layout.tp_size, 16, cfg.head_dim, dtype=torch.float32,
                              device="cpu") for _ in range(cfg.n_blocks)]
            steps = [gather_vocab(net(tokens[:, :10], caches=caches, threshold=sub))]
            for i in range(10, 16):
                steps.append(gather_vocab(net(tokens[:, i:i + 1], caches=caches, start_pos=i, threshold=sub)))
            cached = torch.cat(steps, dim=1)
        results[key] = {"loss": loss.detach(), "grads": grads, "full": full, "cached": cached, "spread": spread}
    if layout.rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
