"""One classification run as a typed dataclass, read from YAML (``configs/debug_vit.yaml``) and checked once.

Every field has a default; a YAML key that is not a field, or a value of the wrong type, fails with one line
naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.typed_config import merge_into, read_yaml
from hybrid_pretrain.classify.tasks import TASKS
from hybrid_pretrain.models.architectures import validate_model
from hybrid_pretrain.models.classifier import SequenceClassifier
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.vit import ViT

MODELS = ("sequence", "vit")
INPUTS = ("tokens", "values", "images")


@dataclass
class ClassifyConfig:
    """Task, model and optimisation of one run (defaults: a small causal S4D stack on sequential digits)."""

    name: str = "classify"
    task: str = "digits"  # listops | digits
    model: str = "sequence"  # sequence: SequenceClassifier over `layers`; vit: ViT over digit images
    input: str = "tokens"  # digits as pixel tokens, pixel values or (vit) images; listops is always tokens
    layers: str = "SS"  # layer pattern (models.pattern); ViT: all "A", one per layer
    d_model: int = 64
    n_heads: int = 4
    d_state: int = 32  # model.h3_d_state: the SSM state size every SSM mixer defaults to
    d_ffn: int = 0  # 0: 4 * d_model
    rotary_dim: int = 0
    dropout: float = 0.0
    options: dict = field(default_factory=dict)  # model.options, e.g. {"s5": {"bidirectional": true}}
    pooling: str = "mean"  # mean | last
    patch_size: int = 2  # ViT patches on 8x8 digits: 2 (16 patches) or 4 (4 patches)
    train_size: int = 2000  # listops only (digits has 1,347 train / 450 test images)
    test_size: int = 500
    max_len: int = 200  # listops: tokens per expression at most
    max_depth: int = 4
    max_args: int = 5
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    eval_every: int = 1  # epochs between test evaluations
    seed: int = 0

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig of the classifier's stack (vocab_size 0: inputs are values)."""
        cfg = ModelConfig(vocab_size=vocab_size, d_model=self.d_model, n_heads=self.n_heads, layers=self.layers,
                          h3_d_state=self.d_state, d_ffn=self.d_ffn, rotary_dim=self.rotary_dim, dropout=self.dropout,
                          max_seq_len=max(self.max_len, 64) + 1, options=dict(self.options))
        validate_model(cfg)
        return cfg

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        choices = {"task": TASKS, "model": MODELS, "input": INPUTS, "pooling": ("mean", "last")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")
        for key in ("d_model", "n_heads", "d_state", "patch_size", "train_size", "test_size", "max_len", "max_depth",
                    "max_args", "epochs", "batch_size", "eval_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError(f"lr must be > 0, weight_decay and warmup_epochs >= 0, got {self.lr}, "
                              f"{self.weight_decay}, {self.warmup_epochs}")
        if self.model == "vit" and (self.task != "digits" or self.input != "images"):
            raise ConfigError("model 'vit' needs task 'digits' and input 'images'")
        if self.model == "sequence" and self.input == "images":
            raise ConfigError("input 'images' is for model 'vit'; a sequence model reads tokens or values")
        self._check_builds()

    def _check_builds(self) -> None:
        """Build the model on the meta device (no memory), so layer options and shapes fail before any data."""

        with torch.device("meta"):
            if self.model == "vit":
                ViT(self.model_config(0), image_size=8, patch_size=self.patch_size, channels=1, num_classes=10)
            else:
                SequenceClassifier(self.model_config(0 if self.input == "values" else 17), 10, self.pooling)


def load_config(path: str | Path | None = None, **overrides: object) -> ClassifyConfig:
    """Defaults <- YAML file (optional) <- `overrides` (e.g. parsed CLI flags), through the one config loader."""
    run = ClassifyConfig()
    if path is not None:
        merge_into(run, read_yaml(path, example="configs/debug_vit.yaml"), "", str(path))
    merge_into(run, dict(overrides), "", "command line")
    run.validate()
    return run
