"""SSM convolution in one or both directions (S4's ``bidirectional`` mode).

Bidirectional: ``y_t = sum_{s<=t} K_f[t-s] u_s + sum_{s>t} K_b[s-t-1] u_s + D u_t``: one causal kernel over the
past and one over the strict future, so y_t sees the whole sequence. Such a layer is not causal: it is meant
for classification/encoders, never for a language model, and has no recurrent step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_pretrain.kernels.fftconv import fftconv


def ssm_convolve(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """u: (B, H, L); k: (H, L) causal kernel, or (2, H, L) forward and backward kernels; D: (H,) -> (B, H, L)."""
    if not bidirectional:
        return fftconv(u, k, D)
    forward, backward = k[0], k[1]  # each (H, L)
    backward = F.pad(backward, (1, 0))[..., : u.shape[-1]]  # (H, L): shift by one, the present is the causal part's
    return fftconv(u, forward, D) + fftconv(u.flip(-1), backward).flip(-1)


def refuse_step(name: str) -> RuntimeError:
    """The error a bidirectional mixer raises from allocate_state/step."""
    return RuntimeError(
        f"{name} was built with bidirectional=True: its output depends on future positions, so it has no "
        f"recurrent step(); set model.options.{name}.bidirectional=false for a causal, steppable layer"
    )
