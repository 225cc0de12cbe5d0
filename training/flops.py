"""Model FLOPs per trained token, for achieved FLOP/s and model FLOPs utilisation (MFU).

Training FLOPs per token (forward + backward = 3x forward), following the PaLM paper's appendix B
(Chowdhery et al. 2022), extended to the layers this project builds:

    dense      = 6 * N_matmul
    attention  = 12 * n_attention_layers * seq_len * d_model
    fftconv    = (30 * log2(2 * seq_len) + 24) * n_fft_channels
    total      = dense + attention + fftconv

- ``N_matmul`` is every parameter a token multiplies: all parameters except the input embedding
  table, with the output head counted once (so a tied head's V x D matmul is counted although its
  weight is the embedding's), and in mixture-of-experts layers only ``top_k`` experts' weights
  (``training.memory.expert_parameters``), since each token passes through top_k experts. Each such
  weight costs 2 FLOPs (multiply, add) forward and 4 backward (input and weight gradients): 6 N.
  Norm scales, biases and SSM parameters are counted too, as PaLM does; they are < 1% of N here.
- ``attention`` is the QK^T and AV matmuls, 4 * seq_len * d_model per token forward and twice that
  backward. Like PaLM it counts the full score matrix; a causal kernel that skips the masked half
  does about half of this work, so MFU by this count is the conventional (comparable) number.
- ``fftconv`` is the H3/S4D long convolutions, which are not matmuls. Per channel and token, the
  forward is a real FFT and an inverse FFT of size n = 2 * seq_len (2.5 n log2 n FLOPs each, the
  usual count: 5 n log2 n for a complex FFT, halved for real input), a complex product per
  frequency (6 FLOPs x (seq_len + 1)) and the skip term (2 FLOPs): 10 log2(2L) + 8 per token; the
  backward does two such transforms-and-products (input and kernel gradients), 3x in all. An H3
  layer convolves d_model channels in its shift SSM and head_dim * d_model (kv products) in its
  diagonal SSM; an S4D layer d_model channels. The SSM kernels' own FFTs are per sequence, not per
  token, and left out.

Mixers without a term here (registered by other model families) count their parameters only, so
their MFU is a lower bound. Everything is per token of a ``seq_len``-long training sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybrid_pretrain.models.architectures import count_parameters
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.parallel.tensor import single_rank
from hybrid_pretrain.training.memory import expert_parameters

FFT_MIXERS = ("h3", "s4d")


@dataclass(frozen=True)
class TrainingFlops:
    """Training (forward + backward) FLOPs per token, by term."""

    dense: float
    attention: float
    fftconv: float

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.fftconv


def matmul_parameters(cfg: ModelConfig, n_params: int) -> int:
    """Parameters a token multiplies: ``n_params`` without the embedding table (head once) or inactive experts."""

    experts, active = expert_parameters(cfg)
    # Tied: the one V x D matrix in n_params is the head's matmul (the lookup is free). Untied: drop the table.
    table = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return n_params - table - (experts - active)


def full_parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the whole single-rank model (on the meta device), also inside a tensor-parallel run."""

    with single_rank():
        return count_parameters(cfg)


def fft_channels(cfg: ModelConfig, mixer: str) -> int:
    """Channels one layer of ``mixer`` runs a length-L FFT convolution over (0 for other mixers)."""
    if mixer == "h3":
        return cfg.d_model + cfg.h3_head_dim * cfg.d_model  # shift SSM on k, diagonal SSM on the kv products
    if mixer == "s4d":
        return cfg.d_model
    return 0


def training_flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int | None = None) -> TrainingFlops:
    """FLOPs to train on one token of a ``seq_len`` sequence (formulas in the module docstring).

    ``n_params``: the whole model's parameter count (tied weights once, all experts, unsharded); by
    default counted from ``cfg`` on the meta device, which needs ``cfg.vocab_size`` set.
    """
    if n_params is None:
        n_params = full_parameter_count(cfg)
    layers = parse_pattern(cfg.layers, cfg.ffn).layers
    n_attention = sum(layer.mixer == "attention" for layer in layers)
    channels = sum(fft_channels(cfg, layer.mixer) for layer in layers)
    return TrainingFlops(
        dense=6.0 * matmul_parameters(cfg, n_params),
        attention=12.0 * n_attention * seq_len * cfg.d_model,
        fftconv=(30.0 * math.log2(2 * seq_len) + 24.0) * channels,
    )


def mfu(achieved_flops_per_device: float, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation; NaN where the peak is unknown (CPU, unlisted GPU)."""
    if not math.isfinite(peak_flops_per_device) or peak_flops_per_device <= 0:
        return math.nan
    return achieved_flops_per_device / peak_flops_per_device
