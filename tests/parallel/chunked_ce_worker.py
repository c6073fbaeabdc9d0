"""Under torchrun with every rank in one TP group: the chunked vocab-parallel cross-entropy of this
rank's vocabulary slice == megatron's, and == the whole vocabulary's on one rank (loss, gradient)."""
from __future__ import annotations

import os

import torch

from parallel.distributed import init_distributed


def main() -> None:
    from megatron.core import parallel_state as ps

    from parallel.chunked_cross_entropy import chunked_vocab_cross_entropy
    from parallel.tensor_parallel import vocab_parallel_cross_entropy

    init_distributed(int(os.environ["WORLD_SIZE"]))
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    torch.manual_seed(0)  # the same full logits on every rank
    full = (torch.randn(3, 11, 64) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 64, (3, 11))
    weight = torch.rand(3, 11)  # a non-uniform upstream gradient
    v = 64 // tp
    results = []
    for fn in (lambda x: chunked_vocab_cross_entropy(x, targets, chunk=7),
               lambda x: vocab_parallel_cross_entropy(x, targets)):
        x = full[..., rank * v:(rank + 1) * v].clone().requires_grad_()
        loss = fn(x)
        loss.backward(weight)
        results.append((loss.detach(), x.grad.float()))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-2, atol=1e-3)  # bf16 gradients
    whole = torch.nn.functional.cross_entropy(full.float().view(-1, 64), targets.view(-1), reduction="none")
    torch.testing.assert_close(a.view(-1), whole, rtol=1e-5, atol=1e-5)
    print(f"rank {rank}/{tp}: ok", flush=True)


if __name__ == "__main__":
    main()
    from parallel.distributed import destroy_distributed

    destroy_distributed()  # process groups torn down before the interpreter (else gloo's threads may abort the exit)
