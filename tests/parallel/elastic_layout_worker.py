"""torchrun worker (TP = WORLD_SIZE = 2) for tests/parallel/test_elastic_layout.py. Usage:
elastic_layout_worker.py DIR, where DIR/tp1 is a weights-only folder written at TP=1. It

- builds the seed-0 model, deals its elastic parameters round-robin and gathers the logical weights,
  the logits and rank 0's gate rows;
- writes what each rank holds in DeepSpeed's per-rank file layout: DIR/tp2_elastic (after the deal)
  and DIR/tp2_dense (megatron's contiguous split, before it, as a non-elastic model would save);
- loads DIR/tp1 into a seed-1 model with `load_weights` and takes its logits.

Rank 0 saves everything to DIR/tp2.pt. The helpers here are shared with the test (TP=1 side)."""
import json
import sys
from pathlib import Path

import torch

from pretrain.config import ModelConfig, RunConfig

CFG = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=256, seq_len=16, structure="TTT")


def elastic_units(cfg: ModelConfig) -> dict[str, int]:
    """Flextron's unit per parameter-name suffix: a neuron, a KV head, a query group."""
    head_dim = cfg.d_model // cfg.n_heads
    group = head_dim * (cfg.n_heads // cfg.n_kv_heads)
    return {"mlp.gate.weight": 1, "mlp.up.weight": 1, "mlp.down.weight": 1, "attn.k.weight": head_dim,
            "attn.v.weight": head_dim, "attn.q.weight": group, "attn.o.weight": group}


def mark_elastic(net, cfg: ModelConfig = CFG) -> None:
    """Set `elastic_unit` as an elastic model does (and check it where the model already set it)."""
    units = elastic_units(cfg)
    for name, p in net.named_parameters():
        unit = next((u for suffix, u in units.items() if name.endswith(suffix)), None)
        if unit is None:
            continue
        if hasattr(p, "elastic_unit"):
            assert p.elastic_unit == unit, f"{name}: the model set elastic_unit={p.elastic_unit}, expected {unit}"
        else:
            p.elastic_unit = unit


def build(seed: int, cfg: ModelConfig = CFG):
    from pretrain.models import build_network

    torch.manual_seed(seed)
    net = build_network(cfg)
    mark_elastic(net, cfg)
    return net


def tokens() -> torch.Tensor:
    return torch.randint(1, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(net) -> torch.Tensor:
    from parallel.tensor_parallel import gather_vocab

    return gather_vocab(net(tokens()))


def tensors(state: dict) -> dict[str, torch.Tensor]:
    """A module state dict without megatron's `_extra_state` entries (None)."""
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def run_meta(tp: int, *, elastic: bool, cfg: ModelConfig = CFG) -> dict:
    """Checkpoint metadata as the trainer writes it (the fields load_weights reads)."""
    config = RunConfig().model_dump(mode="json")
    config["model"] = cfg.model_dump(mode="json")
    config["model"]["elastic"]["enabled"] = elastic  # the saved layout: round-robin or contiguous
    config["parallel"].update(tensor=tp, zero_stage=1)
    return {"config": config, "step": 0, "dp_size": 1}


def main(folder: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.distributed import init_distributed
    from parallel.elastic_layout import deal_round_robin, unshard
    from pretrain.checkpoint import META, load_weights, model_file

    root = Path(folder)
    layout = init_distributed(2)
    group = ps.get_tensor_model_parallel_group()
    net = build(0)
    contiguous = tensors(net.state_dict())
    deal_round_robin(net)
    logical = {}
    for name, p in net.named_parameters():
        parts = [torch.empty_like(p.data) for _ in range(layout.tp_size)]
        dist.all_gather(parts, p.data.contiguous(), group=group)
        logical[name] = unshard(parts, p)
    results = {"logical": logical, "dealt": logits(net), "rank0_gate": net.layers[1].mlp.gate.weight.detach().clone()}

    for name, state, elastic in (("tp2_elastic", tensors(net.state_dict()), True), ("tp2_dense", contiguous, False)):
        out = root / name
        out.mkdir(exist_ok=True)
        torch.save({"module": state}, out / model_file(layout.tp_rank))
        if layout.rank == 0:
            (out / META).write_text(json.dumps(run_meta(2, elastic=elastic)))

    other = build(1)
    deal_round_robin(other)  # as a run builds it; load_weights then replaces every weight
    load_weights(root / "tp1", other)
    results["loaded"] = logits(other)
    dist.barrier()
    if layout.rank == 0:
        torch.save(results, root / "tp2.pt")


if __name__ == "__main__":
    main(sys.argv[1])
    from parallel.distributed import destroy_distributed

    destroy_distributed()  # process groups torn down before the interpreter (else gloo's threads may abort the exit)
