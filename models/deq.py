"""Deep Equilibrium language model (Bai, Kolter & Koltun 2019): one weight-tied layer run to its fixed point.

    x  = embed(tokens)                         (B, L, D) input injection
    f(z, x) = Block(z + x) - z                 the block's mixer and ffn branches at z + x, plus x
    z* = f(z*, x)                              solved by Anderson acceleration, no graph kept
    logits = head(norm(z*))

Backward uses the implicit function theorem instead of backpropagating through the solver:
dL/dθ = g ∂f(z*, x)/∂θ with g = g Jf(z*) + dL/dz*, itself a fixed point solved by Anderson on
vector-Jacobian products. Only one application of f is on the autograd graph (plus one for the
VJPs), so activation memory is that of a single layer whatever the number of solver iterations:
"memory constant in effective depth".

Removing Block's own identity path (the ``- z``) keeps f contractive at initialisation, so the fixed
point is well posed from the start. Anderson mixes iterates per token (rows of B*L x D): a token's
iterate depends only on its own and earlier positions, so with a causal mixer the model stays causal
(exactly for a fixed iteration count; the batch-wide stopping test can differ by at most `forward_tol`).
The layer comes from the pattern's single symbol (e.g. ``model.layers: "A"``, ``model.ffn: "D"``);
solver settings are ``model.options.deq``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn import build_ffn
from hybrid_pretrain.models.init import GPT2Init, draw_init_seed
from hybrid_pretrain.models.mixers import build_mixer
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.models.roles import IGNORE_INDEX


@dataclass
class DEQOptions:
    forward_max_iter: int = 30  # Anderson iterations for z*
    forward_tol: float = 1e-3  # relative residual |f(z) - z| / |f(z)| to stop at
    backward_max_iter: int = 30  # Anderson iterations for the adjoint g
    backward_tol: float = 1e-4
    anderson_m: int = 5  # iterates remembered by Anderson acceleration
    anderson_beta: float = 1.0  # mixing: 1 takes the extrapolated f values, < 1 damps towards the iterates
    anderson_lam: float = 1e-4  # ridge regularisation of the mixing weights, relative to the residuals

    def validate(self, name: str) -> None:
        for key in ("forward_max_iter", "backward_max_iter"):
            if getattr(self, key) < 2:
                raise ConfigError(f"model.options.{name}.{key} must be >= 2, got {getattr(self, key)}")
        if self.anderson_m < 2:
            raise ConfigError(f"model.options.{name}.anderson_m must be >= 2, got {self.anderson_m}")
        for key in ("forward_tol", "backward_tol", "anderson_lam"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.options.{name}.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.anderson_beta <= 1:
            raise ConfigError(f"model.options.{name}.anderson_beta must be in (0, 1], got {self.anderson_beta}")


@dataclass
class SolverInfo:
    iterations: int
    residual: float  # relative residual |f(z) - z| / |f(z)| at the returned iterate


def anderson(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, m: int = 5, max_iter: int = 30,
             tol: float = 1e-3, beta: float = 1.0, lam: float = 1e-4) -> tuple[torch.Tensor, SolverInfo]:
    """Anderson acceleration for z = f(z), each row of z0 (N, D) with its own mixing weights.

    Each step solves min_alpha |sum_i alpha_i (f(z_i) - z_i)|^2 + lam' |alpha|^2 with sum alpha = 1 over
    the last `m` iterates (a bordered (n+1) x (n+1) system per row; lam' = lam x mean squared residual),
    then z = beta F alpha + (1-beta) X alpha.
    Written out because no maintained PyTorch package provides a batched Anderson solver.
    """
    N, D = z0.shape
    X = z0.new_zeros(N, m, D)  # (N, m, D) iterates
    Fx = z0.new_zeros(N, m, D)  # (N, m, D) f of the iterates
    X[:, 0], Fx[:, 0] = z0, f(z0)
    X[:, 1], Fx[:, 1] = Fx[:, 0], f(Fx[:, 0])
    H = z0.new_zeros(N, m + 1, m + 1)  # bordered Gram system
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    rhs = z0.new_zeros(N, m + 1, 1)
    rhs[:, 0] = 1
    i, iterations, residual = 1, 2, _residual(Fx[:, 1], X[:, 1])
    for k in range(2, max_iter):
        if residual <= tol:
            break
        n = min(k, m)
        G = Fx[:, :n] - X[:, :n]  # (N, n, D) residuals
        gram = G @ G.transpose(1, 2)  # (N, n, n)
        # Ridge relative to the residuals' size, so tiny adjoint gradients are not swamped by it.
        ridge = lam * gram.diagonal(dim1=1, dim2=2).mean(-1) + torch.finfo(z0.dtype).tiny  # (N,)
        H[:, 1 : n + 1, 1 : n + 1] = gram + ridge[:, None, None] * torch.eye(n, dtype=z0.dtype, device=z0.device)
        alpha = torch.linalg.solve(H[:, : n + 1, : n + 1], rhs[:, : n + 1])[:, 1 : n + 1, 0]  # (N, n)
        i = k % m
        X[:, i] = beta * (alpha[:, None] @ Fx[:, :n])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        Fx[:, i] = f(X[:, i])
        iterations, residual = k + 1, _residual(Fx[:, i], X[:, i])
    return X[:, i].clone(), SolverInfo(iterations, residual)


def _residual(fz: torch.Tensor, z: torch.Tensor) -> float:
    return ((fz - z).norm() / (fz.norm() + 1e-9)).item()


class DEQLanguageModel(nn.Module):
    """Causal DEQ LM: ``forward(input_ids (B, L), labels=None)`` -> logits (B, L, V) or mean loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be set (> 0) to build a DEQ model, got {cfg.vocab_size}")
        plan = parse_pattern(cfg.layers, cfg.ffn)
        if len(plan.layers) != 1:
            raise ConfigError(f"model.layers for model.arch 'deq' must be one symbol (the weight-tied layer), "
                              f"got '{cfg.layers}'")
        if cfg.dropout:
            raise ConfigError("model.dropout must be 0 for model.arch 'deq': a fresh dropout mask at every solver "
                              f"iteration makes f change under the solver, got {cfg.dropout}")
        init_seed = draw_init_seed()  # before any submodule draws from the global generator
        self.cfg = cfg
        self.opts = layer_options(cfg, "deq", DEQOptions)
        layer = plan.layers[0]
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.block = Block(build_mixer(layer.mixer, cfg, 0), build_ffn(layer.ffn, cfg, 0),
                           nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.forward_info: SolverInfo | None = None  # of the last forward solve
        self.backward_info: SolverInfo | None = None  # of the last adjoint solve
        self.weight_init = GPT2Init(init_seed, cfg.init_std, residual_layers=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init as LanguageModel's; residual outputs scaled as for a 1-layer stack."""
        self.weight_init(self)

    def f(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer map: z, x (B, L, D) -> (B, L, D); x plus the block's branches at z + x."""
        return self.block(z + x) - z

    def equilibrium(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) injected input -> z* (B, L, D), differentiable through the implicit function theorem."""
        B, L, D = x.shape
        o = self.opts

        def flat(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda v: fn(v.view(B, L, D)).reshape(B * L, D)

        with torch.no_grad():
            z_star, self.forward_info = anderson(flat(lambda z: self.f(z, x)), torch.zeros_like(x).view(B * L, D),
                                                 o.anderson_m, o.forward_max_iter, o.forward_tol, o.anderson_beta,
                                                 o.anderson_lam)
        z_star = z_star.view(B, L, D)
        z = self.f(z_star, x)  # one step on the graph: gradients reach θ and x through it
        if not z.requires_grad:
            return z
        z0 = z_star.detach().requires_grad_()
        with torch.enable_grad():
            f0 = self.f(z0, x.detach())  # graph for the VJPs with Jf(z*)

        def implicit_backward(grad: torch.Tensor) -> torch.Tensor:
            def adjoint(g: torch.Tensor) -> torch.Tensor:  # g -> g Jf(z*) + grad
                return torch.autograd.grad(f0, z0, g, retain_graph=True)[0] + grad

            g, self.backward_info = anderson(flat(adjoint), grad.reshape(B * L, D), o.anderson_m,
                                             o.backward_max_iter, o.backward_tol, o.anderson_beta, o.anderson_lam)
            return g.view(B, L, D)

        z.register_hook(implicit_backward)
        return z

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, V), or the mean fp32 cross-entropy against `labels` (B, L)."""
        z = self.equilibrium(self.embedding(input_ids))  # (B, L, D)
        logits = F.linear(self.norm(z), self.embedding.weight)  # tied head, (B, L, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
