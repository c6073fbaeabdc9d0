"""Dense tensor-parallel layers: thin wrappers over megatron-core's TP linears and embedding.

Wrappers return a plain tensor (megatron's layers return `(output, bias)`), take their init std
explicitly, and always initialize on the CPU from one master weight that is then split across
ranks (`use_cpu_initialization`): the same seed gives the same logical model at any TP size, which
is what makes TP=2 == TP=1 testable and checkpoints re-shardable.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp
from megatron.core.model_parallel_config import ModelParallelConfig


def megatron_config(params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        params_dtype=params_dtype,
        use_cpu_initialization=True,  # TP-independent init (see module docstring)
        perform_initialization=True,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,  # needs apex/TE fused kernels; never required
    )


def _normal(std: float):
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)


class ColumnLinear(mtp.ColumnParallelLinear):
    """y = x Wᵀ with W split by output rows; the output stays sharded (no gather)."""

    def __init__(self, in_features: int, out_features: int, *, init_std: float, skip_weight=False):
        super().__init__(in_features, out_features, config=megatron_config(), init_method=_normal(init_std),
                         bias=False, gather_output=False, skip_bias_add=True,
                         skip_weight_param_allocation=skip_weight, tp_group=ps.get_tensor_model_parallel_group())

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: megatron's forward is this matmul (see module docstring)
            return F.linear(x, self.weight if weight is None else weight)
        return super().forward(x, weight=weight)[0]


class RowLinear(mtp.RowParallelLinear):
    """y = x Wᵀ with W split by input columns; input is sharded, output all-reduced."""

    def __init__(self, in_features: int, out_features: int, *, init_std: float):
        super().__init__(in_features, out_features, config=megatron_config(), init_method=_normal(init_std),
                         bias=False, input_is_parallel=True, skip_bias_add=True,
                         tp_group=ps.get_tensor_model_parallel_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: the local matmul, partial sums all-reduced
            return all_reduce_tp(F.linear(x, self.weight))
        return super().forward(x)[0]


class VocabEmbedding(mtp.VocabParallelEmbedding):
    def __init__(self, vocab_size: int, dim: int, *, init_std: float):
        super().__init__(vocab_size, dim, init_method=_normal(init_std), config=megatron_config(),
                         tp_group=ps.get_tensor_model_parallel_group())


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, kind: str = "megatron") -> torch.Tensor:
    """Per-token loss from vocab-sharded logits by `model.cross_entropy`: megatron-core's ("megatron")
    or token-chunked ("chunked", parallel/chunked_cross_entropy.py). Every loss (the plain network,
    the pipeline's last stage, Flextron's objective) goes through here."""
    if kind == "chunked":
        from parallel.chunked_cross_entropy import chunked_vocab_cross_entropy

        return chunked_vocab_cross_entropy(logits, targets)
    return vocab_parallel_cross_entropy(logits, targets)


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token loss from vocab-sharded logits, without gathering the full vocabulary. megatron-core's
    function overwrites its input (max-subtracted, exponentiated) to save memory; fp32 logits are
    therefore copied first, so the caller's tensor stays the logits (distillation reads them again)."""
    x = logits.float()
    return mtp.vocab_parallel_cross_entropy(x.clone() if x is logits else x, targets)


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(softmax(teacher/T) || softmax(student/T)) [..] from vocab-sharded logits, without
    gathering the vocabulary: max, log-sum-exp and the KL sum are reduced over the TP group.

        KL = Σ_v p_t(v) · (log p_t(v) − (x_v − m)) + log Z · Σ_v p_t(v),   Z = Σ_v exp(x_v − m)

    log Z enters once, after the reductions, replicated on every TP rank, like the result: then the
    identity backward of the reductions is each shard's right gradient, p_s − p_t. (log Z inside each
    shard's partial sum would weigh its gradient by that shard's teacher mass only.)"""
    x = student.float() / temperature
    m = x.detach().max(dim=-1, keepdim=True).values
    if ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    log_z = mtp.reduce_from_tensor_model_parallel_region((x - m).exp().sum(dim=-1)).log()
    with torch.no_grad():
        log_pt = _log_softmax(teacher.float() / temperature)
        pt = log_pt.exp()
        mass = mtp.reduce_from_tensor_model_parallel_region(pt.sum(dim=-1))  # 1, up to rounding
    return mtp.reduce_from_tensor_model_parallel_region((pt * (log_pt - (x - m))).sum(-1)) \
        + log_z * mass


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary split across the TP group (x: this rank's shard; no gradient)."""
    m = x.max(dim=-1, keepdim=True).values
    if ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    total = mtp.reduce_from_tensor_model_parallel_region((x - m).exp().sum(dim=-1, keepdim=True))
    return x - m - total.log()


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from the shards (generation only)."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    return mtp.gather_from_tensor_model_parallel_region(logits)


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def all_reduce_tp(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group, in place (identity at TP=1). Generation only: no
    autograd (training's reductions live inside megatron's layers)."""
    if ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(x, group=ps.get_tensor_model_parallel_group())
    return x
