"""Resuming at another data- or tensor-parallel size: DeepSpeed's universal checkpoint.

Under ZeRO >= 1 the optimizer state is cut into one shard per data-parallel rank, and every weight
and optimizer moment into one shard per tensor-parallel rank, so a checkpoint written at DP = 2 or
TP = 2 cannot be loaded file for file at another layout. DeepSpeed's converter (`ds_to_universal`)
rewrites it per parameter as the full logical tensor, independent of both sizes (each parameter's TP
layout comes with the checkpoint: parallel/universal_layout.py); its universal loading then re-cuts
it for the current ranks. Rank 0 converts once, with the other ranks waiting, into
`<step folder>/universal/` (built as `universal.partial`, then renamed: complete whenever it exists,
reused by later resumes). The cache is a sub-folder of its checkpoint: the manifest (top-level files)
does not list it and pruning deletes it with the checkpoint. ZeRO-0 needs none of this for a DP
change (its optimizer state is whole) and cannot change TP (checkpoint.check_compatible refuses it).
Pipeline-parallel size changes are not handled here.
"""
from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import CheckpointError
from pretrain.safe_load import safe_load, safe_torch_load

UNIVERSAL = "universal"  # sub-folder of a checkpoint: its DeepSpeed universal-checkpoint conversion


def to_universal(path: Path, *, workers: int = 1) -> Path:
    """Convert the checkpoint folder `path` into DeepSpeed's universal format (DP-size independent),
    once: `<path>/universal/`, complete whenever it exists (built as universal.partial, then renamed).
    Run by one process only. DeepSpeed's converter calls torch.load(weights_only=False): its loads
    go through safe_torch_load here. `workers` > 1 forks extraction/merge processes (they inherit the
    safe torch.load)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    out = path / UNIVERSAL
    if out.is_dir():
        return out
    _check_layouts(path)
    tmp = path / (UNIVERSAL + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # older TP=1 checkpoints: nothing to join
    log = io.StringIO()
    try:
        # the converter turns every module entry into an fp32 tensor, megatron's None `_extra_state`
        # entries included (AttributeError): it reads the module without them
        with safe_torch_load(transform=_tensors_only_module), contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
    except pickle.UnpicklingError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{path}: refusing to load a checkpoint file that holds more than data: {e}") from None
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {path} to a universal checkpoint failed: {e!r}\n{log.getvalue()[-2000:]}") from e
    tmp.rename(out)
    stray = path / "latest_universal"  # the converter names its output folder beside it: not ours
    if stray.is_file() and stray.read_text().strip() == tmp.name:
        stray.unlink()
    return out


def _check_layouts(path: Path) -> None:
    """Refuse a checkpoint whose TP shards the converter could not join: written at TP > 1 without the
    layout maps (before Frugal wrote them)."""
    from pretrain.checkpoint import LAYOUT_FORMAT, read_meta

    meta = read_meta(path)
    saved_tp = meta["config"]["parallel"]["tensor"]
    if saved_tp > 1 and meta.get("checkpoint_format", 1) < LAYOUT_FORMAT:
        raise CheckpointError(f"{path} was written at parallel.tensor={saved_tp} without its parameters' "
                              "tensor-parallel layouts (an older Frugal): resume it at the same data- "
                              "and tensor-parallel sizes")


def _tensors_only_module(state):
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = {**state, "module": {k: v for k, v in state["module"].items() if isinstance(v, torch.Tensor)}}
    return state


def needs_universal(meta: dict[str, Any], dp_size: int, tp_size: int) -> bool:
    """Whether resuming from a checkpoint with this metadata at `dp_size` x `tp_size` ranks needs the
    universal-checkpoint path: its state is cut into ZeRO shards for another DP or TP size."""
    parallel = meta["config"]["parallel"]
    return parallel["zero_stage"] > 0 and (meta["dp_size"] != dp_size or parallel["tensor"] != tp_size)


def convert_collectively(path: Path, *, rank: int) -> tuple[Path, str]:
    """Collective: rank 0 converts (or reuses the cache), the others wait; one all-reduce also spreads
    a failure to every rank. Returns (load_dir, tag) for DeepSpeed's load_checkpoint."""
    from parallel.distributed import all_ranks_true

    error = None
    if rank == 0:
        try:
            t0 = time.time()
            converted = (path / UNIVERSAL).is_dir()
            to_universal(path)
            print(f"{'reusing' if converted else 'converted'} universal checkpoint {path / UNIVERSAL}"
                  f"{'' if converted else f' in {time.time() - t0:.1f}s'}", flush=True)
        except CheckpointError as e:
            error = e
    if not all_ranks_true(error is None):
        raise error or CheckpointError(f"converting {path} to a universal checkpoint failed on rank 0")
    return path, UNIVERSAL


def fix_zero3_groups(engine, path: Path) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal loading gives every parameter group the hyperparameters of
    the first (the no-decay group would get weight decay) and one shared Adam `step` tensor to every
    sub-group (AdamW then increments it once per sub-group and step): put back each group's own
    values and give each sub-group its own step."""
    saved = safe_load(path / UNIVERSAL / "zero" / "optimizer_state.pt")["param_groups"]
    for group, own in zip(engine.optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in own.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
