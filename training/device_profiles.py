"""Named devices for ``--dry-run --device-profile``: peak FLOP/s, memory, and an assumed utilisation.

The estimated step time of one rank is

    step_s = flops_per_token * tokens_per_step_per_rank / (peak * utilisation) * (1 + (PP - 1) / micro_batches)

with ``flops_per_token`` from ``training.flops`` (forward and backward, model FLOPs), the tokens one
data-parallel replica trains per optimizer step split over its TP x PP ranks, and the 1F1B pipeline
bubble (Narayanan et al. 2021) as the last factor. Compute only: gradient all-reduces, ZeRO gathers,
expert all-to-alls and offload transfers are assumed to overlap with it or are left out. The utilisation
is an assumption, stated in the output: 40% model FLOPs utilisation is what well-tuned dense LLM
training reaches on A100/H100 (PaLM reported 46% on TPU v4, Megatron-LM up to 52% on A100s); an H3
model's FFT convolutions and a MoE's dispatch reach less, so read it as optimistic for those.

GPU peaks come from ``training.gpu_peaks`` (datasheets, dense). The ``cpu`` profile is this machine:
its peak is measured (a best-of-5 2048 x 2048 matmul in the run's precision, on the threads torch uses)
and its memory is the host RAM. Its utilisation, 30%, is an assumption from the shared 2-core VM:
debug_hybrid's fastest fp32 steps reached 35-60% of that matmul peak in model FLOPs, its median steps far
less while other jobs ran (bench/RESULTS.md, issue 18); small shapes are far from matmul-bound. In bf16
the measured peak is the CPU's bf16 matmul units (AMX here, ~6x fp32) while bf16 training ran slower than
fp32 on the same VM (bench/bf16_curve.py): read a cpu bf16 estimate as a lower bound on the time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.parallel.engine import computes_in_bf16
from hybrid_pretrain.training.gpu_peaks import lookup

GB = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    bf16_flops: float  # dense peak FLOP/s per device
    fp32_flops: float
    memory_bytes: float  # per device
    utilisation: float  # assumed model FLOPs utilisation (MFU)
    default_precision: str  # what train.precision=auto means on this device

    def peak(self, precision: str) -> float:
        return self.bf16_flops if computes_in_bf16(precision) else self.fp32_flops


def _gpu(name: str, datasheet_name: str, memory_gb: float) -> DeviceProfile:
    peak = lookup(datasheet_name)
    return DeviceProfile(name, f"NVIDIA {peak.name} {memory_gb:.0f} GB", peak.bf16, peak.fp32, memory_gb * GB,
                         utilisation=0.40, default_precision="bf16")


CPU_UTILISATION = 0.30


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's achieved FLOP/s on an n x n matmul in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool and oneDNN's kernel choice
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cpu_profile() -> DeviceProfile:
    """This machine's CPU, measured now (about a second)."""
    return DeviceProfile("cpu", f"this machine's CPU, {torch.get_num_threads()} threads (matmul peak measured)",
                         matmul_flops(torch.bfloat16), matmul_flops(torch.float32), host_memory_bytes(),
                         utilisation=CPU_UTILISATION, default_precision="fp32")


PROFILES = {
    "h100": lambda: _gpu("h100", "H100 SXM", 80),
    "a100": lambda: _gpu("a100", "A100", 80),
    "cpu": cpu_profile,
}


def device_profile(name: str) -> DeviceProfile:
    """The named profile; a clear error for any other name."""
    if name not in PROFILES:
        raise ConfigError(f"--device-profile must be one of {', '.join(PROFILES)}, got '{name}'")
    return PROFILES[name]()


def step_seconds(flops_per_token: float, tokens_per_replica: int, profile: DeviceProfile, precision: str,
                 model_parallel: int = 1, pipeline: int = 1, micro_batches: int = 1) -> float:
    """Estimated seconds of one optimizer step on one rank (formula in the module docstring).

    ``tokens_per_replica``: tokens one data-parallel replica trains per step (micro-batch x accumulation x
    sequence length), shared by its ``model_parallel`` = TP x PP ranks.
    """
    flops = flops_per_token * tokens_per_replica / model_parallel
    bubble = 1 + (pipeline - 1) / micro_batches
    return flops / (profile.peak(precision) * profile.utilisation) * bubble
