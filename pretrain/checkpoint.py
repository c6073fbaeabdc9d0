"""Sharded checkpoints: DeepSpeed's per-rank model/optimizer shards + Frugal's client state.

    <run dir>/checkpoints/
        latest                    name of the newest COMPLETE checkpoint (replaced atomically)
        step_000100/
            mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed shards (per TP / DP rank)
            rng_rank00000.pt                                 RNG states of every rank
            frugal.json                                      step, data position, MLflow run id,
                                                             resolved config (readable without torch)
            manifest.json                                    written LAST: layout + every file's
                                                             size and crc32

A checkpoint is complete when its manifest exists: rank 0 writes it (atomically) only after every
rank reported a finished write, then points `latest` at it (atomically). A save that dies half-way
leaves a folder without a manifest that `latest` never names, so resume never picks it (and the next
save of that step replaces it); a save that fails (disk full) removes its folder and raises.
Resuming verifies the manifest (files present, sizes, checksums) and falls back to the previous
complete checkpoint, with a warning, when the newest one fails. Older complete checkpoints beyond
`keep_last` are deleted after a save, never the one just written nor the one a run fell back to.

Resuming at another data-parallel or tensor-parallel size under ZeRO >= 1 loads a DeepSpeed universal
conversion of the checkpoint, made once and cached in it (pretrain/universal.py).

Loading never runs pickled code: every torch.load is weights_only=True, with an allow-list of the
few plain classes DeepSpeed's optimizer files and the RNG files hold (pretrain/safe_load.py).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pretrain.errors import CheckpointError
from pretrain.safe_load import safe_engine_loads, safe_load, safe_torch_load

LATEST = "latest"
META = "frugal.json"
MANIFEST = "manifest.json"
# meta["checkpoint_format"]: 2 = folders that get a manifest (older ones load unverified); 3 = the
# model-state files also carry each parameter's tensor-parallel layout (parallel/universal_layout.py),
# which resuming at another TP size needs (older TP > 1 checkpoints resume at their own layout only)
FORMAT = 3
MANIFEST_FORMAT, LAYOUT_FORMAT = 2, 3


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def _step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def read_latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint under ckpt_dir, or None if there is none."""
    tag = _pointed(ckpt_dir)
    if tag is None:
        return None
    path = ckpt_dir / tag
    if not (path / META).is_file():
        raise CheckpointError(f"{ckpt_dir / LATEST} names {tag}, but {path / META} is missing: the checkpoint "
                              "folder was damaged after it was written")
    return path


def resolve_resume(setting: str, run_ckpt_dir: Path, *, verify: bool = True,
                   warn: Callable[[str], None] = print) -> Path | None:
    """Turn `checkpoint.resume` into a checkpoint folder (or None = fresh start), verified against its
    manifest (`verify`: also the checksums, else presence and sizes only)."""
    if setting == "never":
        if read_latest(run_ckpt_dir) is not None:
            raise CheckpointError(
                f"checkpoint.resume=never, but {run_ckpt_dir} already holds checkpoints; refusing to "
                "overwrite them (use checkpoint.resume=auto, or another run dir)")
        return None
    if setting == "auto":
        return newest_complete(run_ckpt_dir, verify=verify, warn=warn)
    path = find(setting, key="checkpoint.resume", verify=verify, warn=warn)  # a run's: the newest that verifies
    if read_meta(path).get("format") == WEIGHTS:
        raise CheckpointError(f"checkpoint.resume={setting} is a weights-only folder (no optimizer state): "
                              "start from it with checkpoint.init_from instead")
    if (Path(setting) / META).is_file():  # one checkpoint named explicitly: verified, no fallback
        problem = check_folder(path, verify=verify)
        if problem == UNVERIFIED:
            warn(_unverified(path))
        elif problem:
            raise CheckpointError(f"checkpoint.resume={setting}: {problem}")
    return path


def _unverified(path: Path) -> str:
    return f"warning: {path} has no {MANIFEST} (written before manifests existed): loading it unverified"


UNVERIFIED = "unverified"  # check_folder's answer for a pre-manifest checkpoint


