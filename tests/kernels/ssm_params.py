"""A diagonal SSM's discretised parameters as H3 builds them, for the kernel tests of its convolution paths."""

from __future__ import annotations

import torch

from hybrid_pretrain.models.mixers.ssm import DiagonalSSM
from hybrid_pretrain.tests.kernels.device import DEVICE


def cast(params: list[torch.Tensor], real: torch.dtype) -> list[torch.Tensor]:
    """(dtA, dB, C, D) in `real`'s precision: complex64 / complex128 and float32 / float64."""
    complex_dtype = torch.complex128 if real == torch.float64 else torch.complex64
    return [p.to(complex_dtype if p.is_complex() else real) for p in params]


def ssm_params(H: int, d_state: int, seed: int, real: torch.dtype = torch.float64,
               grad: bool = False) -> list[torch.Tensor]:
    """S4D-Lin (dtA, dB, C) complex (H, N/2) and D (H,), discretised in fp64, then in `real`'s precision; with
    `grad`, leaves that require gradients."""
    torch.manual_seed(seed)
    ssm = DiagonalSSM(H, d_state).double().to(DEVICE)
    with torch.no_grad():
        params = cast([*ssm.discretize(), ssm.D.detach().clone()], real)
    return [p.requires_grad_() for p in params] if grad else params
