"""Sharded checkpoints: DeepSpeed's per-rank model/optimizer shards + Frugal's client state.

    <run dir>/checkpoints/
        latest                    name of the newest COMPLETE checkpoint (replaced atomically)
        step_000100/
            mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed shards (per TP / DP rank)
            rng_rank00000.pt                                 RNG states of every rank
            frugal.json                                      step, data position, MLflow run id,
                                                             resolved config (readable without torch)

A checkpoint becomes `latest` only after every rank reported a finished write; a save that dies
half-way leaves a folder that `latest` never names, so resume never picks it (and the next save
of that step replaces it). Older complete checkpoints beyond `keep_last` are deleted after that.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.errors import CheckpointError

LATEST = "latest"
META = "frugal.json"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def _step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def read_latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint under ckpt_dir, or None if there is none."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = ckpt_dir / tag
    if not (path / META).is_file():
        raise CheckpointError(f"{pointer} names {tag}, but {path / META} is missing: the checkpoint "
                              "folder was damaged after it was written")
    return path


def resolve_resume(setting: str, run_ckpt_dir: Path) -> Path | None:
    """Turn `checkpoint.resume` into a checkpoint folder (or None = fresh start)."""
    if setting == "never":
        if read_latest(run_ckpt_dir) is not None:
            raise CheckpointError(
                f"checkpoint.resume=never, but {run_ckpt_dir} already holds checkpoints; refusing to "
                "overwrite them (use checkpoint.resume=auto, or another run dir)")
        return None
    if setting == "auto":
        return read_latest(run_ckpt_dir)
    path = find(setting, key="checkpoint.resume")
    if read_meta(path).get("format") == WEIGHTS:
        raise CheckpointError(f"checkpoint.resume={setting} is a weights-only folder (no optimizer state): "
                              "start from it with checkpoint.init_from instead")
    return path


def find(setting: str | Path, key: str | None = None) -> Path:
    """A checkpoint folder (a step_* or weights-only folder), a run's checkpoints folder or a run dir
    (its latest complete checkpoint) -> the checkpoint folder: what resume, init_from, generate, export
    take. `key`: the config key that named it, for the error."""
    path = Path(setting)
    for candidate in (path, path / "checkpoints"):
        if (candidate / META).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return read_latest(candidate)
    raise CheckpointError(f"{f'{key}=' if key else ''}{setting}: no checkpoint there (expected a folder "
                          f"holding {META}, a run's checkpoints folder or a run dir)")


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {path / META}: {e}") from None


def check_compatible(meta: dict[str, Any], model_cfg: dict[str, Any], parallel_cfg: dict[str, Any],
                     path: Path) -> None:
    """Refuse a checkpoint of another architecture or shape, naming every differing field."""
    check_model(meta, model_cfg, path)
    saved_tp = meta["config"]["parallel"]["tensor"]
    if saved_tp != parallel_cfg["tensor"]:
        raise CheckpointError(
            f"checkpoint {path} has parallel.tensor={saved_tp} shards, this run uses "
            f"parallel.tensor={parallel_cfg['tensor']}; resume with the same tensor-parallel size")
    if meta["dp_size"] != parallel_cfg["dp_size"] and parallel_cfg["zero_stage"] > 0:
        raise CheckpointError(
            f"checkpoint {path} holds ZeRO optimizer shards for {meta['dp_size']} data-parallel ranks, "
            f"this run has {parallel_cfg['dp_size']}; resume with the same data-parallel size")


def check_model(meta: dict[str, Any], model_cfg: dict[str, Any], path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Refuse weights of another architecture or shape (fields in `ignore` may differ), naming every
    differing field."""
    saved = meta["config"]["model"]
    diffs = [f"model.{k}: checkpoint has {saved.get(k)!r}, this run has {v!r}"
             for k, v in model_cfg.items() if k not in ignore and saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written for another model:\n  " + "\n  ".join(diffs))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, meta: dict[str, Any], *, rank: int, keep_last: int,
         extra_files: list[Path] = ()) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    `extra_files` (e.g. the tokenizer) are copied in by rank 0 so a checkpoint is self-contained."""
    from parallel.distributed import all_ranks_true, barrier

    tag = tag_for(step)
    path = ckpt_dir / tag
    ok = True
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"frugal": meta}, save_latest=False)
        torch.save(_rng_state(), path / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            for f in extra_files:
                shutil.copy2(f, path / Path(f).name)
            _write_atomic(path / META, json.dumps(meta, indent=1, default=str))
    except OSError as e:
        print(f"[rank {rank}] checkpoint write failed: {e}", flush=True)
        ok = False
    if not all_ranks_true(ok):  # someone failed: `latest` keeps pointing at the previous one
        raise CheckpointError(f"saving checkpoint {path} failed on at least one rank; "
                              f"{ckpt_dir / LATEST} still names the previous checkpoint")
    if rank == 0:
        _write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last, current=tag)
    barrier()
    return path


def load(engine, path: Path, *, rank: int) -> dict[str, Any]:
    """Load shards + this rank's RNG state; returns the Frugal metadata."""
    load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no loadable shards in {path}")
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client["frugal"]


