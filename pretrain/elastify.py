"""Flextron's importance permutation: sort every elastic unit of a trained model by importance.

    python -m pretrain elastify --checkpoint runs/tiny-llama --calib-data data/stdlib --out runs/tiny-elastic

A Flextron sub-network of width k uses the FIRST k units of every elastic layer, so the units must
first be ordered from most to least important. Importance is measured forward-only on calibration
tokens (the first batches of a prepare-data folder's train split):
- SwiGLU neuron i: Σ over tokens of |z_i|, z = silu(gate(x)) * up(x), the input of `mlp.down`;
- query group g (KV head g with query heads g*r .. g*r+r-1, r = n_heads / n_kv_heads): Σ over
  tokens of the L2 norms of its query heads' attention outputs, the input of `attn.o`.
Each layer's units are sorted by descending score and the weights permuted physically: gate/up rows
and down columns per neuron; k/v rows in blocks of head_dim, q rows and o columns in blocks of
r*head_dim per group. Both are exact symmetries of the full model (RoPE acts within a head), which
is verified on the first calibration batch before anything is written. The output is a weights-only
folder (checkpoint.save_weights) with model.elastic enabled: elastic continued training starts from
it (checkpoint.init_from), and `generate` samples from its full model.

Runs in one process on the logical (TP=1) model, whatever tensor-parallel size the checkpoint was
written at (checkpoint.load_weights joins the shards); the work is a few forward passes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain.config import ModelConfig, RunConfig, config_from_dict
from pretrain.errors import CheckpointError, ConfigError, DataError
from pretrain.models.elastic import block_prefixes, unit_weights

RTOL = 1e-4  # verification: max |logit diff| allowed, relative to the largest |logit| (fp32 rounding only)


def parse_overrides(items: list[str] | None) -> dict:
    """`key=value` strings (values parsed as YAML) -> fields of model.elastic, e.g. ffn_fractions=[1.0,0.5]."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("model.elastic.")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. ffn_fractions=[1.0,0.5]")
        if key == "enabled":
            raise ConfigError("--set enabled: elastify always enables model.elastic; set the other fields")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    return out


