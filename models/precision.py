"""Half-precision copies of a trained model keep the SSM dynamics in fp32.

The parameters that carry an optimizer hint (``p._optim``: dt, A or Lambda, P and B of H3/S4D/S4/DSS/S5/DLR,
Mega's EMA coefficients) set each mode's decay rate and frequency. Rounded to bf16 they move an H3 layer's
output by ~20% (kernels/README.md, "Precision under bf16"), which is why ``train.precision=bf16_autocast``
never rounds them; a bf16 export or a bf16 generation keeps them fp32 too. They are channels x modes
elements, a negligible share of the model, and every mixer upcasts them before use anyway.
"""

from __future__ import annotations

import torch
from torch import nn

HALF = (torch.bfloat16, torch.float16)


def fp32_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters a bf16/fp16 copy of `model` keeps in fp32 (works on a meta-built model)."""
    return {name for name, p in model.named_parameters() if hasattr(p, "_optim")}


def cast_model(model: nn.Module, dtype: torch.dtype, device: str | torch.device | None = None,
               keep: set[str] | None = None) -> nn.Module:
    """``model.to(device, dtype)``, except that under bf16/fp16 the SSM dynamics stay fp32 (in place).

    `keep` names them when the parameters lost their hints (``load_state_dict(assign=True)`` replaces them).
    """
    keep = (fp32_parameter_names(model) if keep is None else keep) if dtype in HALF else set()
    kept = {name: p.data.to(device=device, dtype=torch.promote_types(p.dtype, torch.float32))
            for name, p in model.named_parameters() if name in keep}
    model.to(device=device, dtype=dtype)
    for name, p in model.named_parameters():
        if name in kept:
            p.data = kept[name]
    return model


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype, keep: set[str]) -> None:
    """Cast the floating tensors of `state_dict` to `dtype` in place, except the names in `keep`."""
    for name, t in state_dict.items():
        if t.is_floating_point() and name not in keep:
            state_dict[name] = t.to(dtype)
