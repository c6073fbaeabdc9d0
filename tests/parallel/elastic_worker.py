"""torchrun worker: Flextron under tensor parallelism. For a static and an adaptive router at budget
0.5 with a seeded Gumbel sample: loss, logical gradients, the per-rank choices and router gradients
(to compare across ranks), and the vocab-parallel KL with its gradient. Usage: elastic_worker.py OUT.pt"""
import os
import sys

import torch
import torch.distributed as dist

from parallel.distributed import init_distributed


def main(out: str) -> None:
    from megatron.core import parallel_state as ps

    from parallel.elastic_layout import unshard
    from parallel.tensor_parallel import vocab_parallel_kl
    from pretrain.models import build_network
    from tests.pretrain.models.test_elastic import elastic_cfg

    layout = init_distributed(int(os.environ["WORLD_SIZE"]))
    group = ps.get_tensor_model_parallel_group()

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return parts

    results = {}
    for key, kw in {"static": {}, "adaptive": dict(elastic=dict(router="adaptive", router_after=1)),
                    "subllm": dict(arch="subllm", structure="T(T(T)T)T", init_std=0.1)}.items():
        torch.manual_seed(0)
        net = build_network(elastic_cfg(**kw))
        net.set_step(10**6)
        if net.router.adapt is not None:  # choices that depend on the input
            torch.nn.init.normal_(net.router.adapt[-1].weight, generator=torch.Generator().manual_seed(3), std=2.0)
        x = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(1))
        y = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(2))
        state = net.elastic_state(4, 0.5, torch.Generator().manual_seed(11))
        loss = net(x, y, elastic=state) + net.router.budget_loss
        loss.backward()
        grads = {n: unshard(gather(p.grad), p) if getattr(p, "tensor_model_parallel", False) else p.grad
                 for n, p in net.named_parameters()}
        p = net.payload(x)
        for layer in net.layers[:net.router_at + 1]:
            p = layer(p)
        chosen = net.router(p._replace(elastic=state)).elastic
        router_spread = max((a - b).abs().max().item() for n, q in net.named_parameters() if n.startswith("router.")
                            for a in gather(q.grad) for b in [q.grad])
        choice_same = all(torch.equal(a, chosen.mlp) for a in gather(chosen.mlp)) and \
            all(torch.equal(a, chosen.heads) for a in gather(chosen.heads))
        results[key] = {"loss": loss.detach(), "grads": grads, "mlp": chosen.mlp, "heads": chosen.heads,
                        "router_spread": router_spread, "choice_same": choice_same}
    # the KL of vocab-sharded logits
    s, t = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(4)), torch.randn(2, 5, 40)
    shard = 40 // layout.tp_size
    local = lambda z: z[..., layout.tp_rank * shard:(layout.tp_rank + 1) * shard]  # noqa: E731
    student = local(s).requires_grad_()
    results["kl"] = vocab_parallel_kl(student, local(t), 2.0)
    results["kl"].sum().backward()  # each shard's gradient, joined: the full vocabulary's
    results["kl_grad"] = torch.cat(gather(student.grad), dim=-1)
    results["kl"] = results["kl"].detach()
    if layout.rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
    from parallel.distributed import destroy_distributed

    destroy_distributed()  # process groups torn down before the interpreter (else gloo's threads may abort the exit)
