"""Give a rank's model, built on the meta device, its share of the single-rank model's initial weights.

Why: a rank used to build the whole single-rank model, then keep its tensor slice, pipeline stage and
experts. At start-up every rank so held the full fp32 weights once: 107 GB for GLaM 26.7B/64E, on a rank
that keeps a few GB of it. Here the rank's model (its stage, its tensor-parallel layers, its experts) is
built on the meta device, where tensors have shapes but no memory, and each parameter is then made alone:
its module in the single-rank reference model (also on meta) gets real tensors for the module's own
parameters only, the model's per-module seeded initialisation fills them (``models.init``: one module's
values never depend on another's), the rank keeps its tensor slice, and the reference goes back to
meta. The transient is one module's parameters (the embedding, or one expert), and an expert-parallel
rank makes only its own experts, each seeded by its global index. A rank's values are exactly the slice
of the single-rank model built from the same seed, so every layout starts where a single-rank run does
(the equivalence tests under tests/parallel rely on that).

Why not DeepSpeed's ``zero.Init``: it serves ZeRO-3 only (pipelines refuse ZeRO-3, and ZeRO-0/1/2 runs
need the same saving), and it still makes each module's parameters whole on every rank, broadcasts them
from rank 0 (one collective per parameter) and only then partitions them over the data-parallel group,
knowing nothing of our tensor slices or expert ranks. Per-module seeds give every layout (any TP, PP,
EP, ZeRO stage) the same weights with no collective at start-up, and each rank makes only what it keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hybrid_pretrain.parallel.tensor import shard


def materialize(model: nn.Module, reference: nn.Module, init_module: Callable[[str, nn.Module], None],
                rename: Callable[[str], str] | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Replace every meta parameter of ``model`` by its slice of the single-rank initial value; returns ``model``.

    ``reference`` is the single-rank model on the meta device; ``init_module(name, module)`` initialises the
    parameters ``module`` holds itself as module ``name`` of the reference (``GPT2Init.module``); ``rename``
    maps ``model``'s parameter names to the reference's (pipeline layer names, local expert indices).
    Parameter attributes (optimizer hints, tensor-parallel layout, DeepSpeed's expert flags) are kept and
    shared parameters stay shared. Raises RuntimeError naming a tensor left on the meta device.
    """
    rename = rename or (lambda name: name)
    values = _ModuleValues(dict(reference.named_modules()), init_module, device)
    made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(meta parameter) -> (it, its replacement)
    for prefix, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                name = f"{prefix}.{pname}" if prefix else pname
                owner, _, leaf = rename(name).rpartition(".")
                made[id(param)] = (param, _like(param, shard(values.of(owner, name)[leaf], param), name))
            module._parameters[pname] = made[id(param)][1]
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{left[0]} is still on the meta device after materialising ({len(left)} tensors); "
                           "expected every parameter to map to a single-rank parameter and no meta buffers")
    return model


class _ModuleValues:
    """Initial values of one reference module's own parameters, made on demand and kept until the next module."""

    def __init__(self, modules: dict[str, nn.Module], init_module: Callable[[str, nn.Module], None],
                 device: str | torch.device) -> None:
        self.modules, self.init_module, self.device = modules, init_module, device
        self.name: str | None = None
        self.values: dict[str, torch.Tensor] = {}

    def of(self, owner: str, wanted_by: str) -> dict[str, torch.Tensor]:
        if owner == self.name:
            return self.values
        if owner not in self.modules:
            raise KeyError(f"no module '{owner}' in the single-rank model for parameter '{wanted_by}'")
        module = self.modules[owner]
        meta = dict(module._parameters)
        try:
            for pname, p in meta.items():
                if p is not None:
                    module._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=self.device),
                                                             requires_grad=p.requires_grad)
            self.init_module(owner, module)
            self.values = {pname: p.detach() for pname, p in module._parameters.items() if p is not None}
        finally:
            module._parameters.update(meta)  # the reference never holds memory beyond this module's
        self.name = owner
        return self.values


def _like(meta: nn.Parameter, value: torch.Tensor, name: str) -> nn.Parameter:
    """A real parameter holding ``value`` with ``meta``'s shape, dtype, requires_grad and attributes."""
    if value.shape != meta.shape:
        raise RuntimeError(f"{name}: the single-rank value's slice has shape {tuple(value.shape)}, "
                           f"expected {tuple(meta.shape)}")
    param = nn.Parameter(value.to(meta.dtype).contiguous(), requires_grad=meta.requires_grad)
    param.__dict__.update(meta.__dict__)
    return param
