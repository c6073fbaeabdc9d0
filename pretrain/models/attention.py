"""Causal self-attention with GQA, RoPE and an optional ragged KV cache, through PyTorch SDPA."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.decode_attention import decode_attention
from pretrain.models.layers import apply_rotary

_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


class KVCache:
    """Keys/values of one attention layer for generation: [b, kv_heads_local, max_len, hd].

    Every cache row has its own length: prompts of different lengths share one batch, and SUBLLM's
    subsampled levels store only the tokens each row kept there. During the prefill (`append`) the
    lengths and the `rows` an append applies to live on the host: they follow from shapes and from
    decisions the host has already made, so reading them never waits on the device. Decode steps
    (`append_masked`) move them to the device, where they advance in place without a sync.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._lengths = torch.zeros(batch, dtype=torch.long)  # tokens held per row (host) ...
        self._lengths_dev: torch.Tensor | None = None  # ... or on the device, once decoding started

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per row, on the host (a copy when they live on the device: one sync)."""
        return self._lengths if self._lengths_dev is None else self._lengths_dev.cpu()

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self._lengths, self._lengths_dev = value, None

    def device_lengths(self) -> torch.Tensor:
        """The lengths as a device tensor, updated in place by `append_masked` from now on."""
        if self._lengths_dev is None:
            self._lengths_dev = self._lengths.to(self.k.device)
        return self._lengths_dev

    def append_masked(self, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode step of every row (k/v [b, kvh, 1, hd]); only rows with `active` (device bool [b])
        keep their token. Every row writes at its own end, only active rows advance, so an inactive
        row's write lies past its end: never visible later, overwritten by its next kept token. No
        host sync, no row gather and no shape that depends on the lengths, so the step can be replayed
        as a CUDA graph. Returns the whole cache and the number of keys each row sees now [b] (device:
        its cached tokens and the new one)."""
        pos = self.device_lengths()
        batch = torch.arange(self.k.shape[0], device=self.k.device)
        self.k[batch, :, pos] = k[:, :, 0]
        self.v[batch, :, pos] = v[:, :, 0]
        visible = pos + 1
        pos.add_(active.long())  # in place: a graph replay reads and writes the same memory
        return self.k, self.v, visible

    def start_decode(self, max_steps: int) -> None:
        """Before the decode steps: trim to what they can add (a SUBLLM level's caches hold only its
        kept tokens) and move the lengths to the device, where the steps advance them in place."""
        self.shrink(int(self.lengths.max()) + max_steps)
        self.device_lengths()

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def shrink(self, capacity: int) -> None:
        """Drop the positions past `capacity` (after a prefill: SUBLLM's inner levels hold fewer tokens).
        A cache already that small is left as it is (no copy)."""
        if capacity < int(self.lengths.max()):
            raise ValueError(f"KV cache shrink to {capacity} positions would drop cached tokens")
        if capacity >= self.k.shape[2]:
            return
        self.k = self.k[:, :, :capacity].clone()
        self.v = self.v[:, :, :capacity].clone()

    def append(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k/v [r, kvh, s, hd] at the end of cache rows `rows` (host LongTensor [r], distinct;
        None = all rows in order). Returns those rows' keys and values up to the longest of them
        [r, kvh, t, hd] and their lengths before the append [r] (host), from which the caller masks."""
        s = k.shape[2]
        old = (self.lengths if rows is None else self.lengths[rows]).clone()
        new = old + s
        if int(new.max()) > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {int(new.max())} > {self.k.shape[2]} positions")
        lo = int(old.min())
        if rows is None and lo == int(old.max()):  # the plain batch of equal lengths: slice writes and views
            self.k[:, :, lo:lo + s] = k
            self.v[:, :, lo:lo + s] = v
            self.lengths = self.lengths + s
            return self.k[:, :, :lo + s], self.v[:, :, :lo + s], old
        idx = (torch.arange(self.k.shape[0]) if rows is None else rows).to(self.k.device)
        pos = (old[:, None] + torch.arange(s)).to(self.k.device)  # [r, s]: each row writes at its own end
        # two index tensors split by a slice: the indexed view is [r, s, kvh, hd]
        self.k[idx[:, None], :, pos] = k.transpose(1, 2)
        self.v[idx[:, None], :, pos] = v.transpose(1, 2)
        if rows is None:
            self.lengths = new
        else:
            lengths = self.lengths.clone()  # a copy when the lengths live on the device
            lengths[rows] = new
            self.lengths = lengths
        t = int(new.max())
        if rows is None:
            return self.k[:, :, :t], self.v[:, :, :t], old
        return self.k[idx, :, :t], self.v[idx, :, :t], old


def ragged_mask(past: torch.Tensor, s: int, t: int, device) -> torch.Tensor:
    """[r, 1, s, t] bool: key j is visible to new token i of row r iff j < past[r] + i + 1. Keys past
    a row's own end (left there by longer rows) are never visible, so no padding token is attended."""
    limit = past.to(device)[:, None] + torch.arange(1, s + 1, device=device)  # [r, s]
    return (torch.arange(t, device=device) < limit[:, :, None]).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, spec, init_std: float, out_std: float,
                 head_dim: int | None = None, elastic: bool = False, fused: bool = False, backend: str = "auto"):
        """head_dim: d_model // n_heads unless given (a sub-network exported with fewer heads keeps its
        parent's head size). elastic: Flextron's unit is a query group (a KV head and its query heads).
        fused: RoPE as one compiled kernel in training; backend: SDPA's kernel in training (auto =
        PyTorch's choice, flash = FlashAttention-2, cudnn = cuDNN's fused attention)."""
        super().__init__()
        self.fused, self.backend = fused, backend
        self.head_dim = head_dim or d_model // n_heads
        self.heads = n_heads // spec.tp_size  # local (this TP rank's) query heads
        self.kv_heads = n_kv_heads // spec.tp_size  # local KV heads: whole query groups per rank
        # Separate q/k/v keep the logical weight layout TP-independent: shard r of each holds the
        # same query groups, so a checkpoint re-shards by plain splitting.
        self.q = spec.column(d_model, n_heads * self.head_dim, init_std=init_std)
        self.k = spec.column(d_model, n_kv_heads * self.head_dim, init_std=init_std)
        self.v = spec.column(d_model, n_kv_heads * self.head_dim, init_std=init_std)
        self.o = spec.row(n_heads * self.head_dim, d_model, init_std=out_std)
        if elastic:  # rows (q, k, v) or columns (o) of one query group, dealt round-robin over TP ranks
            group = self.head_dim * (n_heads // n_kv_heads)
            self.q.weight.elastic_unit = self.o.weight.elastic_unit = group
            self.k.weight.elastic_unit = self.v.weight.elastic_unit = self.head_dim

    def _projections(self, groups: int | None):
        """(q, k, v, o, query heads, kv heads) of this rank: the full linears, or a Flextron sub-network's
        first `groups` query groups as sliced views of their weights (parallel/sliced.py)."""
        if groups is None or groups >= self.kv_heads:
            return self.q, self.k, self.v, self.o, self.heads, self.kv_heads
        from parallel.sliced import column_slice, row_slice

        heads, hd = groups * (self.heads // self.kv_heads), self.head_dim
        return (lambda x: column_slice(x, self.q.weight, heads * hd),
                lambda x: column_slice(x, self.k.weight, groups * hd),
                lambda x: column_slice(x, self.v.weight, groups * hd),
                lambda x: row_slice(x, self.o.weight, heads * hd), heads, groups)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None, rows: torch.Tensor | None = None,
                active: torch.Tensor | None = None, groups: int | None = None) -> torch.Tensor:
        """x [b, s, d]; with a cache, x's batch rows are cache rows `rows` (None = all rows);
        `active` (device bool [b]): a SUBLLM decode step where only those rows keep their token;
        `groups`: a Flextron sub-network's query groups on this rank (None = all; training only)."""
        b, s, _ = x.shape
        q_proj, k_proj, v_proj, o_proj, heads, kv_heads = self._projections(groups)
        q = q_proj(x).view(b, s, heads, self.head_dim).transpose(1, 2)
        k = k_proj(x).view(b, s, kv_heads, self.head_dim).transpose(1, 2)
        v = v_proj(x).view(b, s, kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope, fused=self.fused), apply_rotary(k, *rope, fused=self.fused)

        if cache is not None and active is not None:  # a decode step: one token per row, sync-free
            k, v, visible = cache.append_masked(k, v, active)
            out = decode_attention(q, k, v, visible)
            return o_proj(out.transpose(1, 2).reshape(b, s, heads * self.head_dim))
        mask, causal = None, True
        if cache is not None:
            k, v, past = cache.append(k, v, rows)
            first = int(past[0])
            if not bool((past == first).all()):  # rows of different lengths: an explicit mask per row
                mask, causal = ragged_mask(past, s, k.shape[2], x.device), False
            elif first > 0 and s == 1:
                causal = False  # one new token attends to everything cached
            elif first > 0:  # a chunk after a prefix: token i sees cache + new tokens <= i
                mask = torch.ones(s, first + s, dtype=torch.bool, device=x.device).tril(diagonal=first)
                causal = False
        gqa = heads != kv_heads
        pick = self.backend != "auto" and cache is None and x.is_cuda  # training / plain forward on a GPU
        with sdpa_kernel(_BACKENDS[self.backend]) if pick else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return o_proj(out.transpose(1, 2).reshape(b, s, heads * self.head_dim))
