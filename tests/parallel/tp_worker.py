"""torchrun worker: loss, logical (gathered) gradients and cached-decode logits of one model at a
given TP size, for LLaMA, SUBLLM and ternary HGRN-Bit / LLaMA models (fused and unfused BitLinear,
and the packed-weight inference form); GRIFFIN's scores, selection and decode logits for LLaMA,
SUBLLM and HGRN-Bit (latent and packed). Usage: tp_worker.py OUT.pt"""
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
    from parallel.bitlinear import pack_bitlinears

    layout = init_distributed(int(os.environ["WORLD_SIZE"]))  # every rank in one TP group
    group = ps.get_tensor_model_parallel_group()
    results = {}
    variants = {"tie=False": dict(structure="TTT"), "tie=True": dict(structure="TTT", tie_embeddings=True),
                # SUBLLM: two nested levels; init_std 0.1 puts scores on both sides of zero
                "subllm": dict(arch="subllm", structure="T(T(T)T)T", init_std=0.1),
                # MatMul-free LM: ternary MLGRU + GLU blocks; the head ternary too (the reference)
                "hgrnbit": dict(arch="hgrnbit", structure="HHH", linear="ternary"),
                "hgrnbit-unfused": dict(arch="hgrnbit", structure="HHH", linear="ternary", bitlinear_fused=False),
                "llama-ternary": dict(structure="TT", linear="ternary", quantize_head=False, tie_embeddings=True)}
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
            caches = [b.new_cache(3, 16, dtype=torch.float32, device="cpu") for b in net.blocks()]
            steps = [gather_vocab(net(tokens[:, :10], caches=caches, threshold=sub))]
            for i in range(10, 16):
                steps.append(gather_vocab(net(tokens[:, i:i + 1], caches=caches, start_pos=i, threshold=sub)))
            cached = torch.cat(steps, dim=1)
        results[key] = {"loss": loss.detach(), "grads": grads, "full": full, "cached": cached, "spread": spread}
        if cfg.linear == "ternary":  # 2-bit packed weights + int8 kernels: the same logits as fake quantization
            torch.manual_seed(0)
            packed = build_network(cfg)  # the same seed: the same weights
            assert pack_bitlinears(packed) > 0
            with torch.no_grad():
                results[key]["packed"] = gather_vocab(packed(tokens[:, :16]))
        if key in ("tie=False", "subllm", "hgrnbit"):
            results[key]["griffin"] = griffin(net, layout, group, tokens)
        if key == "hgrnbit":  # GRIFFIN on the ternary GLU's packed codes too
            results[key]["griffin-packed"] = griffin(packed, layout, group, tokens)
    if layout.rank == 0:
        torch.save(results, out)


@torch.no_grad()
def griffin(net, layout, group, tokens) -> dict:
    """GRIFFIN at density 0.5 on a ragged batch: global neuron scores, the selected (global) neurons
    and teacher-forced decode logits. At TP=1 also with TP=2's rule (top-k/2 of each contiguous half)."""
    from pretrain.decode_step import DecodeStep
    from pretrain.generate import Generator
    from pretrain.models.griffin import FFSelection

    from parallel.tensor_parallel import gather_vocab

    gen = Generator.from_model(net, dtype=torch.float32)
    prompts = [tokens[0, :9], tokens[1, :5], tokens[2, :12]]
    out = {}
    for rule in ["plain", "halves"] if layout.tp_size == 1 else ["plain"]:
        experts, caches = gen.new_experts(3, FFSelection(density=0.5)), gen.new_caches(3, 16)
        for i, p in enumerate(prompts):
            gen.logits(p[None], caches, rows=torch.tensor([i]), experts=experts)
        f_local = experts[0].scores.shape[1]
        scores = [gather_dim1(e.scores, group) for e in experts]  # megatron shards neurons contiguously
        for e, block in zip(experts, net.blocks()):
            index = None
            if rule == "halves":  # TP=2's rule at TP=1: the top-k/2 of each contiguous half
                ranking = e.ranking(block.mlp)
                index = torch.cat([h.topk(e.k // 2, dim=1).indices + j * h.shape[1]
                                   for j, h in enumerate(ranking.chunk(2, dim=1))], dim=1)
            e.select(block.mlp, index)
        index = [gather_dim1(e.index + layout.tp_rank * f_local, group).sort(dim=1).values for e in experts]
        step = DecodeStep(net, caches, torch.tensor([9, 5, 12]), 4, cuda_graphs=False, experts=experts)
        logits = torch.stack([gather_vocab(step(tokens[:, 12 + j:13 + j]))[:, -1] for j in range(4)], dim=1)
        out[rule] = {"scores": scores, "index": index, "logits": logits}
    return out


def gather_dim1(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


if __name__ == "__main__":
    main(sys.argv[1])
    from parallel.distributed import destroy_distributed

    destroy_distributed()  # process groups torn down before the interpreter (else gloo's threads may abort the exit)
