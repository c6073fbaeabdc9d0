"""eval-griffin: what decoding with a fraction of the FF neurons costs in quality.

For held-out sequences split into prompt + continuation, at each density and selection method:
- the continuation's perplexity, teacher-forced: the prompt is prefilled with the full FF (and, for
  GRIFFIN, chooses each sequence's neurons), every continuation token is decoded with the selection;
- greedy agreement: the fraction of greedily generated tokens equal to the full model's at the same
  position (the full model's own greedy output is the reference).
Density 1.0 is the full model (one row, method "full").
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pretrain.errors import ConfigError
from pretrain.generate import Generator, SamplingConfig
from pretrain.models.griffin import METHODS, FFSelection


@torch.no_grad()
def continuation_nll(gen: Generator, prompts: torch.Tensor, cont: torch.Tensor, ff: FFSelection | None
                     ) -> torch.Tensor:
    """Summed negative log-likelihood of cont [b, m] after prompts [b, n] (fp64 scalar)."""
    from parallel.tensor_parallel import gather_vocab

    logits, step = gen.prefill(prompts, cont.shape[1] - 1, ff)
    cont = cont.to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits, cont[:, 0], reduction="sum").double()
    for j in range(1, cont.shape[1]):
        logits = gather_vocab(step(cont[:, j - 1:j]))[:, -1].float()
        nll += torch.nn.functional.cross_entropy(logits, cont[:, j], reduction="sum").double()
    return nll


def evaluate(gen: Generator, docs: torch.Tensor, *, prompt_len: int, densities: list[float], methods: list[str],
             gen_tokens: int, batch: int) -> list[dict]:
    """docs [N, L] token ids; prompt = the first prompt_len, continuation = the rest."""
    if not 0 < prompt_len < docs.shape[1]:
        raise ConfigError(f"--prompt-len must be in (0, {docs.shape[1]}) for sequences of {docs.shape[1]} tokens")
    settings = [("full", 1.0)] + [(m, d) for m in methods for d in densities if d < 1.0]
    nll = {s: 0.0 for s in settings}
    match = {s: 0 for s in settings}
    greedy = SamplingConfig(max_new_tokens=gen_tokens, temperature=0)
    for lo in range(0, len(docs), batch):
        prompts, cont = docs[lo:lo + batch, :prompt_len], docs[lo:lo + batch, prompt_len:]
        reference = gen.generate_ids(prompts, greedy)
        for method, density in settings:
            ff = None if method == "full" else FFSelection(density=density, method=method)
            nll[(method, density)] += float(continuation_nll(gen, prompts, cont, ff))
            match[(method, density)] += int((gen.generate_ids(prompts, greedy, ff) == reference).sum())
    tokens, generated = docs[:, prompt_len:].numel(), len(docs) * gen_tokens
    return [{"method": m, "density": d, "ppl": math.exp(nll[(m, d)] / tokens), "nll": nll[(m, d)] / tokens,
             "greedy_match": match[(m, d)] / generated} for m, d in settings]


def table(rows: list[dict]) -> str:
    full = next(r for r in rows if r["method"] == "full")
    out = ["| method | FF density | continuation ppl | vs full | greedy token match |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['density']:.2f} | {r['ppl']:.3f} | {r['ppl'] / full['ppl'] - 1:+.1%} | "
                   f"{r['greedy_match']:.3f} |")
    return "\n".join(out)


def run(checkpoint: str, data: str, *, num_docs: int, prompt_len: int, densities: list[float], methods: list[str],
        gen_tokens: int, batch: int, out: str | None) -> list[dict]:
    from pretrain.data.dataset import PackedDataset
    from pretrain.data.loader import val_batches

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown selection method(s) {bad}; choose from {list(METHODS)}")
    if any(not 0 < d <= 1 for d in densities):
        raise ConfigError(f"densities must be in (0, 1], got {densities}")
    gen = Generator(checkpoint)
    docs = torch.cat(list(val_batches(PackedDataset(data, "val"), dp_rank=0, dp_size=1, micro_batch=num_docs,
                                      max_batches=1)))[:, :-1]
    if docs.shape[1] > gen.model.cfg.seq_len:
        docs = docs[:, :gen.model.cfg.seq_len]
    if prompt_len + gen_tokens > docs.shape[1]:
        raise ConfigError(f"--prompt-len {prompt_len} + --gen-tokens {gen_tokens} exceeds the {docs.shape[1]}-token "
                          "sequences")
    rows = evaluate(gen, docs, prompt_len=prompt_len, densities=densities, methods=methods, gen_tokens=gen_tokens,
                    batch=batch)
    if out and gen.layout.is_rank0:
        Path(out).write_text(json.dumps({"checkpoint": str(gen.path), "data": data, "docs": len(docs),
                                         "prompt_len": prompt_len, "gen_tokens": gen_tokens, "rows": rows}, indent=1))
    return rows
