"""The training loop: config -> data -> model -> DeepSpeed engine -> steps -> checkpoints/tracking.

Order of work, chosen so that bad input fails before anything expensive or destructive happens:
  1. validate the config against the world size, open the data, find the checkpoint to resume
     and check it belongs to this model (no process group yet, nothing written);
  2. process groups (torch.distributed + megatron-core parallel_state);
  3. model (same seed on every rank: TP-independent init), optimizer, DeepSpeed engine;
  4. load the checkpoint (weights, optimizer, LR schedule, data position, RNG, MLflow run id);
  5. the loop: micro-batches -> one optimizer step; validation and checkpoints on schedule.

SIGTERM / SIGUSR1 during the loop: the step finishes, every rank saves it, exit code 0
(pretrain/preemption.py).
"""
from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig, check_layout, decay_start, padded_vocab
from pretrain.data import PackedDataset, TrainLoader, val_batches
from pretrain.errors import ConfigError, FrugalError
from pretrain.preemption import StopSignals
from pretrain.universal import needs_universal

_TEST_STEP_DELAY = float(os.environ.get("FRUGAL_TEST_STEP_DELAY", "0"))  # seconds; set by fault-drill tests

# Dense bf16 peak of the GPUs we report MFU against (datasheet, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def resolve_model(cfg: RunConfig, data: PackedDataset) -> RunConfig:
    """Fill in what the data decides (vocab size) and check what must agree (sequence length)."""
    m = cfg.model
    if data.seq_len != m.seq_len:
        raise ConfigError(f"model.seq_len={m.seq_len} but the shards in {cfg.data.path} hold sequences of "
                          f"{data.seq_len} tokens; prepare the data with --seq-len {m.seq_len}")
    if m.vocab_size is None:
        return cfg.model_copy(update={"model": m.model_copy(update={"vocab_size": padded_vocab(
            data.vocab_size, m.vocab_multiple)})})
    if m.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"{data.vocab_size} tokens")
    return cfg


