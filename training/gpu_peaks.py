"""Peak dense FLOP/s of known accelerators, the denominator of model FLOPs utilisation (MFU).

Numbers are the vendors' datasheet values for dense math (the datasheets' headline tensor-core
figures assume 2:4 structured sparsity; those are halved here). ``fp32`` is plain FP32 (CUDA
cores), not TF32: PyTorch keeps TF32 matmuls off by default. V100 has no bf16 units, so it has no
bf16 entry. Sources: NVIDIA A100, H100, H200, L4, A10 and V100 datasheets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from hybrid_pretrain.parallel.engine import computes_in_bf16

TERA = 1e12


@dataclass(frozen=True)
class GpuPeak:
    name: str
    bf16: float  # dense FLOP/s; NaN where the GPU has no bf16 units
    fp32: float


# Ordered: the first pattern that matches torch.cuda.get_device_name() wins, so variants come before the
# family name ("H100 PCIe" before "H100", "A100" before "A10").
PEAKS: tuple[tuple[str, GpuPeak], ...] = (
    (r"H200 NVL", GpuPeak("H200 NVL", 835.5 * TERA, 60.0 * TERA)),
    (r"H200", GpuPeak("H200 SXM", 989.4 * TERA, 66.9 * TERA)),
    (r"H100 NVL", GpuPeak("H100 NVL", 835.5 * TERA, 60.0 * TERA)),
    (r"H100.*PCIe", GpuPeak("H100 PCIe", 756.5 * TERA, 51.2 * TERA)),
    (r"H100", GpuPeak("H100 SXM", 989.4 * TERA, 66.9 * TERA)),
    (r"A100", GpuPeak("A100", 312.0 * TERA, 19.5 * TERA)),
    (r"A10(?![0-9G])", GpuPeak("A10", 125.0 * TERA, 31.2 * TERA)),
    (r"\bL4\b", GpuPeak("L4", 121.0 * TERA, 30.3 * TERA)),
    (r"V100.*PCIE", GpuPeak("V100 PCIe", math.nan, 14.0 * TERA)),
    (r"V100", GpuPeak("V100 SXM2", math.nan, 15.7 * TERA)),
)


def lookup(device_name: str) -> GpuPeak | None:
    """The table entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def peak_flops(device_name: str | None, precision: str) -> float:
    """Dense peak FLOP/s of one device at ``precision`` (a train.precision; both bf16 modes run bf16 matmuls);
    NaN on CPU or an unknown GPU.

    NaN rather than a guess: an MFU computed against a made-up peak would look authoritative.
    """
    peak = lookup(device_name) if device_name else None
    if peak is None:
        return math.nan
    return peak.bf16 if computes_in_bf16(precision) else peak.fp32


def current_device_peak(precision: str) -> float:
    """Peak FLOP/s of this process's CUDA device (NaN on CPU)."""

    if not torch.cuda.is_available():
        return math.nan
    return peak_flops(torch.cuda.get_device_name(), precision)
