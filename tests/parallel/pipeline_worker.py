"""torchrun worker for test_pipeline.py: DeepSpeed's pipeline engine over the flat layer list against
the whole network in one process, for LLaMA (tied embeddings), SUBLLM (a level open across the stage
boundary) and ternary HGRN-Bit.

    pipeline_worker.py OUT ref               (1 process) the whole network: the mean loss of 4
        micro-batches of 2 and every parameter's gradient, by name -> OUT/ref.pt
    pipeline_worker.py OUT pp TP ZERO        (PP = 2 stages x TP x DP = world / (2 TP)) one
        `train_batch` of the same 8 sequences (each DP rank its share) with SGD(lr=1) under ZeRO
        stage ZERO: the loss, and each parameter's change (= minus its gradient, TP shards joined)
        against OUT/ref.pt -> OUT/pp_tpTP_zeroZERO.json from rank 0 (max differences, partitions)
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from parallel.distributed import init_distributed
from pretrain.config import ModelConfig

MODELS = {
    "llama": dict(structure="TTTT", tie_embeddings=True),
    # the level opens on stage 0 and closes on stage 1 (the cost partition over 2 stages)
    "subllm": dict(arch="subllm", structure="TT(TTTT)TT", init_std=0.1),
    "hgrnbit": dict(arch="hgrnbit", structure="HHHH", linear="ternary", quantize_head=False),
}
MICRO, SEQS = 2, 8


def config(extra: dict) -> ModelConfig:
    return ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=256, seq_len=16,
                       **{"tie_embeddings": False, **extra})


def network(cfg: ModelConfig):
    from pretrain.models import build_network

    torch.manual_seed(0)
    net = build_network(cfg)
    net.set_step(10**6)  # SUBLLM: the bypass floor at its end value
    return net


def batch(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (SEQS, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))


def reference(out: str) -> None:
    init_distributed(1)
    results = {}
    for name, extra in MODELS.items():
        cfg = config(extra)
        net = network(cfg)
        net.set_grad_accum(SEQS // MICRO)  # one step of 4 micro-batches
        loss = torch.stack([net(b[:, :-1], b[:, 1:]) for b in batch(cfg).split(MICRO)]).mean()
        loss.backward()
        results[name] = {"loss": loss.item(), "grads": {n: p.grad for n, p in net.named_parameters()}}
    torch.save(results, f"{out}/ref.pt")


def joined(t: torch.Tensor, param, group) -> torch.Tensor:
    """The logical tensor from this TP group's shards of `param`'s layout."""
    from parallel.elastic_layout import unshard

    if not getattr(param, "tensor_model_parallel", False) or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return unshard(parts, param)


def pipelined(out: str, tp: int, zero: int) -> None:
    import deepspeed
    from megatron.core import parallel_state as ps

    from parallel.pipeline import Pipeline
    from pretrain import pipeline as pl

    world = int(os.environ["WORLD_SIZE"])
    layout = init_distributed(tp, pipeline_parallel=2)
    dp = world // (2 * tp)
    ref = torch.load(f"{out}/ref.pt")
    results = {}
    for name, extra in MODELS.items():
        cfg = config(extra)
        net = network(cfg)
        net.set_grad_accum(SEQS // MICRO // dp)
        module = Pipeline(pl.pipeline_layers(net), costs=pl.layer_costs(cfg), blocks=pl.block_mask(net),
                          names=pl.layer_names(net), method="cost", loss_fn=pl.loss_fn)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), mpu=None,
            config={"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": SEQS // MICRO // dp,
                    "zero_optimization": {"stage": zero}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
                    "zero_allow_untested_optimizer": True,
                    "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}})
        share = batch(cfg).chunk(dp)[layout.dp_rank]  # this DP rank's sequences
        loss = engine.train_batch(data_iter=iter([(pl.inputs(b[:, :-1]), b[:, 1:]) for b in share.split(MICRO)]))
        # the parameters this stage holds (a tied embedding on both ends): change = -gradient
        names = {id(p): n for n, p in net.named_parameters()}
        gap, held = 0.0, set()
        for p in module.parameters():
            n = names[id(p)]
            change = joined(before[n] - p.detach(), p, ps.get_tensor_model_parallel_group())
            gap = max(gap, (change - ref[name]["grads"][n]).abs().max().item())
            held.add(n)
        everyone = [None] * world
        dist.all_gather_object(everyone, (layout.pp_rank, gap, sorted(held)))
        results[name] = {
            "loss": float(loss), "ref_loss": ref[name]["loss"], "grad_gap": max(g for _, g, _ in everyone),
            "covered": sorted(set().union(*(h for _, _, h in everyone))) == sorted(ref[name]["grads"]),
            "tied_on_both": "layers.0.tok.weight" in everyone[0][2] and all(
                "layers.0.tok.weight" in h for s, _, h in everyone if s == 1) if cfg.tie_embeddings else None,
            "parts": [int(x) for x in module.parts],
            "grad_scale": max(g.abs().max().item() for g in ref[name]["grads"].values()),
        }
        del engine, module
    if layout.rank == 0:
        with open(f"{out}/pp_tp{tp}_zero{zero}.json", "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    out, phase, *rest = sys.argv[1:]
    reference(out) if phase == "ref" else pipelined(out, *map(int, rest))
    from parallel.distributed import destroy_distributed

    destroy_distributed()  # an orderly exit: process groups torn down before the interpreter
