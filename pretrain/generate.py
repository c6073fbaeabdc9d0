"""Text generation with KV caches: prefill each prompt once, then decode one token per forward.

Prompts may differ in length: each is prefilled into its own cache row, then all rows decode
together on ragged caches (each row attends to exactly its own tokens), one `DecodeStep` per token:
static buffers, replayed as CUDA graphs on a GPU (decode_step.py). A SUBLLM model runs its
inference rule (keep a token iff its score > 0) throughout, and its inner blocks cache only the
tokens kept at their level; `keep_stats()` reports the fraction kept per level.

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
from pretrain.models.griffin import Experts, FFSelection


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


class Generator:
    """Load a checkpoint for inference. `checkpoint`: a run dir, its checkpoints/ dir or a step_* dir."""

    def __init__(self, checkpoint: str | Path, *, dtype: torch.dtype | None = None, packed: bool = False,
                 budget: float | str | None = None, budget_target: float | None = None):
        """packed: a ternary model decodes with 2-bit packed weights (int8 × ternary kernels) instead of
        its fake-quantized latent weights; a packed export (pretrain/export.py) always does.
        budget (an elastic model): a number serves the static router's sub-network for it; "auto" routes
        each prompt with the adaptive router at `budget_target` (pretrain/subnetwork.py).

        Runs at the tensor-parallel size it is launched with (torchrun ranks; one process = 1), whatever
        size the checkpoint was written at; a packed export keeps its own."""
        from parallel.bitlinear import pack_bitlinears
        from parallel.distributed import init_distributed, world_size_from_env
        from pretrain import export, subnetwork
        from pretrain.config import check_widths
        from pretrain.data import load_tokenizer
        from pretrain.models import build_network

        path = ckpt.find(checkpoint)
        meta = ckpt.read_meta(path)
        self.cfg = config_from_dict(meta["config"])
        exported = meta.get("format") == export.FORMAT
        self.packed = packed or exported
        if self.packed and self.cfg.model.linear != "ternary":
            raise ConfigError(f"{path}: packed weights need a ternary model (model.linear is "
                              f"{self.cfg.model.linear!r})")
        if budget is not None:
            subnetwork.check_elastic(self.cfg, path, budget)
        tp = self.cfg.parallel.tensor if exported else world_size_from_env()
        check_widths(self.cfg.model, tp)  # before any process group: a width that does not split is a config error
        layout = init_distributed(tp)
        torch.manual_seed(0)
        model = build_network(self.cfg.model)
        self.elastic, self.budget_target, self._subnets = None, budget_target, {}
        if exported:  # codes and scales as exported: load them as they are
            pack_bitlinears(model, quantize=False)
            state = export.load_packed_state(path, layout.tp_rank)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:4]}, "
                                      f"unexpected {unexpected[:4]})")
        elif budget is None:
            ckpt.load_weights(path, model)
        else:  # Flextron: cut sub-networks out of the logical weights
            logical = ckpt.load_weights(path, model)
            if budget == "auto":  # per prompt: keep the elastic model to route with (generate_ids)
                self.elastic, self._logical = model, logical
                self.budget_target = budget_target or model.router.budgets[len(model.router.budgets) // 2]
            else:
                model = subnetwork.build(model, logical, *subnetwork.widths(model, *model.router.static_choice(budget)))
        if self.packed and not exported:  # latent weights: quantize them once, here
            pack_bitlinears(model)
        self.path = path
        self._setup(model, layout, load_tokenizer(path / "tokenizer.json"), dtype)

    @classmethod
    def from_model(cls, model, *, tokenizer=None, dtype: torch.dtype | None = None,
                   packed: bool = False) -> "Generator":
        """Wrap a network built in this process (no checkpoint, no run config): tests, notebooks.
        packed: replace the model's BitLinears by their packed inference form, in place (as `packed=True`)."""
        from parallel.bitlinear import pack_bitlinears
        from parallel.distributed import init_distributed
        from parallel.tensor_parallel import tp_size

        self = cls.__new__(cls)
        self.cfg, self.path, self.packed, self.elastic = None, None, packed, None
        if packed and not pack_bitlinears(model):
            raise ConfigError("packed weights need a ternary model (it has no BitLinear layers)")
        self._setup(model, init_distributed(tp_size()), tokenizer, dtype)
        return self

    def _setup(self, model, layout, tokenizer, dtype: torch.dtype | None) -> None:
        from pretrain.models.subsample import Subsample

        self.layout, self.tokenizer = layout, tokenizer
        self.dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        self.model = model.to(device=layout.device, dtype=self.dtype).eval()
        self.levels = [m for m in model.layers if isinstance(m, Subsample)]
        self.cuda_graphs = layout.device.type == "cuda"  # decode steps replayed as CUDA graphs
        self.compile = False  # decode steps through torch.compile first (decode_step.py): set to True to use

    def new_caches(self, batch: int, max_len: int) -> list:
        """One generation cache per block: a KV cache (attention) or a recurrent state (HGRN-Bit)."""
        return [block.new_cache(batch, max_len, dtype=self.dtype, device=self.layout.device)
                for block in self.model.blocks()]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, caches: list | None = None, start_pos: int | torch.Tensor = 0,
               rows: torch.Tensor | None = None, experts: list | None = None) -> torch.Tensor:
        """Full-vocabulary fp32 logits [b, s, V] for `tokens` (continuing cache rows `rows` at start_pos).
        Always SUBLLM's inference rule (keep iff score > 0); models without levels ignore it."""
        from parallel.tensor_parallel import gather_vocab

        out = self.model(tokens.to(self.layout.device), caches=caches, start_pos=start_pos, rows=rows,
                         threshold=True, experts=experts)
        return gather_vocab(out).float()

    def prefill(self, prompts, max_new: int, ff: FFSelection | None = None):
        """Prefill prompts ([b, n] ids or b lists of any lengths) into fresh caches, each into its own
        row. Returns (last-position logits [b, V], a DecodeStep that continues every row)."""
        from pretrain.decode_step import DecodeStep

        rows = [torch.as_tensor(p, dtype=torch.long).view(-1) for p in prompts]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        if not rows or int(lengths.min()) == 0:
            raise ConfigError("generation needs at least one prompt, and no empty prompt")
        total = int(lengths.max()) + max_new
        if total > self.model.cfg.seq_len:
            raise ConfigError(f"prompt ({int(lengths.max())}) + {max_new} new tokens exceeds the "
                              f"model's context of {self.model.cfg.seq_len} tokens")
        for m in self.levels:
            m.reset_counts()
        caches = self.new_caches(len(rows), total)
        experts = self.new_experts(len(rows), ff) if ff is not None and ff.active else None
        if bool((lengths == lengths[0]).all()):  # one batched prefill (SUBLLM's forward splits it by row)
            logits = self.logits(torch.stack(rows), caches, experts=experts)[:, -1]
        else:  # each prompt alone into its own cache row
            logits = torch.cat([self.logits(r[None], caches, rows=torch.tensor([i]), experts=experts)[:, -1]
                                for i, r in enumerate(rows)])
        if experts is not None:  # GRIFFIN: the prompt chose each row's FF neurons for decoding
            for e, block in zip(experts, self.model.blocks()):
                e.select(block.mlp)
        # every row continues at its own position; CUDA graphs on a GPU (see decode_step.py)
        return logits, DecodeStep(self.model, caches, lengths, max_new, cuda_graphs=self.cuda_graphs,
                                  experts=experts, compile=self.compile)

    def new_experts(self, batch: int, ff: FFSelection) -> list:
        """GRIFFIN's per-block selections; dense and ternary (latent or packed) GLUs alike (griffin.py)."""
        m = self.model.cfg
        # a Flextron sub-network's blocks have their own widths: GRIFFIN selects inside each
        return [Experts(batch, m.block_ffn(i) // self.layout.tp_size, ff, layer=i, device=self.layout.device)
                for i in range(len(self.model.blocks()))]

    @torch.no_grad()
    def generate_ids(self, prompts: torch.Tensor | list[list[int]], s: SamplingConfig,
                     ff: FFSelection | None = None) -> torch.Tensor:
        """prompts: [b, n] ids, or b lists of ids of any lengths -> generated ids [b, max_new_tokens].
        ff: GRIFFIN (or a baseline) FF selection for the decoded tokens; None = the full model.
        An adaptive Flextron model (budget "auto") routes every prompt, then decodes each group of
        prompts that got the same widths with that sub-network."""
        if self.elastic is None:
            return self._generate_ids(prompts, s, ff)
        from pretrain import subnetwork

        prompts = [torch.as_tensor(p, dtype=torch.long).view(-1) for p in prompts]
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            mi, hi = subnetwork.prompt_choice(self.elastic, p[None].to(self.layout.device), self.budget_target)
            groups.setdefault((tuple(mi), tuple(hi)), []).append(i)
        out = [None] * len(prompts)
        self.choices = []  # per group: (prompt indexes, MLP widths, query groups) of the last call
        for (mi, hi), rows in groups.items():
            widths = subnetwork.widths(self.elastic, list(mi), list(hi))
            if (mi, hi) not in self._subnets:
                net = subnetwork.build(self.elastic, self._logical, *widths)
                self._subnets[(mi, hi)] = net.to(device=self.layout.device, dtype=self.dtype).eval()
            self.model = self._subnets[(mi, hi)]
            self.choices.append((rows, *widths))
            for r, ids in zip(rows, self._generate_ids([prompts[r] for r in rows], s, ff)):
                out[r] = ids
        self.model = self.elastic
        return torch.stack(out)

    def _generate_ids(self, prompts, s: SamplingConfig, ff: FFSelection | None) -> torch.Tensor:
        from parallel.tensor_parallel import gather_vocab

        logits, step = self.prefill(prompts, s.max_new_tokens - 1, ff)
        gen = torch.Generator(device=self.layout.device).manual_seed(s.seed)
        out = []
        for i in range(s.max_new_tokens):
            nxt = sample_next(logits, s, gen)
            out.append(nxt)
            if i + 1 < s.max_new_tokens:
                logits = gather_vocab(step(nxt[:, None]))[:, -1].float()
        return torch.stack(out, dim=1)

    def keep_counts(self) -> dict[int, tuple[int, int]]:
        """SUBLLM, over the last generate call (prefill and decode): level -> (tokens entering it, kept)."""
        return {m.level: (m.seen, m.kept) for m in self.levels}

    def keep_stats(self) -> dict[int, float]:
        """level -> fraction of the tokens entering it that it kept (of its input, not of the sequence:
        the innermost level's share of all tokens is the product along the nesting)."""
        return {lvl: kept / seen for lvl, (seen, kept) in self.keep_counts().items() if seen}

    def generate(self, prompts: str | list[str], s: SamplingConfig, num_samples: int = 1,
                 ff: FFSelection | None = None) -> list[str]:
        """Texts, prompt-major: num_samples continuations of each prompt (ff: GRIFFIN, see generate_ids)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = []
        for text in prompts:
            enc = self.tokenizer.encode(text).ids
            if not enc:
                raise ConfigError(f"the prompt {text!r} is empty after tokenization")
            ids += [enc] * num_samples
        new = self.generate_ids(ids, s, ff).tolist()
        return [prompts[i // num_samples] + self.tokenizer.decode(row) for i, row in enumerate(new)]
