"""AdamW parameter groups and the warmup + cosine learning-rate multiplier.

Optimizer hints live on the parameters (``param._optim``, e.g. SSM ``A``/``dt`` want a smaller LR
and no weight decay, as in the S4/H3 papers); this builder reads them, so models never see the
optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Group parameters by (lr, weight decay): matrices decay, vectors (norms, biases) do not, hints win."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    names: dict[tuple[float, float], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hint = getattr(p, "_optim", {})
        group_lr = min(lr, hint["lr"]) if "lr" in hint else lr
        group_wd = hint.get("weight_decay", weight_decay if p.ndim >= 2 else 0.0)
        key = (group_lr, group_wd)
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    return [
        {"params": params, "lr": key[0], "weight_decay": key[1], "name": f"lr={key[0]:g},wd={key[1]:g}"}
        for key, params in sorted(groups.items(), key=lambda kv: kv[0], reverse=True)
    ]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
