"""GPT-2 initialisation for every whole-model class (LanguageModel, Perceiver AR, DEQ, StructFormer; Atlas: below).

Each module's parameters are drawn from the global generator reseeded by (the model's init seed, the module's
name), not from one stream running through the whole model. So any one module's initial values can be made
without the rest of the model: ``parallel.build`` builds a rank's share on the meta device and materialises
only that share (one stage's blocks, the experts of one expert-parallel rank, one tensor slice), module by
module, and still gets exactly the single-rank model's values. The init seed itself is drawn from torch's
global generator when a model is constructed, before any submodule, so ``torch.manual_seed(s)`` then
building a model (on the CPU or the meta device) stays reproducible and every layout of a run agrees.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

RESIDUAL_OUT_PROJECTIONS = ("out_proj.weight", "down_proj.weight")  # weights that write into the residual stream


def draw_init_seed() -> int:
    """A model's init seed from the global generator (also under ``torch.device("meta")``: the draw is on the CPU)."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def module_seed(init_seed: int, name: str) -> int:
    """The generator seed of module ``name``: a hash, so neighbouring names give unrelated streams."""
    digest = hashlib.blake2b(f"{init_seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**63


@dataclass(frozen=True)
class GPT2Init:
    """Projections and embeddings ~ N(0, std), biases 0, residual outputs ~ N(0, std / sqrt(2 residual_layers)).

    Submodules (norms, SSMs, experts) first apply their own ``reset_parameters``; projections are then
    overwritten. Each layer adds two branches to the residual stream, so scaling their output projections
    by 1/sqrt(2 n_layers) keeps its variance O(1) with depth (0: no scaling). Calling it on a model built
    on the meta device after ``to_empty(device=...)`` materialises it.
    """

    seed: int
    std: float
    residual_layers: int = 0

    def __call__(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            self.module(name, module)

    def module(self, name: str, module: nn.Module) -> None:
        """Initialise the parameters ``module`` holds itself (not its submodules'), as module ``name`` of the model.

        ``name`` "" is the model, whose own ``reset_parameters`` is this whole initialisation.
        """
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(module_seed(self.seed, name))
            if name and hasattr(module, "reset_parameters"):
                module.reset_parameters()
            with torch.no_grad():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=self.std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                if self.residual_layers:
                    residual_std = self.std / math.sqrt(2 * self.residual_layers)
                    for pname, p in module.named_parameters(recurse=False):
                        if f"{name}.{pname}".endswith(RESIDUAL_OUT_PROJECTIONS):
                            nn.init.normal_(p, std=residual_std)


def gpt2_init_one_stream(model: nn.Module, std: float, skip: tuple[nn.Module, ...] = ()) -> None:
    """The same distributions as ``GPT2Init``, drawn from one global stream through the whole model.

    For models that are always built whole (Atlas): no module is ever made alone, and Atlas's recorded
    experiments (bench/RESULTS.md, tests/synthetic/test_atlas_facts.py) were measured with this draw;
    its reduced-budget PDist test did not learn with the per-module draw (recall@4 0.06 vs 0.11 frozen).
    `skip`: submodules left undrawn (a copy the caller fills in), so they do not shift the stream for later draws.
    """
    skipped = {id(m) for s in skip for m in s.modules()}
    modules = [m for m in model.modules() if id(m) not in skipped]
    for module in modules:
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    with torch.no_grad():
        for module in modules:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
