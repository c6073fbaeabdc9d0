"""A scaling study, declared in launch/studies/NAME.yaml: architectures x sizes x token counts.

Every run of the ladder is derived from the study by documented rules, so a study file says only
what is being compared; `scaling plan` prints what the rules made of it before anything runs.

    name: llama-vs-subllm
    dir: runs/studies/llama-vs-subllm          # run folders, configs, mlflow.db, fit and plots
    data: data/corpus-512
    seq_len: 512
    architectures:                             # name -> base run config (+ overrides)
      llama: {config: launch/configs/llama-125m.yaml}
      subllm: {config: launch/configs/subllm-250m.yaml}
    sizes:                                     # shapes shared by every architecture
      - {name: 10m, d_model: 256, n_layers: 12, n_heads: 4}
    tokens: {multiples: [2.5, 5, 10]}          # D = m x N: one run per size, decayed at each D
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from pretrain.config import Section, _format_errors, read_yaml_mapping
from pretrain.errors import ConfigError


class SizeSpec(Section):
    name: str  # short label used in run names (llama-<name>-s<seed>)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: plain multi-head attention
    ffn_hidden: int | None = None  # None: LLaMA's rule, 8/3 x d_model rounded up to a multiple of 64
    structures: dict[str, str] = {}  # architecture -> structure string, overriding the default rule

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or -(-8 * self.d_model // 3 // 64) * 64


class ArchSpec(Section):
    config: str  # a run config (launch/configs/*.yaml): everything the ladder does not set
    overrides: dict[str, Any] = {}  # dotted.key: value applied to every run of this architecture


class TokenSpec(Section):
    """Exactly one of the two. Either way a size gets ONE run whose WSD schedule is decayed at
    every D it needs (schedule.decay_points), the largest D being the run's own end."""

    multiples: list[float] | None = None  # D = m x N (N as chosen by the study's n_kind)
    budgets: list[float] | None = None  # IsoFLOP: compute budgets C (FLOPs); D = C / FLOPs-per-token

    @model_validator(mode="after")
    def _one(self) -> "TokenSpec":
        if (self.multiples is None) == (self.budgets is None):
            raise ValueError("give exactly one of tokens.multiples (D = m x N) and tokens.budgets (FLOPs)")
        values = self.multiples or self.budgets
        if not values or min(values) <= 0:
            raise ValueError("token multiples / budgets must be a non-empty list of positive numbers")
        return self


class Rules(Section):
    """How a run's hyper-parameters follow from its size. C = its training FLOPs at its largest D.

    Batch and LR: the compute-optimal fits of DeepSeek LLM (Bi et al. 2024, eq. 1), batch in tokens
    B = 0.292 C^0.3271 and peak LR 0.3118 C^-0.125, clamped; warm-up of about N tokens (Porian et
    al. 2024 found longer warm-ups hurt small models); a WSD cool-down of 20% of each D (Hägele et
    al. 2024: it matches a cosine schedule tuned to that D)."""

    batch_coef: float = 0.292
    batch_exp: float = 0.3271
    min_batch_tokens: int = 0  # clamps on B (tokens); the batch is then rounded to whole micro-batches
    max_batch_tokens: int = 4 * 2**20
    lr_coef: float = 0.3118
    lr_exp: float = -0.125
    max_lr: float = 1e-2
    min_lr_ratio: float = 0.1  # min_lr = ratio x peak LR, reached at the end of every decay
    warmup_tokens_per_param: float = 1.0
    decay_fraction: float = 0.2
    min_steps: int = 10  # the smallest D must give at least this many optimizer steps


class Resources(Section):
    gpus_per_run: int = 1  # processes per run (torchrun); data-parallel unless tensor > 1
    tensor: int = 1  # tensor-parallel size inside a run
    micro_batch_size: int = 16  # sequences per GPU per micro-step
    zero_stage: int = 1
    concurrent: int = 1  # `scaling run` locally: runs at once (small models can share one GPU)
    # for the GPU-hours estimate of the plan: achieved fraction of the peak (the measured
    # tokens/s of each run replaces it in the fit's speed-adjusted frontier)
    peak_tflops: float = 989.0  # H100/H200 dense bf16
    mfu: float = 0.3


class Study(Section):
    name: str
    dir: str  # study folder: runs/<run>/, configs/<run>.yaml, mlflow.db, fit/
    data: str  # a `prepare-data` folder shared by every run
    seq_len: int
    seeds: list[int] = [0]
    n_kind: Literal["non_embedding", "total"] = "non_embedding"  # the N of D = m N and of the fit
    architectures: dict[str, ArchSpec]
    sizes: list[SizeSpec]
    tokens: TokenSpec
    rules: Rules = Rules()
    resources: Resources = Resources()
    eval_batches: int = 8  # validation micro-batches per evaluation (each decay end is one)
    tracking_uri: str | None = None  # None: sqlite:///<dir>/mlflow.db
    predict: list[float] = []  # parameter counts whose loss `scaling fit` predicts (D = 20 N)

    @model_validator(mode="after")
    def _names(self) -> "Study":
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            raise ValueError(f"sizes repeat a name: {names}")
        if not self.sizes or not self.architectures:
            raise ValueError("a study needs at least one size and one architecture")
        for s in self.sizes:
            unknown = set(s.structures) - set(self.architectures)
            if unknown:
                raise ValueError(f"size {s.name}: structures for unknown architectures {sorted(unknown)}")
        return self

    @property
    def experiment(self) -> str:
        return f"scaling-{self.name}"

    def uri(self) -> str:
        from pretrain.tracking import default_tracking_uri

        return self.tracking_uri or default_tracking_uri(Path(self.dir))

    def mlflow_runs(self, role: str, max_results: int = 10_000) -> list:
        """This study's MLflow runs of one role: "study" (the parent), "run" or "fit"."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri())
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], f"tags.study = '{self.name}' and tags.role = '{role}'",
                                  max_results=max_results)


def find_study(name_or_path: str) -> Path:
    """`--study` takes a YAML path or a name under launch/studies/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (Path("launch/studies") / f"{name_or_path}.yaml",
                      Path(__file__).resolve().parents[2] / "launch/studies" / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"study {name_or_path!r}: no such file, and no launch/studies/{name_or_path}.yaml")


def load_study(name_or_path: str) -> Study:
    path = find_study(name_or_path)
    data = read_yaml_mapping(path, "study")
    try:
        study = Study.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"study {path}: " + _format_errors(e)) from None
    for arch, spec in study.architectures.items():
        if not Path(spec.config).is_file():
            raise ConfigError(f"study {path}: architecture {arch}: config {spec.config} does not exist")
    return study
