"""Text generation with a KV cache: prefill the prompt once, then decode one token per forward.

Runs on one process, or on `parallel.tensor` processes under torchrun (each rank holds its
shard; logits are gathered, and every rank samples with the same seed so they agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain.config import config_from_dict
from pretrain.errors import CheckpointError, ConfigError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95  # nucleus sampling; 1.0 = off
    seed: int = 0


def sample_next(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """logits [b, V] (fp32) -> next token ids [b]."""
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _model_state(path: Path, meta: dict, tp_rank: int) -> dict[str, torch.Tensor]:
    """The module weights of this TP rank from a DeepSpeed checkpoint folder."""
    stage = meta["config"]["parallel"]["zero_stage"]
    if stage == 3:  # weights live partitioned in the optimizer shards: consolidate them
        if meta["config"]["parallel"]["tensor"] != 1:
            raise CheckpointError(f"{path}: generation from a ZeRO-3 checkpoint with tensor parallelism needs "
                                  "a universal-checkpoint conversion first")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    shard = path / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if not shard.is_file():
        raise CheckpointError(f"{path}: missing {shard.name}")
    return torch.load(shard, map_location="cpu", weights_only=False)["module"]


class Generator:
    """Load a checkpoint for inference. `checkpoint`: a run dir, its checkpoints/ dir or a step_* dir."""

    def __init__(self, checkpoint: str | Path, *, dtype: torch.dtype | None = None):
        path = Path(checkpoint)
        for candidate in (path, path / "checkpoints"):
            if (candidate / ckpt.META).is_file():
                path = candidate
                break
            if (candidate / ckpt.LATEST).is_file():
                path = ckpt.read_latest(candidate)
                break
        else:
            raise CheckpointError(f"{checkpoint}: no checkpoint found (expected a run dir, its checkpoints/ "
                                  f"folder or a step_* folder)")
        meta = ckpt.read_meta(path)
        self.cfg = config_from_dict(meta["config"])

        from parallel.distributed import init_distributed
        from pretrain.data import load_tokenizer
        from pretrain.models import build_network

        self.layout = init_distributed(self.cfg.parallel.tensor)
        self.tokenizer = load_tokenizer(path / "tokenizer.json")
        torch.manual_seed(0)
        self.model = build_network(self.cfg.model)
        state = _model_state(path, meta, self.layout.tp_rank)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]})")
        dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        self.model.to(device=self.layout.device, dtype=dtype).eval()
        self.dtype = dtype
        self.path = path

    def new_caches(self, batch: int, max_len: int) -> list:
        from pretrain.models.attention import KVCache

        m = self.cfg.model
        kv_local = m.kv_heads // self.layout.tp_size
        return [KVCache(batch, kv_local, max_len, m.head_dim, dtype=self.dtype, device=self.layout.device)
                for _ in self.model.blocks()]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, caches: list | None = None, start_pos: int = 0) -> torch.Tensor:
        """Full-vocabulary fp32 logits [b, s, V] for `tokens` (continuing `caches` at start_pos)."""
        from parallel.tensor_parallel import gather_vocab

        out = self.model(tokens.to(self.layout.device), caches=caches, start_pos=start_pos)
        return gather_vocab(out).float()

    @torch.no_grad()
    def generate_ids(self, prompt: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
        """prompt [b, n] (equal lengths) -> generated ids [b, max_new_tokens]."""
        b, n = prompt.shape
        total = n + s.max_new_tokens
        if total > self.cfg.model.seq_len:
            raise ConfigError(f"prompt ({n}) + max_new_tokens ({s.max_new_tokens}) exceeds the model's "
                             f"context of {self.cfg.model.seq_len} tokens")
        gen = torch.Generator(device=self.layout.device).manual_seed(s.seed)
        caches = self.new_caches(b, total)
        logits = self.logits(prompt, caches)[:, -1]
        out = []
        for i in range(s.max_new_tokens):
            nxt = sample_next(logits, s, gen)
            out.append(nxt)
            if i + 1 < s.max_new_tokens:
                logits = self.logits(nxt[:, None], caches, start_pos=n + i)[:, -1]
        return torch.stack(out, dim=1)

    def generate(self, prompt: str, s: SamplingConfig, num_samples: int = 1) -> list[str]:
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise ConfigError("the prompt is empty after tokenization")
        prompt_ids = torch.tensor([ids] * num_samples, dtype=torch.long)
        new = self.generate_ids(prompt_ids, s).tolist()
        return [prompt + self.tokenizer.decode(row) for row in new]
