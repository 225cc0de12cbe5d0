"""MoE layer speed against the dense MLP of equal active FLOPs, side by side in one run: ``python bench/moe.py``.

1. Forward + backward tokens/s of Switch (top-1) and GLaM (top-2) MoE layers, dropless and with capacity
   factor 1.25, against dense MLPs with the same active FLOPs per token (hidden size d_ffn for top-1,
   2 * d_ffn for top-2), at each thread count and expert count, on one process (EP=1: sorting, gathers,
   expert matmuls and combine are the overhead measured). Router included.
2. Capacity factor 1.0 / 1.25 / 2.0 against dropless: fraction of assignments dropped and tokens/s.
3. The expert matmul path: ``kernels.grouped_linear``'s fused per-expert loop against torch's ``grouped_mm``
   (weights stacked per call, as the layer would have to) and the F.linear-and-cat reference, on the same
   sorted rows.

Inputs are a mixture of Gaussian clusters (real hidden states cluster; i.i.d. noise would route
unrealistically evenly). Every layer takes its turn within each repeat, so a busy machine slows all of them
alike, and the fastest repeat counts (with one thread, in thread CPU time; see ``clock``); gradients are reset
to None before each pass, as a training step's ``zero_grad`` does. The last line states the worst dropless
ratio of each router over all settings, for scripts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from hybrid_pretrain.base.malloc import OPT_OUT, keep_freed_memory
from hybrid_pretrain.kernels.grouped_linear import grouped_linear
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.mlp import MLP
from hybrid_pretrain.models.ffn.moe import MoE


def tokens(n: int, d: int, clusters: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    which = torch.randint(0, clusters, (n,), generator=g)
    return centers[which] + 0.5 * torch.randn(n, d, generator=g)


def clock() -> float:
    """With one thread, the CPU time of this thread, which is where torch computes then (the autograd engine runs
    CPU backward passes on the calling thread): time the OS gives other jobs on a shared machine is not counted.
    With more threads, wall-clock time."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def best_times(passes: list[Callable[[], None]], params: list[list[nn.Parameter]], repeats: int) -> list[float]:
    """Fastest of ``repeats`` timings of each pass after one warm-up, the passes taking turns."""
    best = [float("inf")] * len(passes)
    for i in range(repeats + 1):
        for j, run in enumerate(passes):
            for p in params[j]:
                p.grad = None
            t0 = clock()
            run()
            if i:
                best[j] = min(best[j], clock() - t0)
    return best