WEIGHTS = "weights"  # meta["format"] of a weights-only folder (elastify, export): no optimizer state


def model_file(tp_rank: int) -> str:
    """DeepSpeed's name for one tensor-parallel rank's module weights."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def save_weights(out: Path, state: dict[str, torch.Tensor], meta: dict[str, Any], *, files: list[Path] = (),
                 overwrite: bool = False) -> Path:
    """Write a weights-only checkpoint folder holding the LOGICAL (tensor-parallel size 1) model `state`:
    what `elastify` and `export` produce, what `generate` and `checkpoint.init_from` load (at any TP).
    It appears complete or not at all (written beside, then renamed); an existing non-empty `out` is
    refused unless `overwrite`. `meta` holds at least the run config; `files` (the tokenizer) are copied."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite it (pass --overwrite)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    torch.save({"module": tensors}, tmp / model_file(0))  # (megatron's None _extra_state entries dropped)
    for f in files:
        shutil.copy2(f, tmp / Path(f).name)
    # the logical layout, whatever TP the weights were produced at
    config = {**meta["config"], "parallel": {**meta["config"]["parallel"], "tensor": 1}}
    meta = {"step": 0, **meta, "config": config, "format": WEIGHTS, "dp_size": 1}
    _write_atomic(tmp / META, json.dumps(meta, indent=1, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_weights(path: Path, model) -> dict[str, Any]:
    """Load the module weights of a checkpoint folder (a training step_* folder or a `save_weights`
    folder) into `model` at this process's tensor-parallel layout, whatever TP size they were written
    at: every saved rank's file is read, joined into the logical model (parallel/elastic_layout.py)
    and split again for this rank. Returns that logical state dict (what a Flextron sub-network is
    cut from).

    An elastic model loading weights that have no router (elastify's output of a plain model) keeps
    its freshly initialised router."""
    from parallel.elastic_layout import local_state_dict, logical_state_dict
    from parallel.tensor_parallel import tp_rank, tp_size

    path = Path(path)
    meta = read_meta(path)
    config = meta["config"]
    saved_tp, stage = config["parallel"]["tensor"], config["parallel"]["zero_stage"]
    if stage == 3 and meta.get("format") != WEIGHTS:  # the weights live partitioned in the optimizer shards
        if saved_tp != 1:
            raise CheckpointError(f"{path}: a ZeRO-3 checkpoint written at parallel.tensor={saved_tp} cannot be "
                                  "consolidated here (only tensor-parallel size 1); convert it first")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        shards = [get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)]
    else:
        # a weights-only folder holds plain tensors: read it without unpickling code; DeepSpeed's
        # per-rank files hold more than tensors and need the full unpickler
        shards = [_read_module(path / model_file(r), saved_tp, weights_only=meta.get("format") == WEIGHTS)
                  for r in range(saved_tp)]
    # an elastic model's shards hold its units round-robin, any other model's megatron's contiguous split
    saved_elastic = config["model"].get("elastic", {}).get("enabled", False)
    try:
        full = logical_state_dict(shards, model, round_robin=saved_elastic)
        state = local_state_dict(full, model, tp_rank(), tp_size())
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's size mismatches
        raise CheckpointError(f"{path}: the weights do not fit this model: {e}") from None
    if not any(k.startswith("router.") for k in full):
        missing = [k for k in missing if not k.startswith("router.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not fit this model: {len(missing)} missing "
                              f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}")
    return full


def _read_module(file: Path, saved_tp: int, *, weights_only: bool) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"missing {file} (the checkpoint was written at parallel.tensor={saved_tp}, "
                              "one module file per tensor-parallel rank)")
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only)["module"]
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read the module weights in {file}: {e!r}") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    tags = sorted((p.name for p in ckpt_dir.glob("step_*") if (p / META).is_file()), key=_step_of)
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        if tag != current:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