def flops_per_token(cfg) -> float:
    """Training FLOPs per token of the input sequence, forward + backward:

        Σ_blocks block.train_flops(r)  +  6 · d · V

    Each block type states its own cost per input token (a LLaMA block: r · (6 · N_block +
    12 · d · r · s), N_block its matmul parameters, 12·d·s attention scores and values over s
    tokens); 6·d·V: the LM head; r: the fraction of tokens a block sees (1, or the product of the
    keep ratios of the SUBLLM levels around it: it runs on r·s tokens, each attending to r·s).
    """
    from pretrain.models.structure import BLOCKS, parse_structure

    m = cfg.model
    total, ratios = 0.0, []
    for item in parse_structure(m.structure):
        if item.kind == "open":
            ratios.append(m.subsample.ratio(item.index))
        elif item.kind == "close":
            ratios.pop()
        else:
            total += BLOCKS[item.char].train_flops(m, math.prod(ratios), item.index)
    return total + 6 * m.d_model * m.vocab_size


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Trainer:
    SHOWN = ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "mem_gib", "val_loss")  # on the console
    def __init__(self, cfg: RunConfig):
        from parallel.distributed import rank_from_env, world_size_from_env

        # 1. everything that can be checked without process groups
        self.dp_size = check_layout(cfg, world_size_from_env())
        self.data = PackedDataset(cfg.data.path, "train")
        self.val = PackedDataset(cfg.data.path, "val")
        self.cfg = cfg = resolve_model(cfg, self.data)
        self.run_dir = Path(cfg.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        rank0 = rank_from_env() == 0  # (no process group yet)
        self.resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, self.ckpt_dir, verify=cfg.checkpoint.verify,
                                               warn=lambda msg: rank0 and print(msg, flush=True))
        # a checkpoint we fell back to (the newest failed verification) is kept until the run saves past
        # the failed one's step
        self.fallback_horizon = ckpt.fallback_horizon(self.ckpt_dir, self.resume_from)
        if self.resume_from is not None:
            ckpt.check_compatible(ckpt.read_meta(self.resume_from), cfg.model.model_dump(mode="json"),
                                  self._parallel(), self.resume_from)
        self.init_from = None  # weights to start from (elastic continued training starts from elastify's output)
        if cfg.checkpoint.init_from:
            self.init_from = ckpt.find(cfg.checkpoint.init_from, key="checkpoint.init_from")
            # the router's settings (model.elastic) may differ: its weights are new when the source has none
            ckpt.check_model(ckpt.read_meta(self.init_from), cfg.model.model_dump(mode="json"), self.init_from,
                             ignore=("elastic",))
        self.grad_accum = cfg.training.global_batch_size // (cfg.training.micro_batch_size * self.dp_size)

        # 2. process groups
        from parallel.distributed import init_distributed

        self.layout = init_distributed(cfg.parallel.tensor, pipeline_parallel=cfg.parallel.pipeline)
        self.device = self.layout.device
        self.bf16 = cfg.training.dtype == "bf16" or (cfg.training.dtype == "auto" and torch.cuda.is_available())

        # 3. model + engine. Same seed everywhere: megatron-core's CPU init then gives one logical
        # model whatever the TP size (each rank keeps its slice of the same master weights).
        from parallel import zero
        from pretrain.models import build_network
        from pretrain.models.network import count_parameters
        from pretrain.optim import build_optimizer, build_scheduler

        torch.manual_seed(cfg.training.seed)
        model = build_network(cfg.model)
        if self.init_from is not None:  # before the engine: DeepSpeed/ZeRO take the model as it is then
            ckpt.load_weights(self.init_from, model)
        model = model.to(self.device)
        if cfg.training.compile and self.device.type == "cuda":
            from pretrain.models.fused import compile_blocks

            compile_blocks(model)
        model.set_grad_accum(self.grad_accum)
        self.params = count_parameters(model, cfg.model)
        self.elastic = None  # Flextron's elastic continued training (pretrain/elastic_training.py)
        if cfg.training.elastic.enabled:
            from pretrain.elastic_training import ElasticTraining

            teacher = None
            if cfg.training.elastic.distill_weight > 0:  # the frozen starting model, full width: the
                teacher = build_network(cfg.model)     # init_from weights `model` holds until a resume loads
                teacher.load_state_dict(model.state_dict())
                teacher = teacher.to(self.device, torch.bfloat16 if self.bf16 else torch.float32)
            self.elastic = ElasticTraining(cfg, model, dp_rank=self.layout.dp_rank, teacher=teacher)
        self.model = model  # the Network (under PP every rank builds it whole, then runs its stage)
        if self.layout.pp_size > 1:  # DeepSpeed's pipeline engine over the flat layer list
            from pretrain.pipeline import build_pipeline

            teacher, objective = (self.elastic.teacher, self.elastic.pipelined) if self.elastic else (None, None)
            model = build_pipeline(model, cfg, teacher=teacher, objective=objective)
        optimizer = build_optimizer(model, cfg.optimizer, fused=self.device.type == "cuda")
        scheduler = build_scheduler(optimizer, cfg)
        ds_config = zero.engine_config(micro_batch=cfg.training.micro_batch_size, grad_accum=self.grad_accum,
                                       zero_stage=cfg.parallel.zero_stage, bf16=self.bf16,
                                       grad_clip=cfg.training.grad_clip, pipeline=self.layout.pp_size > 1)
        self.engine = zero.initialize(model, optimizer, scheduler, ds_config)
        self.loader = TrainLoader(self.data, dp_rank=self.layout.dp_rank, dp_size=self.dp_size,
                                  micro_batch=cfg.training.micro_batch_size, num_workers=cfg.data.workers,
                                  seed=cfg.training.seed)
        self._dp_group = self._megatron_dp_group()
        self.step = 0
        self.skipped_steps = 0
        self.stop_signals = StopSignals(self.layout.rank)  # SIGTERM/SIGUSR1 this rank received
        self.stop_agreed = False  # some rank received one: stop after this step
        run_id = None  # the MLflow run a resumed job appends to
        if self.resume_from is not None:
            # written at another TP, PP or DP size (or ZeRO stage) under ZeRO >= 1: through a universal checkpoint
            universal = needs_universal(ckpt.read_meta(self.resume_from), self._parallel())
            meta = ckpt.load(self.engine, self.resume_from, rank=self.layout.rank, universal=universal)
            self.step = meta["step"]
            self.skipped_steps = meta.get("skipped_steps", 0)
            self.loader.load_state_dict(meta["data"])
            run_id = meta.get("mlflow_run_id")
        self.batches = iter(self.loader)  # micro-batches [mb, seq_len + 1]; tests may substitute their own

        from pretrain.progress import Progress
        from pretrain.tracking import Tracker

        self.tracker = Tracker(self.run_dir, tracking_uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                               run_name=cfg.name, enabled=cfg.tracking.enabled, is_rank0=self.layout.is_rank0,
                               resume_run_id=run_id, parent_run_id=cfg.tracking.parent_run_id,
                               tags=cfg.tracking.tags)
        self.progress = Progress(cfg.training.steps, self.step, enabled=self.layout.is_rank0,
                                 log_every=cfg.training.log_every)
        self.eval_enabled = bool(cfg.training.eval_every) and self.val.num_samples >= self.dp_size
        if cfg.schedule.decay_points and self.val.num_samples < self.dp_size:
            raise ConfigError(f"schedule.decay_points needs validation, but the val split of {cfg.data.path} "
                              f"holds {self.val.num_samples} sequences for {self.dp_size} data-parallel ranks")
        # WSD decay branches, start step -> end step (a resumed run skips those already started)
        starts = {decay_start(p, cfg.schedule.decay_fraction): p for p in cfg.schedule.decay_points}
        self.decay_branches = {start: end for start, end in starts.items() if start >= self.step}
        self.tokens_per_step = cfg.training.global_batch_size * cfg.model.seq_len
        self.flops_per_token = flops_per_token(cfg)
        self.peak_flops = _peak_flops()
        if self.layout.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            if self.resume_from is None:
                from pretrain.tracking import flatten

                self.tracker.log_params({**flatten(cfg.model_dump(mode="json")), **self.params,
                                         "flops_per_token": self.flops_per_token,
                                         "tokens_per_step": self.tokens_per_step,
                                         "layout.world_size": self.layout.world_size, "layout.dp": self.dp_size,
                                         "layout.tp": self.layout.tp_size, "layout.grad_accum": self.grad_accum})
                self.tracker.log_text(cfg.to_yaml(), "config.yaml")
            if cfg.training.eval_every and not self.eval_enabled:
                self.progress.log(f"warning: the val split of {cfg.data.path} holds {self.val.num_samples} "
                                  f"sequences, fewer than the {self.dp_size} data-parallel ranks; validation is off")
            where = f"resumed from {self.resume_from} at step {self.step}" if self.resume_from else "fresh start"
            self.progress.log(
                f"frugal: {self.params['params_total'] / 1e6:.2f}M params ({self.params['params_non_embedding'] / 1e6:.2f}M "
                f"non-embedding) | world {self.layout.world_size} = tp {self.layout.tp_size} x dp {self.dp_size}"
                f"{f' x pp {self.layout.pp_size}' if self.layout.pp_size > 1 else ''} | "
                f"zero {cfg.parallel.zero_stage} | {'bf16' if self.bf16 else 'fp32'} on {self.device} | "
                f"grad accum {self.grad_accum} | {where}")

    def _parallel(self) -> dict[str, Any]:
        """This run's layout, as a checkpoint's metadata records it."""
        return {**self.cfg.parallel.model_dump(), "dp_size": self.dp_size}

    @staticmethod
    def _megatron_dp_group():
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    # ------------------------------------------------------------------ one optimizer step

    def _micro_batches(self):
        for _ in range(self.grad_accum):
            batch = next(self.batches).to(self.device, non_blocking=True)
            yield batch[:, :-1], batch[:, 1:]

    def _losses(self) -> torch.Tensor:
        """Forward and backward of this step's micro-batches; their losses."""
        losses = []
        if self.elastic is not None:
            self.elastic.stats = {}  # what a skipped step noted is not this step's
        for micro, (inputs, targets) in enumerate(self._micro_batches()):
            if self.elastic is not None:  # a budget, the router's sub-network, distillation
                loss = self.elastic.loss(self.engine, inputs, targets, self.step, micro)
            else:
                loss = self.engine(inputs, targets)
            self.engine.backward(loss)  # a non-finite loss poisons the gradients: train_step drops the step
            losses.append(loss.detach())
        return torch.stack(losses)

    def _pipelined_losses(self) -> torch.Tensor:
        """Under PP, DeepSpeed's schedule runs every micro-batch's forward and backward AND the update."""
        from pretrain.pipeline import train_batch

        sample = None
        if self.elastic is not None:  # each micro-batch's budget, drawn on the first and last stage alike
            self.elastic.stats = {}
            sample = lambda micro, rows: self.elastic.sample(self.step, micro, rows, self.model)  # noqa: E731
        return train_batch(self.engine, self.batches, self.grad_accum, sample)

    def _elastic_metrics(self) -> dict[str, float]:
        """Flextron's step metrics; under PP they are noted by the objective on the last stage and
        logged by rank 0 on the first."""
        metrics = self.elastic.step_metrics()
        if self.layout.pp_size > 1:
            from megatron.core import parallel_state as ps

            box = [metrics]
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            metrics = box[0]
        return metrics

    def train_step(self) -> dict[str, float]:
        """Forward/backward over grad_accum micro-batches, then one optimizer update.

        A non-finite loss on any rank skips the whole step: weights and optimizer state stay
        untouched, the step's data counts as consumed, the step is counted, and too many in a row
        abort the run. Deciding once per step costs one host sync per step (the loss is read for
        logging anyway)."""
        from parallel import zero

        engine = self.engine
        pipelined = self.layout.pp_size > 1
        local = self._pipelined_losses() if pipelined else self._losses()
        # Over the whole world: TP ranks hold replicas of their replica's loss, so sum / world is the
        # mean over data-parallel replicas, and every rank takes the same decision.
        # The third entry: did any rank receive a stop signal (the same decision everywhere, no extra sync).
        stop = torch.tensor(float(self.stop_signals.received is not None), dtype=local.dtype, device=local.device)
        stats = torch.stack([local.mean(), (~torch.isfinite(local)).sum().to(local.dtype), stop])
        dist.all_reduce(stats)
        total, bad, stop = stats.tolist()  # one device-to-host transfer
        loss, self.stop_agreed = total / self.layout.world_size, stop > 0
        if bad and pipelined:
            # the schedule ended with the optimizer step: ZeRO-1's overflow check (the non-finite
            # gradient norm every rank computes alike) has skipped it, stage 0's plain optimizer not
            if engine.was_step_applied():
                raise FrugalError(
                    f"non-finite loss at step {self.step + 1}: DeepSpeed's pipeline engine has applied that update "
                    "(at parallel.zero_stage=0 it cannot skip it; stage 1 does); resume from the last checkpoint")
            engine.lr_scheduler.step()  # the schedule follows the step counter, applied or not
            return {"skipped": 1.0}
        if bad:
            zero.skip_step(engine)
            engine.lr_scheduler.step()  # the schedule follows the step counter, applied or not
            return {"skipped": 1.0}
        if not pipelined:
            engine.step()
        out = {"loss": loss, "lr": engine.lr_scheduler.get_last_lr()[0]}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def validation_metrics(self) -> dict[str, float]:
        """val_loss; for SUBLLM also the inference rule's loss (keep iff score > 0) and the gap."""
        out = {"val_loss": self.evaluate()}
        if self.elastic is not None and self.cfg.training.elastic.eval_budgets:  # every budget's sub-network
            for b in self.elastic.budgets:
                out[f"val_loss_budget_{b:g}"] = self.evaluate(budget=b)
        if "(" in self.cfg.model.structure:  # (not self.model.subsampled: under PP a stage may hold no level)
            out["val_loss_threshold"] = self.evaluate(threshold=True)
            out["val_loss_threshold_gap"] = out["val_loss_threshold"] - out["val_loss"]
        return out

    @torch.no_grad()
    def evaluate(self, threshold: bool = False, budget: float | None = None) -> float | None:
        """Mean validation loss over the first val sequences (the same ones every time); `budget`: of
        the sub-network an elastic model's router picks for it (no sampling)."""
        self.engine.eval()
        total = torch.zeros(2, device=self.device)  # (sum of per-sequence mean losses, sequences)
        batches = val_batches(self.val, dp_rank=self.layout.dp_rank, dp_size=self.dp_size,
                              micro_batch=self.cfg.training.micro_batch_size, max_batches=self.cfg.training.eval_batches)
        if self.layout.pp_size > 1:
            from pretrain.pipeline import eval_sum

            state_of = (lambda rows: self.model.elastic_state(rows, budget)) if budget is not None else None  # noqa: E731
            total += eval_sum(self.engine, batches, self.cfg.training.micro_batch_size, state_of,
                              threshold).to(self.device)
            batches = ()
        for batch in batches:
            batch = batch.to(self.device)
            n = batch.shape[0]
            elastic = self.model.elastic_state(n, budget) if budget is not None else None
            loss = self.engine(batch[:, :-1], batch[:, 1:], threshold=threshold, elastic=elastic)
            total += torch.stack([loss.float() * n,
                                  torch.tensor(float(n), device=self.device)])
        dist.all_reduce(total, group=self._dp_group)
        self.engine.train()
        return (total[0] / total[1]).item() if total[1] > 0 else None

    def save(self) -> Path:
        meta = {"step": self.step, "skipped_steps": self.skipped_steps, "data": self.loader.state_dict(),
                "mlflow_run_id": self.tracker.run_id, "dp_size": self.dp_size,
                "samples_consumed": self.loader.samples_consumed_total,
                "config": self.cfg.model_dump(mode="json")}
        layout = {"tp": self.layout.tp_size, "pp": self.layout.pp_size, "dp": self.dp_size, "zero_stage": self.cfg.parallel.zero_stage,
                  "world_size": self.layout.world_size}
        protect = self.resume_from if self.step <= self.fallback_horizon else None
        return ckpt.save(self.engine, self.ckpt_dir, self.step, meta, rank=self.layout.rank,
                         keep_last=self.cfg.checkpoint.keep_last, extra_files=[self.data.tokenizer_path],
                         layout=layout, protect=protect)

    def decay_branch(self, end: int) -> dict[str, float]:
        """WSD with several decay points: from this stable-phase step, train a copy whose LR decays
        to min_lr at step `end`, evaluate it, then restore the stable state and return its metrics.

        The branch starts from a checkpoint saved here (also a resume point: a job killed inside
        the branch resumes here and runs it again). Its steps are not logged; its result is, at
        step `end`: val_loss_decayed (D of that point = end x tokens per step)."""
        from pretrain.optim import set_schedule_end

        start, scheduler = self.step, self.engine.lr_scheduler
        latest = ckpt.read_latest(self.ckpt_dir)
        path = latest if latest is not None and latest.name == ckpt.tag_for(start) else self.save()
        set_schedule_end(scheduler, self.cfg, end)
        self.progress.log(f"step {start}: decay branch to step {end} ({end - start} steps)")
        while self.step < end:
            self.model.set_step(self.step)
            if "skipped" in self.train_step():
                self.skipped_steps += 1
            self.step += 1
        out = {"val_loss_decayed": self.evaluate()}
        self.tracker.log_metrics(out, step=end)
        self.progress.log(f"step {end}: decayed val_loss {out['val_loss_decayed']:.4f}; back to step {start}")
        meta = ckpt.load(self.engine, path, rank=self.layout.rank)
        set_schedule_end(scheduler, self.cfg, self.cfg.training.steps)  # load keeps the lambdas: reset them
        self.step, self.skipped_steps = meta["step"], meta.get("skipped_steps", 0)
        self.loader.load_state_dict(meta["data"])
        self.batches = iter(self.loader)
        return out

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.training
        tokens_per_step = self.tokens_per_step
        bad_in_row = 0
        history: list[dict[str, float]] = []
        status = "FAILED"
        self.stop_signals.install()
        try:
            while self.step < t.steps:
                if self.step in self.decay_branches:
                    end = self.decay_branches.pop(self.step)
                    history.append({"step": end, **self.decay_branch(end)})
                t0 = time.perf_counter()
                self.model.set_step(self.step)  # step-scheduled layers (SUBLLM's bypass floor)
                metrics = self.train_step()
                self.step += 1
                if "skipped" in metrics:
                    self.skipped_steps += 1
                    bad_in_row += 1
                    self.progress.log(f"step {self.step}: non-finite loss, step skipped "
                                      f"({bad_in_row} in a row, {self.skipped_steps} in total)")
                    if bad_in_row >= t.max_bad_steps:
                        raise FrugalError(
                            f"training diverged: {bad_in_row} consecutive steps with a non-finite loss "
                            f"(training.max_bad_steps={t.max_bad_steps}); last good checkpoint: "
                            f"{ckpt.read_latest(self.ckpt_dir)}. Lower optimizer.lr or check the data.")
                    self.tracker.log_metrics({"skipped_steps": self.skipped_steps}, step=self.step)
                    if self.stop_agreed and self.step < t.steps:
                        self.save()
                        break
                    continue
                bad_in_row = 0
                if _TEST_STEP_DELAY:  # fault drills only (tests/pretrain/test_fault_drills.py): a slow step
                    time.sleep(_TEST_STEP_DELAY)
                dt = time.perf_counter() - t0
                metrics["tokens_per_sec"] = tokens_per_step / dt
                metrics["step_time_s"] = dt
                metrics["mem_gib"] = _memory_gib()
                metrics["skipped_steps"] = self.skipped_steps
                metrics["samples_consumed"] = self.loader.samples_consumed_total
                metrics["tokens"] = self.step * tokens_per_step  # an x-axis for the MLflow charts
                if self.elastic is not None:
                    metrics.update(self._elastic_metrics())
                diag = self.model.diagnostics()
                if diag:  # one device-to-host transfer for all of them
                    metrics.update(zip(diag, torch.stack(list(diag.values())).tolist()))
                if self.peak_flops:
                    metrics["mfu"] = metrics["tokens_per_sec"] * self.flops_per_token / (
                        self.peak_flops * self.layout.world_size)
                last = self.step == t.steps
                if (self.eval_enabled and (self.step % t.eval_every == 0 or last)) or (last and cfg.schedule.decay_points):
                    metrics.update(self.validation_metrics())
                    if last and cfg.schedule.kind != "constant":  # the end of the run's own decay
                        metrics["val_loss_decayed"] = metrics["val_loss"]
                history.append({"step": self.step, **metrics})
                self.tracker.log_metrics(metrics, step=self.step)
                self.progress.update(self.step, {k: v for k, v in metrics.items() if k in self.SHOWN})
                every = cfg.checkpoint.every
                if self.step == t.steps or (every and self.step % every == 0) or self.stop_agreed:
                    self.save()
                if self.stop_agreed and self.step < t.steps:
                    break
            if self.stop_agreed and self.step < t.steps:
                status = "KILLED"
                self.progress.log(f"step {self.step}: stop signal received; checkpoint "
                                  f"{ckpt.tag_for(self.step)} saved, exiting with code 0 "
                                  "(resume with checkpoint.resume=auto)")
                return {"history": history, "run_id": self.tracker.run_id, "stopped": True,
                        "checkpoint": ckpt.read_latest(self.ckpt_dir), "ui": self.tracker.ui_command()}
            if self.elastic is not None and self.layout.is_rank0:  # the sub-network each budget names now
                import json

                self.tracker.log_text(json.dumps(self.elastic.choices(self.model), indent=1),
                                      "elastic_choices.json")
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.stop_signals.restore()
            self.progress.close()
            self.tracker.close(status)
        return {"history": history, "run_id": self.tracker.run_id, "checkpoint": ckpt.read_latest(self.ckpt_dir),
                "ui": self.tracker.ui_command()}


def train(cfg: RunConfig) -> dict[str, Any]:
    from parallel.distributed import destroy_distributed

    result = Trainer(cfg).fit()
    # process groups torn down before the interpreter exits: left to its shutdown, a gloo thread can
    # abort the process ("terminate called without an active exception") after a finished run
    destroy_distributed()
    return result