@torch.no_grad()
def importance(model, batches) -> dict[int, dict[str, torch.Tensor]]:
    """layer id -> {"mlp": [ffn_hidden] neuron scores, "heads": [n_kv_heads] query-group scores} (float64)
    of a TP=1 network over `batches` (token ids [b, s] each). Forward hooks only: the model runs its own
    forward, so SUBLLM's inner blocks score exactly the tokens their level keeps."""
    scores: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []

    def on_down(layer: int):
        def hook(_module, args):
            z = args[0].detach().double()  # [b, s, F]
            acc = scores[layer]
            acc["mlp"] = acc.get("mlp", 0) + z.abs().sum(dim=(0, 1))
        return hook

    def on_o(layer: int, groups: int, per_group: int, head_dim: int):
        def hook(_module, args):
            y = args[0].detach().double()  # [b, s, heads * head_dim], heads of group g contiguous
            y = y.view(*y.shape[:2], groups, per_group, head_dim)
            acc = scores[layer]
            acc["heads"] = acc.get("heads", 0) + y.norm(dim=-1).sum(dim=(0, 1, 3))
        return hook

    try:
        for block in model.blocks():
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            if attn is None or mlp is None:
                raise ConfigError(f"block {block.layer_id} ({type(block).__name__}) has no attention + SwiGLU: "
                                  "elastic widths need LLaMA blocks 'T'")
            scores[block.layer_id] = {}
            hooks.append(mlp.down.register_forward_pre_hook(on_down(block.layer_id)))
            hooks.append(attn.o.register_forward_pre_hook(
                on_o(block.layer_id, attn.kv_heads, attn.heads // attn.kv_heads, attn.head_dim)))
        device = next(model.parameters()).device
        for tokens in batches:
            model(tokens.to(device))
    finally:
        for h in hooks:
            h.remove()
    for layer, acc in scores.items():
        if set(acc) != {"mlp", "heads"}:  # a SUBLLM level that never kept a token: nothing to sort by
            raise DataError(f"block {layer} saw no calibration token; use more calibration batches")
    return scores


def orders(scores: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer and unit kind, the unit indexes by descending score (ties keep their order)."""
    return {layer: {kind: s.sort(descending=True, stable=True).indices.cpu() for kind, s in acc.items()}
            for layer, acc in scores.items()}


def _blocks(w: torch.Tensor, order: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """w with its blocks of `size` rows (dim 0) or columns (dim 1) taken in `order`."""
    idx = (order[:, None] * size + torch.arange(size)).reshape(-1).to(w.device)
    return w.index_select(dim, idx)


def permute_state(state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                  order: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A new LOGICAL (TP=1) state dict with each block's units in `order` (layer id -> {"mlp": [F],
    "heads": [G]} index tensors, unit j of the result = unit order[j] of the input); other tensors are
    shared, not copied. The full model computes the same function before and after."""
    out = dict(state)
    for layer, prefix in block_prefixes(model_cfg).items():
        if layer not in order:
            continue
        for name, kind, dim, size in unit_weights(model_cfg):
            perm = order[layer][kind]
            key = prefix + name
            if key not in state:
                raise CheckpointError(f"permute_state: no {key} in the state dict (not a TP=1 LLaMA/SUBLLM state?)")
            w = state[key]
            if w.shape[dim] != len(perm) * size:
                raise CheckpointError(f"permute_state: {key} has {w.shape[dim]} along dim {dim}, "
                                      f"expected {len(perm)} units of {size}")
            out[key] = _blocks(w, perm, size, dim)
    return out


def captured(scores: dict[int, dict[str, torch.Tensor]], fraction: float = 0.5) -> dict[str, list[float]]:
    """Per unit kind, per layer: the share of the layer's total importance its top `fraction` of units hold
    (0.5 for uniform units; near 1 when a few units carry the layer, so a narrow sub-network keeps them)."""
    out: dict[str, list[float]] = {"mlp": [], "heads": []}
    for layer in sorted(scores):
        for kind, s in scores[layer].items():
            top = s.sort(descending=True).values[:max(1, int(len(s) * fraction))]
            out[kind].append(round(float(top.sum() / s.sum().clamp_min(1e-30)), 4))
    return out


def calibration_batches(path: str | Path, model_cfg: ModelConfig, batches: int, batch_size: int
                        ) -> list[torch.Tensor]:
    """The first `batches` x `batch_size` sequences of the train split, in file order (deterministic),
    as model inputs [batch_size, seq_len] (each stored sample holds seq_len + 1 tokens)."""
    from pretrain.data import PackedDataset

    if batches < 1 or batch_size < 1:
        raise ConfigError(f"calibration needs at least one batch of one sequence (got {batches} x {batch_size})")
    data = PackedDataset(path, "train")
    if data.seq_len != model_cfg.seq_len:
        raise ConfigError(f"{path}: sequences of {data.seq_len} tokens, but the model was trained on "
                          f"model.seq_len={model_cfg.seq_len}; prepare the calibration data with --seq-len "
                          f"{model_cfg.seq_len}")
    if data.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"{path}: vocabulary of {data.vocab_size} tokens, more than the model's "
                          f"{model_cfg.vocab_size}: tokenized with another tokenizer?")
    need = batches * batch_size
    if data.num_samples < need:
        raise DataError(f"{path}: the train split holds {data.num_samples} sequences, fewer than "
                        f"{batches} calibration batches x {batch_size}; pass fewer --calib-batches")
    rows = []
    for shard, (_, count) in enumerate(data.shards):
        take = min(count, need - len(rows))
        rows += [torch.from_numpy(a.astype("int64")) for a in data.read_segment(shard, 0, take)]
        if len(rows) == need:
            break
    seqs = torch.stack(rows)[:, :-1]  # inputs only; the last token is a target
    return list(seqs.split(batch_size))


def source(checkpoint: str | Path) -> tuple[Path, RunConfig]:
    """The checkpoint folder `Generator` loads and its run config, read before any weight is."""
    path = ckpt.find(checkpoint)
    return path, config_from_dict(ckpt.read_meta(path)["config"])


def elastic_config(cfg: RunConfig, overrides: dict | None = None) -> dict:
    """The run config as a dict with model.elastic enabled (plus `overrides` of its fields), validated."""
    data = cfg.model_dump(mode="json")
    data["model"]["elastic"] = {**data["model"]["elastic"], **(overrides or {}), "enabled": True}
    try:
        return config_from_dict(data).model_dump(mode="json")
    except ConfigError as e:  # the defaults suit large widths; small models pick their own
        raise ConfigError(f"{e}\n(set model.elastic fields with --set KEY=VALUE, e.g. neuron_granularity=16 "
                          "'head_fractions=[1.0,0.5]')") from None


def _tokenizers_match(a: Path, b: Path) -> bool:
    from pretrain.data import load_tokenizer

    return load_tokenizer(a).get_vocab() == load_tokenizer(b).get_vocab()


def elastify(checkpoint: str | Path, calib_data: str | Path, out: str | Path, *, batches: int = 8,
             batch_size: int = 8, overwrite: bool = False, elastic_overrides: dict | None = None) -> dict:
    """Sort the units of `checkpoint` by importance on `calib_data` and write the elastic model to `out`.
    Every check that needs no weights runs first; a failed verification writes nothing. Returns a summary."""
    from parallel.distributed import world_size_from_env
    from pretrain.generate import Generator

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite it (pass --overwrite)")
    path, cfg = source(checkpoint)
    m = cfg.model
    if out.resolve() in (path.resolve(), *path.resolve().parents):
        raise ConfigError(f"--out {out} holds the source checkpoint {path}; write the elastic model elsewhere")
    if m.linear != "dense":
        raise ConfigError(f"{path}: model.linear is {m.linear!r}; elastic widths need dense linears")
    if set(m.structure) - set("T()"):
        raise ConfigError(f"{path}: structure {m.structure!r}; elastic widths need LLaMA blocks 'T' "
                          "(HGRN-Bit 'H' blocks are not elastic)")
    if world_size_from_env() != 1:  # the hooks must see whole layers: the logical model in one process
        raise ConfigError("elastify runs in one process (the checkpoint may have any tensor-parallel size); "
                          "run it without torchrun")
    config = elastic_config(cfg, elastic_overrides)
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        raise CheckpointError(f"{path}: missing tokenizer.json")
    from pretrain.data import PackedDataset

    if not _tokenizers_match(tokenizer, PackedDataset(calib_data, "train").tokenizer_path):
        raise ConfigError(f"{calib_data} was tokenized with another tokenizer than {path}")
    calib = calibration_batches(calib_data, m, batches, batch_size)

    gen = Generator(path, dtype=torch.float32)  # TP=1 in one process; fp32: the verification is then tight
    model = gen.model
    scores = importance(model, calib)
    order = orders(scores)
    with torch.no_grad():
        reference = model(calib[0].to(gen.layout.device)).float()
        # the permuted tensors are new; the others alias the live parameters and load onto themselves
        permuted = permute_state(model.state_dict(), m, order)
        model.load_state_dict(permuted)
        diff = float((model(calib[0].to(gen.layout.device)).float() - reference).abs().max())
    limit = RTOL * max(1.0, float(reference.abs().max()))
    if not diff <= limit:
        raise CheckpointError(f"verification failed: the permuted model's logits differ from the original's by "
                              f"{diff:.3g} (> {limit:.3g}); nothing written")

    moved = {kind: sum(int((o[kind] != torch.arange(len(o[kind]))).sum()) for o in order.values())
             for kind in ("mlp", "heads")}
    report = {"calib_batches": len(calib), "calib_batch_size": batch_size,
              "tokens": sum(b.numel() for b in calib), "max_logit_diff": diff,
              "captured_top_half": captured(scores), "moved": moved}
    meta = {"config": config, "source": str(gen.path), "elastify": report}
    # The plain model's weights, named as in any model (network.py keeps the router outside `layers`):
    # no router, since one trained on an earlier elastic model chose widths of the old unit order, and
    # no `_extra_state` entries (megatron-core linears add them as None; a non-strict load does without)
    weights = {k: v for k, v in permuted.items() if v is not None and not k.startswith("router.")}
    ckpt.save_weights(out, weights, meta, files=[tokenizer], overwrite=overwrite)
    return {**report, "out": str(out), "layers": len(order),
            "units": {"mlp": sum(len(o["mlp"]) for o in order.values()),
                      "heads": sum(len(o["heads"]) for o in order.values())}}
