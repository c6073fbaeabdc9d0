"""Cross-entropy from vocab-sharded logits, in chunks of tokens (`model.cross_entropy: chunked`).

megatron-core's vocab-parallel cross-entropy needs fp32 logits (Frugal copies the bf16 head output
to fp32: 2 GB for 16k tokens x 32k vocab) and saves an fp32 softmax of the same size for the
backward. This one upcasts one chunk of tokens at a time, saves the logits as they come (bf16) and
one fp32 log-sum-exp per token, and recomputes each chunk's softmax in the backward, writing the
gradient in the logits' dtype. The math is the same (fp32 inside); results agree to rounding.

Tensor parallelism: each rank holds a contiguous slice of the vocabulary. A rank's log-sum-exp over
its slice is combined across the TP group (max, then the sum of exp(lse - max)); the target's logit
lives on one rank and is summed over the group. The loss is replicated on every rank; each rank's
gradient is its slice of softmax - onehot, which is what the replicated loss asks of its shard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

CHUNK_TOKENS = 2048  # 2048 x 32k fp32 = 256 MB of temporaries at a time


def _tp():
    world = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if world == 1:
        return 1, 0, None
    return world, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()


class _ChunkedVocabCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        world, rank, group = _tp()
        v = logits.shape[-1]
        x, t = logits.reshape(-1, v), targets.reshape(-1)
        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], chunk):
            lse[i:i + chunk] = torch.logsumexp(x[i:i + chunk].float(), dim=-1)
        local = t - rank * v  # the target's index in this rank's slice, if it is there
        mine = (local >= 0) & (local < v)
        target_logit = x.gather(1, local.clamp(0, v - 1)[:, None])[:, 0].float() * mine
        if world > 1:
            top = lse.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            total = (lse - top).exp()
            dist.all_reduce(total, group=group)
            lse = top + total.log()
            dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(logits, lse, local, mine)
        ctx.chunk = chunk
        return (lse - target_logit).view(targets.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, local, mine = ctx.saved_tensors
        v = logits.shape[-1]
        x, g = logits.reshape(-1, v), grad.reshape(-1).float()
        out = torch.empty_like(x)
        rows = torch.arange(x.shape[0], device=x.device)
        for i in range(0, x.shape[0], ctx.chunk):
            j = slice(i, i + ctx.chunk)
            p = (x[j].float() - lse[j, None]).exp_()  # softmax over the whole vocabulary, this rank's slice
            p[rows[j] - i, local[j].clamp(0, v - 1)] -= mine[j].float()
            out[j] = p.mul_(g[j, None])
        return out.view(logits.shape), None, None


def chunked_vocab_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Per-token loss [...] from vocab-sharded logits [..., V / tp] and global target ids [...]."""
    return _ChunkedVocabCrossEntropy.apply(logits, targets, chunk)
