"""Export a trained ternary model for inference: 2-bit packed weight codes + one scale per layer.

    python -m pretrain export-ternary --checkpoint runs/hgrnbit-tiny --out exports/hgrnbit-tiny

Training keeps full-precision latent weights (what the optimizer updates). The export quantizes
each one ONCE from its latent weight -- codes = clamp(round(W / γ), −1, 1), γ = mean|W| over the
logical matrix -- and stores the codes packed 4 per byte with γ. It never re-quantizes
dequantized values: the absmean of {−γ, 0, γ} is p·γ (p the nonzero fraction), so the round trip
would change the scale. The folder holds, per tensor-parallel rank, `mp_rank_XX_packed.pt`, plus
`frugal.json` (format, config) and `tokenizer.json`; `generate --checkpoint` loads it directly.
Run under torchrun with parallel.tensor ranks for a TP checkpoint (each rank packs its shard).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain.errors import CheckpointError, ConfigError

FORMAT = "packed-ternary"


def packed_file(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_packed.pt"


def export_ternary(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Pack a checkpoint of a `model.linear: ternary` run into `out`. Returns a summary (bytes)."""
    from parallel.bitlinear import PackedBitLinear, pack_bitlinears
    from pretrain.generate import Generator

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; refusing to overwrite it (pass --overwrite)")
    gen = Generator(checkpoint, dtype=torch.float32)
    if gen.cfg.model.linear != "ternary":
        raise ConfigError(f"{gen.path}: model.linear is {gen.cfg.model.linear!r}; only a ternary model can be "
                          "exported as packed 2-bit weights")
    if gen.packed:
        raise ConfigError(f"{gen.path} is already a packed export")
    layers = pack_bitlinears(gen.model)
    packed = [m for m in gen.model.modules() if isinstance(m, PackedBitLinear)]
    tmp = out.with_name(out.name + ".partial")
    if gen.layout.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"module": gen.model.state_dict()}, tmp / packed_file(gen.layout.tp_rank))
    _barrier()
    summary = {"layers": layers, "packed_bytes": sum(m.nbytes() for m in packed), "tp": gen.layout.tp_size}
    if gen.layout.is_rank0:
        meta = ckpt.read_meta(gen.path)
        meta.update(format=FORMAT, source=str(gen.path), packed=summary)
        (tmp / ckpt.META).write_text(json.dumps(meta, indent=2))
        shutil.copy(gen.path / "tokenizer.json", tmp / "tokenizer.json")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # the export appears complete or not at all
    _barrier()
    return summary


def load_packed_state(path: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    shard = path / packed_file(tp_rank)
    if not shard.is_file():
        raise CheckpointError(f"{path}: missing {shard.name} (a packed export for another tensor-parallel size?)")
    return torch.load(shard, map_location="cpu", weights_only=True)["module"]


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
