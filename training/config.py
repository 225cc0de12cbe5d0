"""One typed run configuration, merged once: dataclass defaults <- YAML file <- CLI ``key=value``.

Unknown keys and wrong types fail naming the key; the resolved config is written into the run
directory, and the DeepSpeed JSON is derived from it (never edited by hand beside it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.typed_config import merge_into, parse_override, read_yaml
from hybrid_pretrain.data_pipeline.config import DataConfig
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.models.architectures import validate_model
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.parallel import pipeline, sequence, tensor
from hybrid_pretrain.retrieval.config import RetrievalConfig, drop_legacy_token

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass
class OffloadConfig:
    """Where ZeRO keeps what does not fit the accelerator: DeepSpeed's ``offload_optimizer`` / ``offload_param``.

    ``optimizer`` moves fp32 master weights and Adam states (and the optimizer step) to host RAM or to
    files under ``nvme_path``; ``params`` does the same for the (bf16) weights between uses (ZeRO-3 only).
    """

    optimizer: str = "none"  # none | cpu | nvme
    params: str = "none"  # none | cpu | nvme
    nvme_path: str = ""  # folder for the swap files when either is 'nvme'

    def validate(self) -> None:
        for name in ("optimizer", "params"):
            if getattr(self, name) not in OFFLOAD_DEVICES:
                raise ConfigError(f"train.offload.{name} must be one of {', '.join(OFFLOAD_DEVICES)}, "
                                  f"got '{getattr(self, name)}'")
        if "nvme" in (self.optimizer, self.params) and not self.nvme_path:
            raise ConfigError("train.offload: 'nvme' needs train.offload.nvme_path (a writable folder on a fast "
                              "disk)")

    @property
    def enabled(self) -> bool:
        return self.optimizer != "none" or self.params != "none"

    @property
    def uses_nvme(self) -> bool:
        return "nvme" in (self.optimizer, self.params)

    def check_stage(self, zero_stage: int) -> None:
        """DeepSpeed offloads what ZeRO partitions: parameters and NVMe need stage 3, CPU optimizer stage 2."""
        if self.params != "none" and zero_stage != 3:
            raise ConfigError(f"train.offload.params={self.params} needs train.zero_stage=3 (only ZeRO-3 partitions "
                              f"the weights), got {zero_stage}")
        if self.optimizer == "nvme" and zero_stage != 3:
            raise ConfigError(f"train.offload.optimizer=nvme needs train.zero_stage=3 (ZeRO-Infinity), "
                              f"got {zero_stage}")
        if self.optimizer == "cpu" and zero_stage < 2:
            raise ConfigError(f"train.offload.optimizer=cpu needs train.zero_stage 2 or 3, got {zero_stage}")

    def check_pipeline(self, pipeline: int) -> None:
        if self.enabled and pipeline > 1:
            raise ConfigError(f"train.offload (optimizer={self.optimizer}, params={self.params}) with "
                              f"parallel.pipeline={pipeline}: offload runs under ZeRO-2/3 without a pipeline; expected "
                              "parallel.pipeline=1 or train.offload.*=none")


PRECISIONS = ("auto", "fp32", "bf16", "bf16_autocast")


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps in the whole run
    micro_batch_size: int = 8  # sequences per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    zero_stage: int = 1
    # auto: bf16 on GPUs that support it, fp32 elsewhere; bf16: DeepSpeed's bf16 (every weight rounded to bf16);
    # bf16_autocast: fp32 weights, bf16 matmuls (SSM parameters unrounded; kernels/README.md, "Precision under bf16")
    precision: str = "auto"
    log_every: int = 1
    eval_every: int = 100  # 0: never
    eval_batches: int = 4  # micro-batches per rank per evaluation
    save_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 3  # newest N kept on disk
    # > 0: train on the first N micro-batches of each rank over and over, to check that the model and its
    # optimizer can drive the loss down (a debugging run, like Lightning's overfit_batches); 0: off
    overfit_batches: int = 0
    offload: OffloadConfig = field(default_factory=OffloadConfig)  # ZeRO-Offload / ZeRO-Infinity

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "overfit_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        self.offload.validate()
        self.offload.check_stage(self.zero_stage)


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism takes the rest of the world size."""

    tensor: int = 1  # tensor-parallel size: heads, MLP hidden units, H3 channels and the vocabulary split
    pipeline: int = 1  # pipeline stages: '|' cuts in model.layers, or an even split; micro-batches = train.grad_accum
    expert: int = 1  # expert-parallel size: each MoE layer's experts are split over this many DP ranks
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    sequence_parallel: bool = False  # split norms/residuals along the sequence over the tensor ranks (needs tensor > 1)

    def validate(self) -> None:
        for name in ("tensor", "pipeline", "expert"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {getattr(self, name)}")

    def check_world(self, world_size: int) -> int:
        """Return the data-parallel size, or raise ConfigError if the sizes do not divide the world."""
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel.tensor ({self.tensor}) x parallel.pipeline ({self.pipeline}) = {model_parallel} "
                f"does not divide the world size {world_size}; expected a world size that is a multiple of it"
            )
        dp = world_size // model_parallel
        if dp % self.expert:
            raise ConfigError(
                f"parallel.expert ({self.expert}) must divide the data-parallel size {dp} "
                f"(world size {world_size} / tensor x pipeline {model_parallel})"
            )
        return dp

    def check_experts(self, num_experts: int) -> None:
        """Every expert-parallel rank must hold the same number of experts."""
        if num_experts % self.expert:
            raise ConfigError(
                f"model.num_experts ({num_experts}) must be divisible by parallel.expert ({self.expert})"
            )


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = ""  # empty: runs/<name>
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # used by model.arch: atlas

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty string without '/', got '{self.name}'")
        validate_model(self.model)
        self.train.validate()
        self.parallel.validate()
        self.train.offload.check_pipeline(self.parallel.pipeline)
        if self.train.precision == "bf16_autocast" and self.parallel.tensor > 1:
            # megatron-core's parallel linear runs its backward under CUDA's autocast state only: on CPU it mixes
            # bf16 and fp32 (measured, DeepSpeed 0.19.8, megatron-core 0.16.1)
            raise ConfigError(f"train.precision=bf16_autocast with parallel.tensor={self.parallel.tensor}: "
                              "megatron-core's tensor-parallel layers fail under CPU autocast (untested on GPU); "
                              "expected parallel.tensor=1 or train.precision=bf16")
        self._validate_model_parallel()
        if "E" in self.model.ffn:
            self.parallel.check_experts(self.model.num_experts)
            if self.parallel.expert > 1 and self.train.zero_stage == 0 and self.train.grad_clip > 0:
                # DeepSpeed's ZeRO-0 clipping averages per-rank norms, which differ when ranks hold different experts.
                raise ConfigError(
                    f"parallel.expert={self.parallel.expert} with train.zero_stage=0 would clip by a wrong gradient "
                    "norm; expected train.zero_stage >= 1 or train.grad_clip=0"
                )
        if self.model.arch == "atlas":
            self._validate_atlas()
        try:
            self.data.validate()
        except DataError as e:
            raise ConfigError(str(e)) from None
        if self.data.vocab_size < 64:
            raise ConfigError(f"data.vocab_size must be at least 64, got {self.data.vocab_size}")
        if self.model.vocab_size and self.model.vocab_size < self.data.vocab_size and not self.data.tokenizer:
            raise ConfigError(
                f"model.vocab_size ({self.model.vocab_size}) is smaller than data.vocab_size "
                f"({self.data.vocab_size}); expected model.vocab_size >= data.vocab_size, or 0 to match"
            )

    def _validate_atlas(self) -> None:
        self.retrieval.validate()
        if self.train.zero_stage == 3:
            # The index is (re)built from the passage tower's weights, which ZeRO-3 keeps partitioned across ranks.
            raise ConfigError("model.arch 'atlas' needs train.zero_stage <= 2 (it re-embeds passages with whole "
                              "weights)")
        if self.parallel.tensor > 1 or self.parallel.pipeline > 1:
            raise ConfigError("model.arch 'atlas' trains with data parallelism only; "
                              "expected parallel.tensor=1 and parallel.pipeline=1")


    def _validate_model_parallel(self) -> None:
        """Tensor and pipeline parallelism against the model and ZeRO stage (parallel/ owns the rules)."""

        tensor.check_model(self.model, self.parallel.tensor)
        pipeline.check_model(self.model, self.parallel.pipeline, self.train.zero_stage, self.train.grad_clip)
        if self.parallel.sequence_parallel:
            sequence.check_model(self.model, self.parallel.tensor, self.data.seq_len, self.train.zero_stage)


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML at ``path`` <- ``overrides``; validated. Raises ConfigError on any problem."""
    cfg = RunConfig()
    if path:
        merge_into(cfg, drop_legacy_token(read_yaml(path), str(path)), "", str(path))
    for text in overrides:
        merge_into(cfg, drop_legacy_token(parse_override(text), f"override '{text}'"), "", f"override '{text}'")
    cfg.validate()
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: RunConfig, run_dir: Path) -> Path:
    """Write the fully resolved config next to the run's outputs, so a run can be reproduced from it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    out.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out
