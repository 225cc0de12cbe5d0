"""One rank of the expert-parallel equivalence test (launched by tests/parallel/test_moe_expert_parallel.py).

``--mode train``: for ZeRO-0 (without clipping, so the gradients are compared as computed) and
ZeRO-1 (clipping at 1.0 by the global norm), builds the same tiny MoE hybrid from one seed, wraps it for
``--ep`` expert parallelism, and trains 4 steps on fixed per-rank batches. Writes (rank 0) the
gradients of the first step keyed by *global* expert id, the DP-mean losses and grad norms, and, for
the ZeRO-1 run, saves a checkpoint and the eval-mode logits on a fixed input.
``--mode load``: builds the model at ``--ep``, loads that checkpoint (weights only) and writes the logits.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.parallel import engine as ds_engine
from hybrid_pretrain.parallel import groups
from hybrid_pretrain.parallel.expert import parallelize_experts
from hybrid_pretrain.training import checkpoint
from hybrid_pretrain.training.config import ParallelConfig, TrainConfig
from hybrid_pretrain.training.optimizer import param_groups

STEPS = 4
EXPERT_KEY = re.compile(r"^(.*)\.experts\.(?:mlps|deepspeed_moe\.experts\.deepspeed_experts)\.(\d+)\.(.*)$")


def model_config(top_k: int) -> ModelConfig:
    return ModelConfig(vocab_size=96, d_model=32, n_heads=4, layers="HAHA", ffn="EDED", h3_d_state=8,
                       max_seq_len=64, num_experts=4, top_k=top_k, capacity_factor=1.0, min_capacity=2)


def build_engine(top_k: int, ep: int, zero: int):
    torch.manual_seed(0)
    model = parallelize_experts(LanguageModel(model_config(top_k)), ep)
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
        engine = build_engine(args.top_k, args.ep, zero)
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
    engine = build_engine(args.top_k, args.ep, 1)
    tag = checkpoint.latest_tag(Path(args.ckpt))
    path, _ = engine.load_checkpoint(args.ckpt, tag=tag, load_module_only=True, load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    assert path is not None, f"could not load {args.ckpt}/{tag}"
    if dist.get_rank() == 0:
        torch.save({"logits": probe_logits(engine)}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("train", "load"), required=True)
    parser.add_argument("--ep", type=int, required=True)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    groups.initialize(ParallelConfig(expert=args.ep))
    try:
        train(args) if args.mode == "train" else load(args)
    finally:
        groups.destroy()


if __name__ == "__main__":
    main()
