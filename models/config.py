"""Model hyper-parameters: one typed dataclass, validated once, shared by every model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_pretrain.base.errors import ConfigError


@dataclass
class ModelConfig:
    """Shapes of a language model built from a layer pattern.

    `layers` is the hybrid stack as one string, one symbol per layer (see `models.pattern`), with
    `|` marking pipeline-stage cuts; `ffn` gives the per-layer feed-forward kind (`D` dense MLP,
    `E` mixture of experts), empty meaning all dense. The MoE fields only matter where `ffn` has an `E`.
    """

    arch: str = "lm"  # whole-model family from models.architectures.ARCHS; "lm" is the hybrid-stack LanguageModel
    vocab_size: int = 0  # 0: take the tokenizer's vocabulary size at training time
    d_model: int = 256
    n_heads: int = 4  # attention heads
    layers: str = "HHAH"
    ffn: str = ""
    d_ffn: int = 0  # 0: 4 * d_model
    max_seq_len: int = 2048  # longest sequence attention caches and rotary tables must hold
    rotary_dim: int = 0  # 0: no positional encoding in attention (H3 layers carry position)
    h3_d_state: int = 64  # state size of the H3 shift and diagonal SSMs
    h3_head_dim: int = 1  # H3 multi-head size; 1 is the paper's released models
    dropout: float = 0.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    num_experts: int = 8  # experts per MoE layer
    top_k: int = 1  # experts per token: 1 Switch, 2 GLaM
    # True: every assignment is computed (tokens sorted by expert, grouped expert matmuls; MegaBlocks).
    # False: capacity-based dropping as in the Switch and GLaM papers, with the three fields below.
    moe_dropless: bool = True
    capacity_factor: float = 1.25  # expert slots = factor * top_k * tokens / experts, in training
    eval_capacity_factor: float = 2.0  # the same at evaluation (fewer drops)
    min_capacity: int = 4  # slots per expert however few the tokens
    aux_loss_coef: float = 0.01  # load-balancing loss alpha (Switch)
    z_loss_coef: float = 1e-3  # router z-loss (ST-MoE)
    jitter: float = 0.0  # multiplicative router-input noise in training, uniform in [1 - jitter, 1 + jitter]
    # Per-layer options keyed by registered name, e.g. {"mega": {"chunk_size": 64}}; see models.options.
    options: dict[str, dict] = field(default_factory=dict)

    @property
    def ffn_dim(self) -> int:
        return self.d_ffn or 4 * self.d_model

    @property
    def n_layers(self) -> int:
        """Layers in the stack: one per symbol of ``layers`` (``|`` only cuts pipeline stages)."""
        return len(self.layers.replace("|", ""))

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field (``models.architectures.validate_model`` also
        checks the layer pattern and the registered names)."""
        for name in ("d_model", "n_heads", "h3_d_state", "h3_head_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be >= 0 (0 = from tokenizer), got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if self.d_model % self.h3_head_dim:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.h3_head_dim ({self.h3_head_dim})"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.d_model // self.n_heads:
            raise ConfigError(
                f"model.rotary_dim must be even and at most the head size {self.d_model // self.n_heads}, "
                f"got {self.rotary_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.layers.replace("|", ""):
            raise ConfigError("model.layers must hold at least one layer symbol, e.g. 'HHAH'")
        self._validate_moe()

    def _validate_moe(self) -> None:
        if self.num_experts <= 0:
            raise ConfigError(f"model.num_experts must be a positive integer, got {self.num_experts}")
        if self.top_k not in (1, 2) or self.top_k > self.num_experts:
            raise ConfigError(
                f"model.top_k must be 1 (Switch) or 2 (GLaM) and at most model.num_experts ({self.num_experts}), "
                f"got {self.top_k}"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_capacity", "aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError(f"model.jitter must be in [0, 1), got {self.jitter}")
