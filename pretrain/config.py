"""Run configuration: pydantic models, YAML files and dotted command-line overrides.

A run is described by one YAML file (launch/configs/*.yaml) plus `dotted.key=value` overrides.
Every section forbids unknown keys, so a typo is an error that names the field instead of a
silently ignored setting. The fully resolved config is saved with every checkpoint and to MLflow.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError, field_validator, model_validator

from pretrain.arch_config import ElasticConfig, ElasticTrainingConfig, Section, SubsampleConfig
from pretrain.errors import ConfigError



class ModelConfig(Section):
    arch: Literal["llama", "subllm", "hgrnbit"] = "llama"  # model family; a checkpoint only loads into the same family
    # One character per block, over the block registry (pretrain/models/structure.py): "TTTT" is
    # four LLaMA blocks, "HHHH" four HGRN-Bit blocks (MLGRU + GLU); "(" / ")" open and close a
    # subsampled level (SUBLLM).
    structure: str = "TTTT"
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # GQA query groups; None = n_heads (plain multi-head attention)
    ffn_hidden: int = 688  # SwiGLU inner width
    vocab_size: int | None = None  # None = the tokenizer's vocab rounded up to vocab_multiple
    vocab_multiple: int = 128  # embedding rows are padded to a multiple of this (TP-independent)
    seq_len: int = 256  # training context; must equal the data shards' sequence length
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    linear: Literal["dense", "ternary"] = "dense"  # linear-layer implementation picked by the layer spec
    # ternary (BitLinear, docs/matmulfree.md): the LM head is ternary too (the reference) unless this is off
    quantize_head: bool = True
    bitlinear_eps: float = 1e-8  # eps of each BitLinear's input RMSNorm (the reference's value)
    bitlinear_fused: bool = True  # fused kernels, int8 codes saved; false = the unfused reference graph
    init_std: float = 0.02  # output projections use init_std / sqrt(2 * n_blocks)
    # training speed (docs/benchmarks.md); none changes the math beyond rounding:
    # RMSNorm, RoPE and silu(gate)*up each one compiled kernel when training on a GPU (models/fused.py)
    fused_kernels: bool = False
    # SDPA kernel in training on a GPU: PyTorch's choice, FlashAttention-2, or cuDNN's fused attention
    attention_backend: Literal["auto", "flash", "cudnn"] = "auto"
    # loss from vocab-sharded logits: megatron's (an fp32 copy of the logits, fp32 softmax saved) or
    # token-chunked (fp32 only per chunk; the bf16 logits and one fp32 per token saved)
    cross_entropy: Literal["megatron", "chunked"] = "megatron"
    subsample: SubsampleConfig = SubsampleConfig()
    elastic: ElasticConfig = ElasticConfig()
    # per-block widths of a sub-network exported from an elastic model (`python -m pretrain export
    # --budget`): SwiGLU widths and query groups (KV heads); None = ffn_hidden / n_kv_heads everywhere
    ffn_hidden_layers: list[int] | None = None
    kv_heads_layers: list[int] | None = None

    @property
    def n_blocks(self) -> int:
        return sum(1 for c in self.structure if c not in "()")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def block_ffn(self, layer: int) -> int:
        return self.ffn_hidden_layers[layer] if self.ffn_hidden_layers else self.ffn_hidden

    def block_kv_heads(self, layer: int) -> int:
        return self.kv_heads_layers[layer] if self.kv_heads_layers else self.kv_heads

    def block_heads(self, layer: int) -> int:
        """Query heads of block `layer`: its query groups x the heads per group."""
        return self.block_kv_heads(layer) * (self.n_heads // self.kv_heads)

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_heads={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        for name in ("d_model", "n_heads", "ffn_hidden", "seq_len", "vocab_multiple"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        from pretrain.models.structure import count_levels, parse_structure

        try:
            parse_structure(self.structure)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("model.structure: ")) from None
        levels = count_levels(self.structure)
        if self.subsample.keep_ratios is not None and len(self.subsample.keep_ratios) != levels:
            raise ValueError(f"subsample.keep_ratios has {len(self.subsample.keep_ratios)} entries, the "
                             f"structure has {levels} levels")
        if self.linear == "ternary" and self.quantize_head and self.tie_embeddings:
            raise ValueError("a ternary head cannot be tied to the embedding: set tie_embeddings=false or "
                             "quantize_head=false")
        if ("H" in self.structure) != (self.arch == "hgrnbit"):
            raise ValueError("arch: hgrnbit goes with HGRN-Bit blocks 'H' in the structure, and only with them")
        if levels and self.arch != "subllm":
            raise ValueError("a structure with subsampled levels '(...)' needs arch: subllm")
        for name, full in (("ffn_hidden_layers", self.ffn_hidden), ("kv_heads_layers", self.kv_heads)):
            widths = getattr(self, name)
            if widths is not None and (len(widths) != self.n_blocks or any(not 0 < w <= full for w in widths)):
                raise ValueError(f"{name} needs one width within [1, {full}] per block ({self.n_blocks}), got {widths}")
        e = self.elastic
        if e.enabled:
            if self.linear != "dense" or set(self.structure) - set("T()"):
                raise ValueError("elastic widths need LLaMA blocks 'T' with dense linears")
            if self.ffn_hidden_layers or self.kv_heads_layers:
                raise ValueError("an elastic model has uniform full widths (ffn_hidden_layers / kv_heads_layers "
                                 "describe an exported sub-network)")
            if e.router_after > self.n_blocks:
                raise ValueError(f"elastic.router_after={e.router_after} is past the {self.n_blocks} blocks")
            for name, widths in (("ffn_fractions", e.ffn_widths(self.ffn_hidden)),
                                 ("head_fractions", e.head_groups(self.kv_heads))):
                if len(set(widths)) != len(widths):
                    raise ValueError(f"elastic.{name} round to repeated widths {widths}")
        return self


class ParallelConfig(Section):
    tensor: int = 1  # tensor-parallel size (megatron-core TP linears)
    pipeline: int = 1  # pipeline-parallel stages (DeepSpeed's pipeline engine; ZeRO 0/1 only)
    # how the layer list is cut into stages: balance the estimated FLOPs (a block inside SUBLLM levels
    # costs less), the layer count, or the parameter count
    pipeline_partition: Literal["cost", "uniform", "parameters"] = "cost"
    zero_stage: Literal[0, 1, 2, 3] = 1  # DeepSpeed ZeRO stage over the data-parallel group

    @field_validator("tensor", "pipeline")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v


class DataConfig(Section):
    path: str = "data/stdlib"  # a folder written by `python -m pretrain prepare-data`
    workers: int = 1  # DataLoader worker processes per rank (0 = read in the main process)


class TrainingConfig(Section):
    steps: int = 300
    micro_batch_size: int = 8  # sequences per rank per micro-step
    global_batch_size: int = 8  # sequences per optimizer step, all data-parallel ranks together
    seed: int = 1234
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100  # steps between validation passes (0 = never)
    eval_batches: int = 4  # micro-batches per rank in one validation pass
    log_every: int = 10  # steps between printed log lines
    max_bad_steps: int = 5  # abort after this many consecutive non-finite losses
    # torch.compile each block (GPU only; the linears stay megatron-core's TP layers, DeepSpeed wraps
    # the model as usual). Costs ~1 min of compilation at the start; docs/benchmarks.md measures it.
    compile: bool = False
    elastic: ElasticTrainingConfig = ElasticTrainingConfig()

    @model_validator(mode="after")
    def _batch(self) -> "TrainingConfig":
        if self.steps < 1 or self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("steps, micro_batch_size and global_batch_size must be >= 1")
        return self


class OptimizerConfig(Section):
    lr: float = 1e-3
    min_lr: float = 1e-4  # floor reached at the end of the cosine / WSD decay
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms, not embeddings)


class ScheduleConfig(Section):
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    # WSD (warmup-stable-decay): the last `decay_fraction` of the steps decay linearly to min_lr.
    decay_fraction: float = 0.2
    # WSD only: extra decay ends (optimizer steps < training.steps). At decay_point - decay_fraction x
    # decay_point the run branches: a copy decays to min_lr at the point, is evaluated
    # (val_loss_decayed), and is dropped; the run goes on from its stable state. One run, several
    # token counts D for a scaling-law fit (docs/scaling.md).
    decay_points: list[int] = []

    @field_validator("decay_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be within [0, 1]")
        return v


def decay_start(end: int, decay_fraction: float) -> int:
    """First step of a WSD decay that ends at `end` (the same rule as the LR schedule's)."""
    return end - int(round(decay_fraction * end))


class CheckpointConfig(Section):
    every: int = 100  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # older checkpoints are deleted once a newer one is complete
    # auto: continue from the latest complete checkpoint in the run folder if there is one;
    # never: start fresh (refused if the run folder already holds checkpoints);
    # any other string: a checkpoint folder (a step_* folder or a run's checkpoints folder).
    resume: str = "auto"
    # start a fresh run from these weights (a checkpoint folder, any tensor-parallel size): no optimizer
    # state, step 0. Elastic continued training starts from an `elastify` output this way.
    init_from: str | None = None
    # check a checkpoint against its manifest's crc32 checksums before resuming from it (every rank
    # reads every file of it once: about a second per GB; false = only presence and sizes)
    verify: bool = True


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None  # None = sqlite:///<run dir>/mlflow.db (embedded, no server needed)
    experiment: str = "frugal"
    parent_run_id: str | None = None  # nest this run under another (a scaling study's parent run)
    tags: dict[str, str] = {}  # extra MLflow tags (a study's architecture, size, seed)


class RunConfig(Section):
    name: str = "tiny-llama"
    dir: str = "runs/tiny-llama"  # checkpoints, metrics.jsonl, mlflow.db, resolved config
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _decay_points(self) -> "RunConfig":
        s, steps = self.schedule, self.training.steps
        if not s.decay_points:
            return self
        if s.kind != "wsd":
            raise ValueError(f"schedule.decay_points needs schedule.kind=wsd (it is {s.kind!r})")
        if len(set(s.decay_points)) != len(s.decay_points):
            raise ValueError(f"schedule.decay_points {s.decay_points} repeats a step")
        for point in s.decay_points:
            if not 0 < point < steps:
                raise ValueError(f"schedule.decay_points: {point} is not within (0, training.steps={steps})")
            if decay_start(point, s.decay_fraction) < s.warmup_steps:
                raise ValueError(f"schedule.decay_points: the decay ending at {point} would start at step "
                                 f"{decay_start(point, s.decay_fraction)}, inside the {s.warmup_steps} warm-up steps")
        return self

    @model_validator(mode="after")
    def _elastic(self) -> "RunConfig":
        e = self.training.elastic
        if e.enabled and not self.model.elastic.enabled:
            raise ValueError("training.elastic.enabled needs model.elastic.enabled (an elastified model)")
        if e.enabled and e.distill_weight > 0 and not self.checkpoint.init_from:
            raise ValueError("training.elastic.distill_weight > 0 distils from the starting model: set "
                             "checkpoint.init_from (or distill_weight=0)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {where}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> nested dict; values are parsed as YAML scalars (1 -> int, true -> bool)."""
    flat: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            flat[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    return nest(flat)


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1, 'c': 2} -> {'a': {'b': 1}, 'c': 2}."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}={value!r}: {p} is not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping (a run config, a scaling study), or a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = read_yaml_mapping(path) if path is not None else {}
    return config_from_dict(_merge(data, parse_overrides(list(overrides))))


# --------------------------------------------------------------------------- layout checks


def check_layout(cfg: RunConfig, world_size: int) -> int:
    """Validate the parallel layout against the world size before any process group exists.

    Returns the data-parallel size.
    """
    p, m, t = cfg.parallel, cfg.model, cfg.training
    if p.pipeline > 1:
        if p.zero_stage > 1:
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pipeline={p.pipeline}: DeepSpeed's "
                              "pipeline engine supports ZeRO stages 0 and 1 only")
        from pretrain.models.structure import parse_structure

        n_blocks = sum(item.kind == "block" for item in parse_structure(m.structure))
        if p.pipeline > n_blocks:
            raise ConfigError(f"parallel.pipeline={p.pipeline} stages for the {n_blocks} blocks of "
                              f"model.structure={m.structure!r}: every stage needs at least one block")
    if world_size % (p.tensor * p.pipeline):
        raise ConfigError(
            f"parallel.tensor={p.tensor} x parallel.pipeline={p.pipeline} does not divide the "
            f"world size {world_size}"
        )
    if m.n_heads % p.tensor:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by parallel.tensor={p.tensor}")
    if m.kv_heads % p.tensor:
        raise ConfigError(
            f"model.n_kv_heads={m.kv_heads} is not divisible by parallel.tensor={p.tensor}"
        )
    if m.arch == "hgrnbit" and m.d_model % p.tensor:
        raise ConfigError(f"model.d_model={m.d_model} (MLGRU channels) is not divisible by parallel.tensor={p.tensor}")
    if m.ffn_hidden % p.tensor:
        raise ConfigError(f"model.ffn_hidden={m.ffn_hidden} is not divisible by parallel.tensor={p.tensor}")
    check_widths(m, p.tensor)
    dp = world_size // (p.tensor * p.pipeline)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
        )
    if m.vocab_size is not None and m.vocab_size % p.tensor:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tensor={p.tensor}")
    return dp


def check_widths(m: ModelConfig, tp: int) -> None:
    """Every elastic or per-block width splits evenly over `tp` ranks (each rank slices its share)."""
    widths = {"model.ffn_hidden_layers": m.ffn_hidden_layers or [], "model.kv_heads_layers": m.kv_heads_layers or []}
    if m.elastic.enabled:
        widths["elastic MLP widths (model.elastic.ffn_fractions)"] = m.elastic.ffn_widths(m.ffn_hidden)
        widths["elastic query groups (model.elastic.head_fractions)"] = m.elastic.head_groups(m.kv_heads)
    for name, values in widths.items():
        bad = [w for w in values if w % tp]
        if bad:
            raise ConfigError(f"{name} {values}: {bad} not divisible by parallel.tensor={tp}")


def padded_vocab(tokenizer_vocab: int, multiple: int) -> int:
    return int(math.ceil(tokenizer_vocab / multiple) * multiple)