def layer_pass(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer(x.detach().requires_grad_()).backward(dy)
    return run


def tokens_per_s(layers: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    dy = torch.randn_like(x)
    times = best_times([layer_pass(m, x, dy) for m in layers], [list(m.parameters()) for m in layers], repeats)
    return [x.shape[0] / t for t in times]


def moe(d: int, f: int, e: int, top_k: int, dropless: bool, factor: float = 1.25) -> MoE:
    cfg = ModelConfig(d_model=d, d_ffn=f, n_heads=4, layers="H", ffn="E", num_experts=e, top_k=top_k,
                      moe_dropless=dropless, capacity_factor=factor)
    return MoE(cfg, 0)


def dense(d: int, hidden: int) -> MLP:
    return MLP(ModelConfig(d_model=d, d_ffn=hidden, n_heads=4, layers="H"), 0)


def same_weights(layers: list[MoE]) -> list[MoE]:
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())  # same router and experts: only the dispatch differs
    return layers


def versus_dense(d: int, f: int, e: int, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Section 1 for one expert count; returns the dropless ratios."""
    print(f"{'layer':<36}{'tokens/s':>12}{'vs dense':>10}{'params':>13}")
    ratios = {}
    for name, top_k in (("Switch", 1), ("GLaM", 2)):
        layers = [dense(d, top_k * f), *same_weights([moe(d, f, e, top_k, True), moe(d, f, e, top_k, False)])]
        speeds = tokens_per_s(layers, x, repeats)
        labels = [f"dense MLP d_ffn={top_k * f}", f"{name} top-{top_k} dropless", f"{name} top-{top_k} capacity 1.25"]
        for label, layer, tps in zip(labels, layers, speeds):
            n = sum(p.numel() for p in layer.parameters())
            print(f"{label:<36}{tps:>12,.0f}{tps / speeds[0]:>10.2f}{n:>13,}")
        ratios[name] = speeds[1] / speeds[0]
    return ratios


def capacity_factors(d: int, f: int, e: int, x: torch.Tensor, repeats: int) -> None:
    """Section 2: tokens/s and drops against the capacity factor, dropless beside them."""
    print(f"{'router':<10}{'dispatch':>16}{'slots/expert':>14}{'dropped':>10}{'tokens/s':>12}{'vs dropless':>13}")
    for name, top_k in (("Switch", 1), ("GLaM", 2)):
        factors = (1.0, 1.25, 2.0)
        layers = same_weights([moe(d, f, e, top_k, True), *(moe(d, f, e, top_k, False, c) for c in factors)])
        speeds = tokens_per_s(layers, x, repeats)
        for label, layer, tps in zip(("dropless", *(f"capacity {c:g}" for c in factors)), layers, speeds):
            layer(x)
            slots = "-" if layer.last.dropless else str(layer.last.capacity)
            print(f"{name:<10}{label:>16}{slots:>14}{layer.last.dropped_fraction.item():>10.1%}{tps:>12,.0f}"
                  f"{tps / speeds[0]:>13.2f}")


def matmul_paths(d: int, f: int, e: int, x: torch.Tensor, repeats: int) -> None:
    """Section 3: the two grouped_linear paths on the rows a dropless Switch layer sorts, forward + backward."""
    layer = moe(d, f, e, 1, True)
    counts = torch.bincount(layer.router(x).expert_index.flatten(), minlength=e).tolist()
    experts = list(layer.experts.mlps)
    params = [p for m in experts for p in m.parameters()]

    def run(path: str) -> Callable[[], None]:
        def mlp() -> None:
            h = grouped_linear(x.detach().requires_grad_(), [m.w_in for m in experts], [m.b_in for m in experts],
                               counts, path=path)
            y = grouped_linear(torch.nn.functional.gelu(h, approximate="tanh"), [m.w_out for m in experts],
                               [m.b_out for m in experts], counts, path=path)
            y.backward(torch.ones_like(y))
        return mlp

    paths = ("loop", "grouped_mm", "reference")
    times = best_times([run(p) for p in paths], [params] * len(paths), repeats)
    speeds = ", ".join(f"{p} {x.shape[0] / t:,.0f}" for p, t in zip(paths, times))
    versus = ", ".join(f"{p} {times[0] / t:.2f}" for p, t in zip(paths[1:], times[1:]))
    print(f"expert MLPs on sorted rows, tokens/s: {speeds}; speed vs loop: {versus}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ffn", type=int, default=1024)
    parser.add_argument("--experts", default="8,64", help="comma-separated expert counts")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per routing group (one rank's micro-batch)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sections", default="1,2,3", help="which of the sections 1-3 to run")
    args = parser.parse_args()
    print(f"malloc: {keep_freed_memory()} ({OPT_OUT}=system for glibc's defaults)", flush=True)
    d, f = args.d_model, args.d_ffn
    sections = {int(s) for s in args.sections.split(",")}
    worst: dict[str, tuple[float, str]] = {}
    print(f"torch {torch.__version__}; d_model {d}, d_ffn {f}, {args.tokens} tokens per group, forward + backward")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for e in map(int, args.experts.split(",")):
            torch.manual_seed(0)
            x = tokens(args.tokens, d, clusters=2 * e)
            where = f"{threads} thread{'s' * (threads > 1)}, {e} experts"
            if 1 in sections:
                print(f"\n1. MoE layer vs dense MLP of equal active FLOPs: {where}")
                for name, ratio in versus_dense(d, f, e, x, args.repeats).items():
                    if ratio < worst.get(name, (float("inf"), ""))[0]:
                        worst[name] = (ratio, where)
            if 2 in sections:
                print(f"\n2. Capacity factor vs dropless (training mode): {where}")
                capacity_factors(d, f, e, x, args.repeats)
            if 3 in sections:
                print(f"\n3. Expert matmul path: {where}")
                matmul_paths(d, f, e, x, args.repeats)
    if worst:
        print("\n" + ", ".join(f"{name} at {where}: {ratio:.2f}" for name, (ratio, where) in worst.items()))
        print("dropless tokens/s vs dense MLP of equal active FLOPs (worst setting): "
              + " ".join(f"{name.lower()}={ratio:.3f}" for name, (ratio, _) in worst.items()))


if __name__ == "__main__":
    main()
