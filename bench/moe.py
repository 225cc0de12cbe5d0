"""MoE layer cost and capacity, measured side by side in one run: ``python bench/moe.py``.

1. Forward + backward tokens/s of a Switch (top-1) and a GLaM (top-2) MoE layer against dense MLPs
   with the same active FLOPs per token (hidden size d_ffn for top-1, 2 * d_ffn for top-2), on one
   process (EP=1: the dispatch einsums and per-expert loop are the overhead measured).
2. Capacity factor 1.0 / 1.25 / 2.0 against the fraction of assignments dropped and the tokens/s,
   routing hidden states of the debug_switch model's shape. Inputs are a mixture of Gaussian
   clusters (real hidden states cluster; i.i.d. noise would route unrealistically evenly).
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.mlp import MLP
from hybrid_pretrain.models.ffn.moe import MoE


def tokens(n: int, d: int, clusters: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    which = torch.randint(0, clusters, (n,), generator=g)
    return centers[which] + 0.5 * torch.randn(n, d, generator=g)


def tokens_per_s(layers: list[torch.nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Forward + backward throughput of each layer, best of ``repeats`` after one warm-up.

    The layers take turns within each repeat, so a busy machine slows all of them alike.
    """
    best = [float("inf")] * len(layers)
    for i in range(repeats + 1):
        for j, layer in enumerate(layers):
            x_ = x.detach().requires_grad_()
            t0 = time.perf_counter()
            layer(x_).sum().backward()
            if i:
                best[j] = min(best[j], time.perf_counter() - t0)
    return [x.shape[0] / b for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per routing group (one rank's micro-batch)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    d, f, e = args.d_model, args.d_ffn, args.experts
    x = tokens(args.tokens, d, clusters=2 * e)

    def moe(top_k: int, factor: float) -> MoE:
        cfg = ModelConfig(d_model=d, d_ffn=f, n_heads=4, layers="H", ffn="E", num_experts=e, top_k=top_k,
                          capacity_factor=factor)
        return MoE(cfg, 0)

    def dense(hidden: int) -> MLP:
        return MLP(ModelConfig(d_model=d, d_ffn=hidden, n_heads=4, layers="H"), 0)

    print(f"d_model {d}, d_ffn {f}, {e} experts, {args.tokens} tokens per group, {torch.get_num_threads()} threads")
    print("\n1. MoE layer vs dense MLP of equal active FLOPs (forward + backward, capacity factor 1.25)")
    print(f"{'layer':<34}{'tokens/s':>12}{'vs dense':>10}{'params':>12}")
    for name, top_k, hidden in tqdm((("Switch top-1", 1, f), ("GLaM top-2", 2, 2 * f)), desc="dense vs MoE",
                                    leave=False):
        mlp, layer = dense(hidden), moe(top_k, 1.25)
        dense_tps, moe_tps = tokens_per_s([mlp, layer], x, args.repeats)
        dense_n, moe_n = sum(p.numel() for p in mlp.parameters()), sum(p.numel() for p in layer.parameters())
        tqdm.write(f"{'dense MLP d_ffn=' + str(hidden):<34}{dense_tps:>12,.0f}{1.0:>10.2f}{dense_n:>12,}")
        tqdm.write(f"{name + f' ({e} x d_ffn={f})':<34}{moe_tps:>12,.0f}{moe_tps / dense_tps:>10.2f}{moe_n:>12,}")

    print("\n2. Capacity factor vs dropped assignments (training mode) and throughput")
    print(f"{'router':<14}{'factor':>8}{'capacity':>10}{'dropped':>10}{'tokens/s':>12}{'vs cf 1.0':>11}")
    for name, top_k in (("Switch top-1", 1), ("GLaM top-2", 2)):
        factors = (1.0, 1.25, 2.0)
        layers = [moe(top_k, factor) for factor in factors]
        for layer in layers:
            layer.load_state_dict(layers[0].state_dict())  # same router and experts: only the capacity differs
        speeds = tokens_per_s(layers, x, args.repeats)
        for factor, layer, tps in zip(factors, layers, speeds):
            layer(x)
            dropped, cap = layer.last.dropped_fraction.item(), layer.last.capacity
            print(f"{name:<14}{factor:>8.2f}{cap:>10}{dropped:>10.1%}{tps:>12,.0f}{tps / speeds[0]:>11.2f}")


if __name__ == "__main__":
    main()