def check_folder(path: Path, *, verify: bool = True) -> str | None:
    """None if the checkpoint folder is complete and intact, UNVERIFIED for a complete-looking folder
    written before manifests existed, else the problem (naming the file)."""
    if not (path / META).is_file():
        return f"{path / META} is missing"
    manifest = path / MANIFEST
    if not manifest.is_file():
        try:
            fmt = read_meta(path).get("checkpoint_format", 1)
        except CheckpointError as e:
            return str(e)
        return (f"{manifest} is missing: the save of this checkpoint never finished" if fmt >= MANIFEST_FORMAT
                else UNVERIFIED)
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"cannot read {manifest}: {e!r}"
    for entry in files:
        f = path / entry["name"]
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != entry["size"]:
            return f"{f} has {size} bytes, the manifest says {entry['size']}"
        if verify and _crc32(f) != entry["crc32"]:
            return f"{f} is corrupted (crc32 differs from the manifest's)"
    return None


def newest_complete(ckpt_dir: Path, *, verify: bool = True, warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it verifies, else the newest older
    complete one that does (with a warning naming what failed). None if there are no checkpoints;
    CheckpointError (nothing deleted) if there are some but none verifies."""
    newest = _pointed(ckpt_dir)
    if newest is None:
        return None
    older = [p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    if newest.removeprefix("step_").isdigit():  # folders newer than `latest` are unfinished saves
        older = [t for t in older if _step_of(t) < _step_of(newest)]
    candidates = [newest] + sorted(older, key=_step_of, reverse=True)
    problems = []
    for tag in candidates:
        path = ckpt_dir / tag
        problem = check_folder(path, verify=verify)
        if problem == UNVERIFIED:
            warn(_unverified(path))
            return path
        if problem is None:
            if problems:
                warn(f"warning: falling back to the previous complete checkpoint {path}")
            return path
        problems.append(f"{tag}: {problem}")
        warn(f"warning: checkpoint {path} failed verification: {problem}")
    raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies (nothing was deleted):\n  " + "\n  ".join(problems))


def fallback_horizon(ckpt_dir: Path, resumed: Path | None) -> int:
    """When a run resumed from an older checkpoint of its own because `latest` failed verification:
    the failed one's step (pruning keeps the resumed one until the run saves past it), else 0."""
    pointed = _pointed(ckpt_dir)
    if (resumed is None or resumed.parent != ckpt_dir or not pointed or pointed == resumed.name
            or not pointed.removeprefix("step_").isdigit()):
        return 0
    return _step_of(pointed)


def find(setting: str | Path, key: str | None = None, *, verify: bool = False,
         warn: Callable[[str], None] = print) -> Path:
    """A checkpoint folder (a step_* or weights-only folder), a run's checkpoints folder or a run dir
    (its newest complete checkpoint that passes its manifest: `newest_complete`; `verify` adds the
    checksums to the size check) -> the checkpoint folder: what resume, init_from, generate, export
    take. `key`: the config key that named it, for the error."""
    path = Path(setting)
    for candidate in (path, path / "checkpoints"):
        if (candidate / META).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return newest_complete(candidate, verify=verify, warn=warn)
    raise CheckpointError(f"{f'{key}=' if key else ''}{setting}: no checkpoint there (expected a folder "
                          f"holding {META}, a run's checkpoints folder or a run dir)")


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {path / META}: {e}") from None


def check_compatible(meta: dict[str, Any], model_cfg: dict[str, Any], parallel_cfg: dict[str, Any],
                     path: Path) -> None:
    """Refuse a checkpoint of another architecture or shape, naming every differing field, and a
    layout change the checkpoint cannot make. `parallel_cfg`: the run's `parallel` settings and its
    `dp_size`. Under ZeRO >= 1 any TP x PP x DP size (and ZeRO stage 1-3) goes: the shards are re-cut
    through a universal checkpoint (pretrain/universal.py). A ZeRO-0 checkpoint keeps its TP and PP
    sizes (its optimizer state is cut by them, and the converter reads ZeRO shards only); it changes
    DP size without PP only (its state is whole in every file)."""
    check_model(meta, model_cfg, path)
    saved, run = saved_layout(meta), {"pipeline": 1, **parallel_cfg}
    layout = "parallel.tensor={tensor} x parallel.pipeline={pipeline} x {dp_size} data-parallel ranks, zero_stage={zero_stage}"
    where = (f"checkpoint {path} was written at {layout.format(**saved)}; this run uses {layout.format(**run)}")
    if (saved["zero_stage"] == 0) != (run["zero_stage"] == 0):
        raise CheckpointError(f"{where}: resuming between ZeRO-0 and a ZeRO stage >= 1 is not supported "
                              "(the optimizer state is saved in other files): resume at the saved zero_stage")
    if saved["zero_stage"] == 0 and (saved["tensor"] != run["tensor"] or saved["pipeline"] != run["pipeline"]
                                     or (saved["dp_size"] != run["dp_size"] and run["pipeline"] > 1)):
        raise CheckpointError(f"{where}: a ZeRO-0 checkpoint resumes only at the same tensor- and pipeline-"
                              "parallel sizes (and, under pipeline parallelism, data-parallel size); another "
                              "layout goes through a universal checkpoint, which needs parallel.zero_stage >= 1 "
                              "when the checkpoint is written")


def saved_layout(meta: dict[str, Any]) -> dict[str, Any]:
    """The layout a checkpoint was written at: its `parallel` settings (pipeline 1 before PP existed)
    and its data-parallel size."""
    return {"pipeline": 1, **meta["config"]["parallel"], "dp_size": meta["dp_size"]}


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
         extra_files: list[Path] = (), layout: dict[str, int] | None = None, protect: Path | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    Every rank writes its shards; once all report success rank 0 writes the manifest, then `latest`.
    A failed write on any rank (disk full) removes the folder and raises CheckpointError on every
    rank, `latest` still naming the previous checkpoint. `extra_files` (e.g. the tokenizer) are
    copied in by rank 0 so a checkpoint is self-contained; `layout` (tp, pp, dp, zero stage, world
    size) goes into the manifest; `protect`: a checkpoint folder pruning must keep (the one this run
    fell back to)."""
    from parallel.distributed import all_ranks_true, barrier

    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0 and path.exists() and _pointed(ckpt_dir) != tag:
        shutil.rmtree(path, ignore_errors=True)  # a stale unfinished save of this step: start clean
    barrier()
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"frugal": {**meta, "checkpoint_format": FORMAT}},
                               save_latest=False)
        torch.save(_rng_state(), path / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            for f in extra_files:
                shutil.copy2(f, path / Path(f).name)
            _write_atomic(path / META, json.dumps({**meta, "checkpoint_format": FORMAT}, indent=1, default=str))
        _test_hooks(path, step, rank)
    except OSError as e:
        error = e
        print(f"[rank {rank}] checkpoint write failed: {e}", flush=True)
    if not all_ranks_true(error is None):  # someone failed: `latest` keeps pointing at the previous one
        if rank == 0 and _pointed(ckpt_dir) != tag:
            shutil.rmtree(path, ignore_errors=True)
        barrier()
        where = f": {error}" if error is not None else " (see the other ranks' messages)"
        raise CheckpointError(f"saving checkpoint {path} failed on at least one rank{where}; the unfinished "
                              f"folder was removed and {ckpt_dir / LATEST} still names the previous checkpoint "
                              f"({_pointed(ckpt_dir)})")
    if rank == 0:
        try:
            _write_manifest(path, step, layout or {})
            _write_atomic(ckpt_dir / LATEST, tag)
        except OSError as e:
            error = e
    if not all_ranks_true(error is None):
        raise CheckpointError(f"writing the manifest of checkpoint {path} failed: {error}; "
                              f"{ckpt_dir / LATEST} still names {_pointed(ckpt_dir)}")
    if rank == 0:
        _prune(ckpt_dir, keep_last, current=tag, protect=protect.name if protect is not None else None)
    barrier()
    return path


def _pointed(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None."""
    try:
        return (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        return None


def _test_hooks(path: Path, step: int, rank: int) -> None:
    """Fault drills (tests/pretrain/test_fault_drills.py), inert unless their variable is set:
    FRUGAL_TEST_SLOW_SAVE=STEP:RANK: that rank, after writing its files of that step's checkpoint,
        writes its pid to <checkpoints>/test_slow_save.pid and sleeps (to be killed mid-save);
    FRUGAL_TEST_FAIL_SAVE=STEP: every rank's write of that step fails as on a full disk."""
    slow = os.environ.get("FRUGAL_TEST_SLOW_SAVE")
    if slow and slow == f"{step}:{rank}":
        (path.parent / "test_slow_save.pid").write_text(str(os.getpid()))
        time.sleep(300)
    if os.environ.get("FRUGAL_TEST_FAIL_SAVE") == str(step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / f"rng_rank{rank:05d}.pt"))


def _crc32(file: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(file, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _write_manifest(path: Path, step: int, layout: dict[str, int]) -> None:
    files = [{"name": f.name, "size": f.stat().st_size, "crc32": _crc32(f)}
             for f in sorted(path.iterdir()) if f.is_file() and f.name != MANIFEST and not f.name.endswith(".tmp")]
    _write_atomic(path / MANIFEST, json.dumps({"step": step, "layout": layout, "files": files}, indent=1))


def load(engine, path: Path, *, rank: int, universal: bool = False) -> dict[str, Any]:
    """Load shards + this rank's RNG state; returns the Frugal metadata. Collective when `universal`
    (the checkpoint was written at another data-parallel size under ZeRO >= 1): rank 0 converts it
    (to_universal, cached), the others wait, then every rank loads the universal folder."""
    from parallel.universal_layout import universal_loading
    from pretrain import universal as universal_ckpt

    load_dir, tag = path.parent, path.name
    if universal:
        load_dir, tag = universal_ckpt.convert_collectively(path, rank=rank)
    config = engine._config
    config.load_universal_checkpoint = universal  # read by load_checkpoint only: set for this load
    try:
        # universal loading calls torch.load itself
        with (safe_engine_loads(engine), safe_torch_load(),
              universal_loading() if universal else contextlib.nullcontext(),
              universal_ckpt.network_names(engine) if universal else contextlib.nullcontext()):
            load_path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        rng_file = path / f"rng_rank{rank:05d}.pt"
        rng = safe_load(rng_file) if rng_file.is_file() else None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to load a checkpoint file that holds more than data: {e}") from None
    finally:
        config.load_universal_checkpoint = False
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no loadable shards in {path}")
    if universal and engine.zero_optimization_stage() == 3:
        universal_ckpt.fix_zero3_groups(engine, path)
    if rng is not None:
        _set_rng_state(rng)
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

        try:
            with safe_torch_load():
                shards = [get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)]
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refusing to load a checkpoint file that holds more than data: {e}") from None
    elif config["parallel"].get("pipeline", 1) > 1 and meta.get("format") != WEIGHTS:
        shards = [_read_stages(path, r) for r in range(saved_tp)]  # the stages' layer files, merged
    else:
        # never unpickling code: DeepSpeed's per-rank module files hold tensors and plain data
        shards = [_read_module(path / model_file(r), saved_tp) for r in range(saved_tp)]
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


def _read_module(file: Path, saved_tp: int) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"missing {file} (the checkpoint was written at parallel.tensor={saved_tp}, "
                              "one module file per tensor-parallel rank)")
    try:
        return safe_load(file, map_location="cpu")["module"]
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read the module weights in {file}: {e!r}") from None


def _read_stages(path: Path, tp_rank: int) -> dict[str, Any]:
    """One TP rank's module state from a pipeline-parallel checkpoint: DeepSpeed writes each layer of
    the flat list on its own (`layer_XX-model_YY-model_states.pt`, keys of pretrain/pipeline.py's
    StageLayer: `layer.<name>`, `router.<name>`), named as the network's (pipeline.network_name). A tied
    head has no file (its weight is the embedding's, layer 00)."""
    from pretrain.pipeline import network_name

    files = sorted(path.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt"))
    if not files:
        raise CheckpointError(f"{path}: no layer files of tensor-parallel rank {tp_rank} (a pipeline-parallel "
                              "checkpoint holds layer_XX-model_YY-model_states.pt)")
    out = {}
    for f in files:
        idx = int(f.name.split("-")[0].removeprefix("layer_"))
        try:
            state = safe_load(f, map_location="cpu")
        except (OSError, EOFError, RuntimeError, TypeError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"cannot read the layer weights in {f}: {e!r}") from None
        out.update({network_name(f"{idx}.{k}"): v for k, v in state.items()})
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(ckpt_dir: Path, keep_last: int, current: str, protect: str | None = None) -> None:
    """Delete complete checkpoints older than the newest `keep_last` up to `current` (the one just
    written, also kept). Never touched: `current`, `protect` (the checkpoint a run fell back to),
    folders newer than `current` (left by an abandoned timeline; the save of their step replaces them)
    and unfinished folders (no manifest) of format 2."""
    tags = sorted((p.name for p in ckpt_dir.glob("step_*") if p.name.removeprefix("step_").isdigit()
                   and _step_of(p.name) <= _step_of(current) and check_folder(p, verify=False) in (None, UNVERIFIED)),
                  key=_step_of)
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        if tag not in (current, protect):
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
