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
from types import SimpleNamespace

import torch
import torch.distributed as dist

from parallel.distributed import init_distributed
from pretrain.config import ModelConfig

MODELS = {
    "llama": dict(structure="TTTT", tie_embeddings=True),
    # the level opens on stage 0 and closes on stage 1 (the cost partition over 2 stages)
    "subllm": dict(arch="subllm", structure="TT(TTTT)TT", init_std=0.1),
    "hgrnbit": dict(arch="hgrnbit", structure="HHHH", linear="ternary", quantize_head=False),
    # Flextron: an adaptive router after block 0 (on stage 0), per-row choices; sampled budgets (some
    # micro-batches full, some not) and distillation from a teacher of other weights
    "flextron": dict(structure="TTTT", n_heads=8, n_kv_heads=4, elastic=dict(
        enabled=True, neuron_granularity=8, ffn_fractions=[1.0, 0.75, 0.5, 0.25], head_fractions=[1.0, 0.5],
        budgets=[0.25, 0.5, 0.75], router="adaptive", router_after=1)),
}
MICRO, SEQS = 2, 8


def config(extra: dict) -> ModelConfig:
    return ModelConfig(**{"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 96, "vocab_size": 256,
                          "seq_len": 16, "tie_embeddings": False, **extra})


def network(cfg: ModelConfig, seed: int = 0):
    from pretrain.models import build_network

    torch.manual_seed(seed)
    net = build_network(cfg)
    net.set_step(10**6)  # SUBLLM: the bypass floor at its end value
    if net.router is not None and net.router.adapt is not None:  # choices that depend on the input
        torch.nn.init.normal_(net.router.adapt[-1].weight, generator=torch.Generator().manual_seed(3), std=2.0)
    return net


def elastic_training(cfg: ModelConfig, net, dp_rank: int):
    """Flextron's training objective with its frozen teacher (other weights than the student's)."""
    from types import SimpleNamespace

    from pretrain.arch_config import ElasticTrainingConfig
    from pretrain.elastic_training import ElasticTraining

    run = SimpleNamespace(model=cfg, training=SimpleNamespace(seed=5, elastic=ElasticTrainingConfig(
        enabled=True, full_prob=0.3, distill_weight=0.5, distill_temperature=2.0)))
    return ElasticTraining(run, net, dp_rank=dp_rank, teacher=network(cfg, seed=1))


def batch(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (SEQS, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))


def reference(out: str) -> None:
    init_distributed(1)
    results = {}
    for name, extra in MODELS.items():
        cfg = config(extra)
        for dp in (1, 2) if "elastic" in extra else (1,):  # (a DP rank samples its own budgets)
            net = network(cfg)
            net.set_grad_accum(SEQS // MICRO)  # one step of 4 micro-batches
            losses, budgets, per_rank = [], [], {}
            for i, b in enumerate(batch(cfg).split(MICRO)):
                if "elastic" in extra:  # DP rank i // per-rank micro-batches, its micro-batch i % that
                    rank = i // (SEQS // MICRO // dp)
                    et = per_rank.setdefault(rank, elastic_training(cfg, net, dp_rank=rank))
                    budgets.append(et.sample(0, i % (SEQS // MICRO // dp), MICRO, net)[0])
                    losses.append(et.loss(SimpleEngine(net), b[:, :-1], b[:, 1:], 0, i % (SEQS // MICRO // dp)))
                else:
                    losses.append(net(b[:, :-1], b[:, 1:]))
            loss = torch.stack(losses).mean()
            loss.backward()
            results[name if dp == 1 else f"{name}_dp{dp}"] = {
                "loss": loss.item(), "grads": {n: p.grad for n, p in net.named_parameters()}, "budgets": budgets}
    torch.save(results, f"{out}/ref.pt")


class SimpleEngine:
    """What ElasticTraining.loss asks of an engine: `module`, and calling it."""

    def __init__(self, net):
        self.module = net

    def __call__(self, *a, **k):
        return self.module(*a, **k)


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
        et = elastic_training(cfg, net, layout.dp_rank) if "elastic" in extra else None
        run = SimpleNamespace(model=cfg, parallel=SimpleNamespace(pipeline_partition="cost"))
        module = pl.build_pipeline(net, run, teacher=et and et.teacher, objective=et and et.pipelined)
        key = name if dp == 1 or et is None else f"{name}_dp{dp}"
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), mpu=None,
            config={"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": SEQS // MICRO // dp,
                    "zero_optimization": {"stage": zero}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
                    "zero_allow_untested_optimizer": True,
                    "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}})
        share = batch(cfg).chunk(dp)[layout.dp_rank]  # this DP rank's sequences
        sample = (lambda micro, rows: et.sample(0, micro, rows, net)) if et else None  # noqa: E731
        loss = pl.train_batch(engine, iter(share.split(MICRO)), SEQS // MICRO // dp, sample)
        # the parameters this stage holds (a tied embedding on both ends): change = -gradient
        names = {id(p): n for n, p in net.named_parameters()}
        gap, held = 0.0, set()
        for p in module.parameters():
            n = names[id(p)]
            change = joined(before[n] - p.detach(), p, ps.get_tensor_model_parallel_group())
            gap = max(gap, (change - ref[key]["grads"][n]).abs().max().item())
            held.add(n)
        # the PipelineModule's parameter names map to the network's (what universal checkpoints use)
        named = all(pl.network_name(n) == names[id(p)] for n, p in module.named_parameters())
        everyone = [None] * world
        dist.all_gather_object(everyone, (layout.pp_rank, gap, sorted(held), named))
        results[name] = {
            "loss": float(loss), "ref_loss": ref[key]["loss"], "grad_gap": max(e[1] for e in everyone),
            "covered": sorted(set().union(*(e[2] for e in everyone))) == sorted(ref[key]["grads"]),
            "network_names": all(e[3] for e in everyone),
            "budgets": ref[key]["budgets"],
            "tied_on_both": "layers.0.tok.weight" in everyone[0][2] and all(
                "layers.0.tok.weight" in e[2] for e in everyone if e[0] == 1) if cfg.tie_embeddings else None,
            "parts": [int(x) for x in module.parts],
            "grad_scale": max(g.abs().max().item() for g in ref[key]["grads"].values()),
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
