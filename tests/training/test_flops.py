"""Model FLOPs per token: the formula against a hand count and against PyTorch's own FLOP counter."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hybrid_pretrain.models.architectures import count_parameters
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.training.flops import mfu, training_flops_per_token
from hybrid_pretrain.training.gpu_peaks import lookup, peak_flops

D, V, L = 64, 512, 64


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": V, "d_model": D, "n_heads": 4, "h3_d_state": 8, **kw})


def test_all_attention_model_matches_hand_count():
    # Per layer: qkv 3D^2+3D, out D^2+D, MLP up 4D^2+4D and down 4D^2+D, two LayerNorms 4D; final norm 2D; tied head VD.
    flops = training_flops_per_token(_cfg(layers="AA"), L)
    assert flops.dense == 6 * (2 * (12 * D * D + 13 * D) + 2 * D + V * D)
    assert flops.attention == 12 * 2 * L * D  # PaLM: 12 * layers * seq_len * d_model
    assert flops.fftconv == 0
    assert flops.total == flops.dense + flops.attention


def test_untied_head_counts_head_once_and_not_the_embedding_table():
    tied = training_flops_per_token(_cfg(layers="AA"), L)
    untied = training_flops_per_token(_cfg(layers="AA", tie_embeddings=False), L)
    assert untied.total == tied.total  # same matmuls; the lookup table costs nothing


def test_h3_fft_term_and_moe_top_k():
    h3 = training_flops_per_token(_cfg(layers="HA"), L)
    per_channel = 30 * math.log2(2 * L) + 24  # rfft + irfft of size 2L, product, skip; x3 for the backward
    assert h3.fftconv == pytest.approx(per_channel * (D + D))  # shift SSM on D channels, diagonal SSM on D (head_dim 1)
    assert h3.attention == 12 * 1 * L * D
    two_heads = training_flops_per_token(_cfg(layers="HA", h3_head_dim=2), L)
    assert two_heads.fftconv == pytest.approx(per_channel * (D + 2 * D))

    dense = training_flops_per_token(_cfg(layers="AA"), L)
    moe = training_flops_per_token(_cfg(layers="AA", ffn="DE", num_experts=4, top_k=2), L)
    per_expert = 2 * D * 4 * D + 4 * D + D
    # The MoE layer replaces one MLP (= one expert's shape) by a router (D x E, no bias) and top_k experts per token.
    assert moe.dense - dense.dense == 6 * (D * 4 + (2 - 1) * per_expert)
    assert count_parameters(_cfg(layers="AA", ffn="DE", num_experts=4, top_k=2)) > count_parameters(_cfg(layers="AA"))


@pytest.mark.parametrize("layers,tie", [("AA", True), ("AA", False), ("AAA", True)])
def test_formula_matches_flop_counter_on_forward_backward(layers, tie):
    """PyTorch counts every matmul of a real forward + backward; the formula must agree within 2%.

    The formula also counts biases and norm scales as 6 FLOPs each (PaLM's 6N), which FlopCounterMode
    does not: 1.2% of N at d_model 64. SDPA's math backend runs attention as counted matmuls (the fused
    CPU kernel is opaque to the counter); it computes the full score matrix, as the formula assumes.
    """
    torch.manual_seed(0)
    cfg = _cfg(layers=layers, tie_embeddings=tie)
    model = LanguageModel(cfg)
    x = torch.randint(0, V, (2, L))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, labels=x).backward()
    measured = counter.get_total_flops() / x.numel()
    assert training_flops_per_token(cfg, L).total == pytest.approx(measured, rel=0.02)


def test_peak_table_lookup_by_device_name():
    assert lookup("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert lookup("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert lookup("NVIDIA H100 NVL").name == "H100 NVL"
    assert lookup("NVIDIA H200").name == "H200 SXM"
    assert lookup("NVIDIA A100-SXM4-80GB").name == "A100"
    assert lookup("NVIDIA A10").name == "A10"
    assert lookup("NVIDIA A10G") is None  # a different chip; no guessed peak
    assert lookup("NVIDIA L4").name == "L4" and lookup("NVIDIA L40S") is None
    assert lookup("Tesla V100-SXM2-16GB").name == "V100 SXM2"
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-PCIE-40GB", "fp32") == pytest.approx(19.5e12)
    assert math.isnan(peak_flops("Tesla V100-PCIE-32GB", "bf16"))  # no bf16 units
    assert math.isnan(peak_flops(None, "fp32"))  # CPU


def test_mfu_is_nan_without_a_peak():
    assert mfu(100e12, 400e12) == pytest.approx(0.25)
    assert math.isnan(mfu(1e9, math.nan))


def test_logged_throughput_fields():
    from hybrid_pretrain.training.loop import LoopSettings, _throughput
    from hybrid_pretrain.training.metrics import peak_memory_bytes

    settings = LoopSettings(steps=1, grad_accum=1, log_every=1, eval_every=0, eval_batches=0, save_every=0,
                            keep_checkpoints=1, tokens_per_step=1024, flops_per_token=2e9, peak_flops=100e12,
                            world_size=4)
    fields = _throughput(settings, tokens_per_s=100_000)  # 2e14 FLOP/s over 4 devices
    assert fields["model_tflops"] == pytest.approx(50.0) and fields["mfu"] == pytest.approx(0.5)
    cpu = _throughput(LoopSettings(**{**settings.__dict__, "peak_flops": math.nan}), tokens_per_s=100_000)
    assert cpu["mfu"] is None and cpu["model_tflops"] == pytest.approx(50.0)
    assert peak_memory_bytes(torch.device("cpu")) > 50 * 2**20  # this process's peak RSS, torch imported
