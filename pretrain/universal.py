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
change (its optimizer state is whole) and cannot change TP or PP (checkpoint.check_compatible refuses it).

Pipeline parallelism: the converter reads a PP checkpoint's ZeRO shards stage by stage, naming each
parameter as the PipelineModule does (`7.layer.<name>`, `tied_modules.embed.layer.<name>`). Frugal
keys the universal folder by the Network's names instead (`layers.7.<name>`, pipeline.network_name),
the same at every pipeline size, so one conversion loads at any TP x PP x DP layout; a pipeline run
looks its parameters up under those names (`network_names`). Two things the converter gets wrong
for PP are fixed in its view of the files: it reads the TP layout maps from the first stage's
model-state file only (each stage's describes its own parameters: it gets the union), and it would
extract the tied embedding from both ends (it skips the copy on later stages).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import CheckpointError
from pretrain.pipeline import TIED_KEY, network_name
from pretrain.safe_load import safe_load, safe_torch_load

UNIVERSAL = "universal"  # sub-folder of a checkpoint: its DeepSpeed universal-checkpoint conversion


def to_universal(path: Path, *, workers: int = 1) -> Path:
    """Convert the checkpoint folder `path` into DeepSpeed's universal format (DP-size independent),
    once: `<path>/universal/`, complete whenever it exists (built as universal.partial, then renamed).
    Run by one process only. DeepSpeed's converter calls torch.load(weights_only=False): its loads
    go through safe_torch_load here. `workers` > 1 forks extraction/merge processes (they inherit the
    safe torch.load)."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    from pretrain.checkpoint import LAYOUT_FORMAT, read_meta, saved_layout

    out = path / UNIVERSAL
    if out.is_dir():
        return out
    meta = read_meta(path)
    saved = saved_layout(meta)
    if saved["tensor"] > 1 and meta.get("checkpoint_format", 1) < LAYOUT_FORMAT:  # shards it could not join
        raise CheckpointError(f"{path} was written at parallel.tensor={saved['tensor']} without its parameters' "
                              "tensor-parallel layouts (an older Frugal): resume it at the same data- "
                              "and tensor-parallel sizes")
    pipeline = saved["pipeline"] > 1
    tmp = path / (UNIVERSAL + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # older TP=1 checkpoints: nothing to join
    log = io.StringIO()
    try:
        # under PP the stages' model-state files each describe their own parameters (and hold no
        # weights, the layer files do: cheap to read twice); without PP every file describes them all
        view = functools.partial(_converter_view, layouts=_all_layouts(path) if pipeline else None)
        with safe_torch_load(transform=view), contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
        if pipeline:
            _rename_to_network(tmp / "zero")
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


def _all_layouts(path: Path) -> dict[str, Any]:
    """The union of the parameters' layout maps over the model-state files (one per TP rank and PP
    stage, each describing its own stage's parameters; parallel/universal_layout.py)."""
    from deepspeed.checkpoint.constants import AFFINE_MAP, AFFINE_MAP_PARAMS, UNIVERSAL_CHECKPOINT_INFO

    info = None
    for f in sorted(path.glob("mp_rank_*_model_states.pt")):
        own = safe_load(f, map_location="cpu").get(UNIVERSAL_CHECKPOINT_INFO)
        if own is None:
            continue
        if info is None:
            info = copy.deepcopy(own)
        elif AFFINE_MAP in own:
            info[AFFINE_MAP][AFFINE_MAP_PARAMS].update(own[AFFINE_MAP][AFFINE_MAP_PARAMS])
    return info


def _converter_view(state, *, layouts):
    """What the converter reads of each file: megatron's None `_extra_state` module entries left out
    (it turns every entry into an fp32 tensor: AttributeError); for a PP checkpoint (`layouts`: the
    union of its stages' maps) every stage's layout maps in each model-state file, and the tied
    embedding taken from the first stage only."""
    from deepspeed.checkpoint.constants import PIPELINE_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_INFO

    if not isinstance(state, dict):
        return state
    if isinstance(state.get("module"), dict):
        state = {**state, "module": {k: v for k, v in state["module"].items() if isinstance(v, torch.Tensor)}}
    if layouts is not None and UNIVERSAL_CHECKPOINT_INFO in state:
        state = {**state, UNIVERSAL_CHECKPOINT_INFO: {**layouts, PIPELINE_REPLICATED_PARAMETER_PATTERNS:
                                                      [re.escape(f"tied_modules.{TIED_KEY}.")]}}
    return state


def _rename_to_network(zero: Path) -> None:
    """Name each parameter's folder of a PP checkpoint's conversion as the Network does."""
    for d in [d for d in zero.iterdir() if d.is_dir()]:
        d.rename(zero / network_name(d.name))


@contextlib.contextmanager
def network_names(engine):
    """During a universal load into a pipeline engine: the ZeRO optimizer looks each parameter up under
    its Network name (the universal folder's, see the module docstring), then under its own again
    (DeepSpeed's saves name parameters as the PipelineModule does)."""
    from deepspeed.pipe import PipelineModule

    opt = engine.optimizer
    if not isinstance(engine.module, PipelineModule) or not hasattr(opt, "param_names"):
        yield
        return
    own = opt.param_names
    opt.param_names = {p: network_name(n) for p, n in own.items()}
    try:
        yield
    finally:
        opt.param_names = own


def needs_universal(meta: dict[str, Any], parallel: dict[str, Any]) -> bool:
    """Whether resuming from a checkpoint with this metadata under the run's `parallel` settings (and
    its `dp_size`) goes through a universal checkpoint: its optimizer state is cut into ZeRO shards for
    another TP, PP or DP size, or another ZeRO stage (checkpoint.check_compatible refuses the changes
    a ZeRO-0 checkpoint cannot make)."""
    from pretrain.checkpoint import saved_layout

    saved = saved_layout(meta)
    return saved["zero_stage"] > 0 and any(saved[k] != parallel.get(k, 1)
                                           for k in ("tensor", "pipeline", "dp_size", "zero_stage"))


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
