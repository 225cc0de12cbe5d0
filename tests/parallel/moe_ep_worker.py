"""One rank of the expert-parallel equivalence test (launched by tests/parallel/test_moe_expert_parallel.py).

``--mode train``: for ZeRO-0 (without clipping, so the gradients are compared as computed) and
ZeRO-1 (clipping at 1.0 by the global norm), builds the same tiny MoE hybrid from one seed, wraps it for
``--ep`` expert parallelism, and trains 4 steps on fixed per-rank batches. Writes (rank 0) the
gradients of the first step keyed by *global* expert id, the DP-mean losses and grad norms, rank 0's MoE
metrics, and, for the ZeRO-1 run, saves a checkpoint and the eval-mode logits on a fixed input.
Dropless routing unless ``--capacity`` (capacity factor 1.0: tokens dropped).
``--mode load``: builds the model at ``--ep``, loads that checkpoint (weights only) and writes the logits.
``--mode exchange``: one dropless MoE layer at EP=2 on hand-routed tokens whose splits include zeros (rank 0
sends nothing to rank 1, expert 3 gets no token anywhere) against the same layer with every expert local.
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.moe import MoE
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.parallel import engine as ds_engine
from hybrid_pretrain.parallel import groups
from hybrid_pretrain.parallel.expert import parallelize_experts
from hybrid_pretrain.training import checkpoint
from hybrid_pretrain.training.config import ParallelConfig, TrainConfig
from hybrid_pretrain.training.optimizer import param_groups

STEPS = 4
EXPERT_KEY = re.compile(r"^(.*)\.experts\.(?:mlps|deepspeed_moe\.experts\.deepspeed_experts)\.(\d+)\.(.*)$")


def model_config(top_k: int, dropless: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=96, d_model=32, n_heads=4, layers="HAHA", ffn="EDED", h3_d_state=8,
                       max_seq_len=64, num_experts=4, top_k=top_k, moe_dropless=dropless, capacity_factor=1.0,
                       min_capacity=2)


def build_engine(top_k: int, ep: int, zero: int, dropless: bool = True):
    torch.manual_seed(0)
    model = parallelize_experts(LanguageModel(model_config(top_k, dropless)), ep)
    train = TrainConfig(micro_batch_size=2, lr=1e-2, warmup_steps=0, weight_decay=0.1, zero_stage=zero,
                        grad_clip=1.0 if zero else 0.0)
    return ds_engine.initialize(model, param_groups(model, train.lr, train.weight_decay),
                                ds_engine.deepspeed_config(train, dist.get_world_size()), lambda step: 1.0)


def global_name(name: str, ep: int) -> str:
    """Rename a local expert parameter to its global expert id (this rank holds experts ep_rank*E/EP onwards)."""
    m = EXPERT_KEY.match(name)
    if not m:
        return name
    n_local = 4 // ep
    ep_rank = dist.get_rank() % ep  # consecutive ranks form an expert-parallel group
    return f"{m.group(1)}.expert{ep_rank * n_local + int(m.group(2))}.{m.group(3)}"


def gathered_grads(engine, ep: int) -> dict[str, torch.Tensor]:
    mine = {global_name(n, ep): p.grad.detach().clone() for n, p in engine.module.named_parameters()}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    merged: dict[str, torch.Tensor] = {}
    for d in every:
        merged.update(d)  # non-expert grads are identical on every rank after the all-reduce
    return merged


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randint(0, 96, (2, 17), generator=g)


def probe_logits(engine) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(7))
        return engine(ids).float()


def train(args) -> None:
    results: dict = {}
    for zero in (0, 1):
        engine = build_engine(args.top_k, args.ep, zero, dropless=not args.capacity)
        losses, norms = [], []
        for step in range(STEPS):
            b = batch(step)
            loss = engine(b[:, :-1], labels=b[:, 1:])
            engine.backward(loss)
            if step == 0 and zero == 0:
                results["grads"] = gathered_grads(engine, args.ep)
            engine.step()
            t = loss.detach().reshape(1)
            dist.all_reduce(t)
            losses.append(t.item() / dist.get_world_size())
            norm = engine.get_global_grad_norm()
            norms.append(None if norm is None else float(norm))
        results[f"losses_zero{zero}"] = losses
        results[f"norms_zero{zero}"] = norms
        results[f"metrics_zero{zero}"] = engine.module.moe_metrics()
        if zero == 1:
            checkpoint.save(engine, Path(args.ckpt), STEPS, {"step": STEPS}, keep=1)
            results["logits"] = probe_logits(engine)
    if dist.get_rank() == 0:
        torch.save(results, args.out)


def load(args) -> None:
    engine = build_engine(args.top_k, args.ep, 1, dropless=not args.capacity)
    tag = checkpoint.latest_tag(Path(args.ckpt))
    path, _ = engine.load_checkpoint(args.ckpt, tag=tag, load_module_only=True, load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    assert path is not None, f"could not load {args.ckpt}/{tag}"
    if dist.get_rank() == 0:
        torch.save({"logits": probe_logits(engine)}, args.out)


def exchange(args) -> None:
    """Rank 0's 6 tokens route to experts 0 and 1 only (its own at EP=2), rank 1's 5 tokens to experts 0-2."""
    rank, d = dist.get_rank(), 8
    torch.manual_seed(0)
    local = MoE(ModelConfig(d_model=d, d_ffn=16, layers="H", ffn="E", num_experts=4, top_k=args.top_k), 0)
    with torch.no_grad():
        local.router.weight.copy_(torch.eye(4, d))  # logits = x[:, :4]: token 3 e_j + noise picks expert j first
    parallel = parallelize_experts(copy.deepcopy(local), 2)
    first = [0, 1, 0, 0, 1, 0] if rank == 0 else [2, 0, 2, 1, 2]
    g = torch.Generator().manual_seed(rank)
    x = 3.0 * torch.eye(d)[first] + 0.1 * torch.randn(len(first), d, generator=g)
    x[:, 1] += 1.5 * torch.tensor([f != 1 for f in first])  # second choices: expert 1, or 0 after a first 1
    x[:, 0] += 1.5 * torch.tensor([f == 1 for f in first])
    target = torch.randn(len(first), d, generator=g)
    out: dict = {}
    for name, layer in (("local", local), ("ep2", parallel)):
        x_ = x.clone().requires_grad_()
        y = layer(x_)
        (y - target).square().sum().backward()
        experts = {}
        for n, p in layer.named_parameters():
            if n.startswith("experts."):  # experts.mlps.<global id>.w_in or (EP=2) experts...deepspeed_experts.<local>
                *_, e, tensor = n.split(".")
                experts[f"expert{int(e) + (2 * rank if name == 'ep2' else 0)}.{tensor}"] = p.grad.clone()
        out[name] = {"y": y.detach(), "x_grad": x_.grad, "router_grad": layer.router.weight.grad.clone(),
                     "tokens": layer.last.tokens_per_expert.tolist(), "experts": experts}
    # Expert gradients: at EP=1 each rank holds its own tokens' share; at EP=2 the owner holds the sum over ranks.
    for grad in out["local"]["experts"].values():
        dist.all_reduce(grad)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    if rank == 0:
        torch.save(every, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("train", "load", "exchange"), required=True)
    parser.add_argument("--ep", type=int, required=True)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--capacity", action="store_true", help="capacity-based routing (drops tokens)")
    parser.add_argument("--ckpt", default="")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    groups.initialize(ParallelConfig(expert=args.ep))
    try:
        {"train": train, "load": load, "exchange": exchange}[args.mode](args)
    finally:
        groups.destroy()


if __name__ == "__main__":
    main()
