"""Ranks of the expert x tensor / expert x pipeline equivalence test (launched by test_expert_composition.py).

One launch of 4 ranks runs each layout in LAYOUTS in turn, re-forming the groups between them: the same
small hybrid H3/attention + MoE model (``HAHA`` with ffn ``DEDE``, 4 experts) from the same seed, on
the same global batches as tests/parallel/tp_pp_worker.py, for ``STEPS`` AdamW steps with clipping below
the gradient norm. Rank 0 records every step's loss (cross-entropy + aux + z), the engine's gradient
norm, the full gradients before each update and the final weights, all in single-rank names (TP shards
gathered, pipeline stages and expert-parallel slices assembled), plus the MoE metrics of the last
micro-batch. Rank 0 also runs the single-rank reference.

Routing groups: the load-balancing loss (and capacity) are computed per routed group, i.e. per rank's
micro-batch, so the reference cuts the global batch into the same ``DP x micro-batches`` groups, runs
the model on each and averages their losses. Dropless layouts send each rank exactly its rows (variable
all-to-all splits); the ``_capacity`` layouts use capacity factor 1.0 with a minimum of 2 slots, which
drops tokens, and the reference drops exactly the same ones.

``--ckpt``: layouts in CKPT_LAYOUTS also save after step 2 and resume that checkpoint into a fresh engine.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.parallel import engine as ds_engine
from hybrid_pretrain.parallel import groups, pipeline
from hybrid_pretrain.parallel.build import build_model
from hybrid_pretrain.parallel.expert import expert_parallel_rank, single_rank_expert_name
from hybrid_pretrain.parallel.tensor import full_state
from hybrid_pretrain.tests.parallel.tp_pp_worker import (
    CLIP,
    SEED,
    SEQ,
    STEPS,
    VOCAB,
    _assemble,
    capture_step_grads,
    global_batch,
    run_layouts,
    train_config,
)
from hybrid_pretrain.training import checkpoint
from hybrid_pretrain.training.config import ParallelConfig
from hybrid_pretrain.training.loop import train_step
from hybrid_pretrain.training.optimizer import param_groups

NUM_EXPERTS = 4
LAYOUTS = {  # name: (tensor, pipeline, expert, zero stage, micro-batches per step, top-k, dropless)
    "ep2_tp2_top2": (2, 1, 2, 1, 1, 2, True),
    "ep2_pp2_top1": (1, 2, 2, 1, 2, 1, True),
    "ep2_tp2_top1_capacity": (2, 1, 2, 1, 1, 1, False),
    "ep2_pp2_top2_capacity": (1, 2, 2, 1, 2, 2, False),
    "ep2_pp2_zero2_top2": (1, 2, 2, 2, 2, 2, True),  # the 1F1B schedule of parallel/one_f_one_b.py
    "ep2_tp2_pp2_top2": (2, 2, 2, 1, 2, 2, True),  # 8 ranks: run by hand (deepspeed --num_gpus 8 ... --layouts ...)
}
CKPT_LAYOUTS = ("ep2_tp2_top2", "ep2_pp2_top1", "ep2_tp2_pp2_top2", "ep2_pp2_zero2_top2")


def model_config(top_k: int, dropless: bool) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, layers="HAHA", ffn="DEDE", h3_d_state=8,
                       h3_head_dim=2, max_seq_len=SEQ, num_experts=NUM_EXPERTS, top_k=top_k, moe_dropless=dropless,
                       capacity_factor=1.0, min_capacity=2)


def reference(top_k: int, n_groups: int, dropless: bool) -> dict:
    """The single-rank run in plain PyTorch, routing the global batch in ``n_groups`` groups as the layout does."""
    from hybrid_pretrain.models.lm import LanguageModel

    torch.manual_seed(SEED)
    model = LanguageModel(model_config(top_k, dropless))
    t = train_config(0, 1, 1)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, t.lr,
                            t.weight_decay)], lr=t.lr, betas=tuple(t.betas), eps=1e-8)
    out: dict = {"losses": [], "norms": [], "grads": [], "weights_after": [], "group_metrics": []}
    out["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(STEPS):
        losses, metrics = [], []
        for chunk in global_batch(step).chunk(n_groups, dim=0):
            losses.append(model(chunk[:, :-1], labels=chunk[:, 1:]))
            metrics.append(model.moe_metrics())
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        out["losses"].append(loss.item())
        out["group_metrics"].append(metrics)
        out["weights_after"].append({n: p.detach().clone() for n, p in model.named_parameters()})
    out["weights"] = out["weights_after"][-1]
    return out


def build_engine(name: str, dp: int):
    tp, pp, ep, zero, micro, top_k, dropless = LAYOUTS[name]
    par = ParallelConfig(tensor=tp, pipeline=pp, expert=ep)
    t = train_config(zero, micro, dp)
    cfg = model_config(top_k, dropless)
    model = build_model(cfg, par, SEED, dp)  # this rank's tensor slice, stage and experts
    pipe_name = getattr(model, "lm_name", lambda n: n)
    ep_rank, n_local = expert_parallel_rank(ep), NUM_EXPERTS // ep

    def rename(n: str) -> str:
        return single_rank_expert_name(pipe_name(n), ep_rank, n_local)

    initial = _assemble(full_state(model, rename))  # every rank's slice, stage and experts before training
    mpu = ds_engine.MegatronMPU() if tp > 1 and pp == 1 else None
    ds_config = {**ds_engine.deepspeed_config(t, dp), **pipeline.deepspeed_config(cfg)}
    engine = ds_engine.initialize(model, param_groups(model, t.lr, t.weight_decay), ds_config, lambda step: 1.0,
                                  mpu=mpu)
    return engine, rename, initial


def _dp_mean(values: dict[str, float]) -> dict[str, float]:
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t, group=groups.data_parallel_group())
    return dict(zip(values, (t / dist.get_world_size(groups.data_parallel_group())).tolist()))


def _step(engine, step: int, dp: int, dp_rank: int, micro: int, pp: int) -> tuple[float, float | None]:
    micro_batches = global_batch(step).chunk(dp, dim=0)[dp_rank].chunk(micro, dim=0)
    loss, norm = train_step(engine, iter(micro_batches), micro)
    # Pipeline losses come back as data-parallel means already.
    return (loss if pp > 1 else _dp_mean({"loss": loss})["loss"]), norm


def _metrics(engine) -> dict[str, float]:
    module = engine.module
    return _dp_mean(module.step_metrics() if hasattr(module, "step_metrics") else module.moe_metrics())


def run_layout(name: str, ckpt: Path | None) -> dict:
    tp, pp, ep, zero, micro, top_k, dropless = LAYOUTS[name]
    ctx = groups.initialize(ParallelConfig(tensor=tp, pipeline=pp, expert=ep))
    dp = ctx.dp_size
    engine, rename, initial = build_engine(name, dp)
    grads = capture_step_grads(engine, rename)
    out: dict = {"losses": [], "norms": [], "metrics": [], "initial": initial}
    for step in range(STEPS):
        loss, norm = _step(engine, step, dp, ctx.dp_rank, micro, pp)
        out["losses"].append(loss)
        out["norms"].append(norm)
        out["metrics"].append(_metrics(engine))
        if ckpt is not None and step == STEPS - 2:
            checkpoint.save(engine, ckpt, step + 1, {"step": step + 1}, keep=1)
            out["saved_weights"] = _assemble(full_state(engine.module, rename))
    out["grads"] = grads
    out["weights"] = _assemble(full_state(engine.module, rename))
    if ckpt is not None:  # a fresh engine resumed from the step-2 checkpoint repeats step 3
        engine2, _, _ = build_engine(name, dp)
        checkpoint.load(engine2, ckpt)
        out["resumed_loss"], _ = _step(engine2, STEPS - 1, dp, ctx.dp_rank, micro, pp)
        out["resumed_weights"] = _assemble(full_state(engine2.module, rename))
    dist.barrier()
    groups.reset_model_parallel()
    return out


def main() -> None:
    try:
        results, out = run_layouts(__doc__, LAYOUTS, CKPT_LAYOUTS, run_layout)
        if dist.get_rank() == 0:
            references: dict = {}
            for name in results:
                tp, pp, ep, zero, micro, top_k, dropless = LAYOUTS[name]
                key = (top_k, dist.get_world_size() // (tp * pp) * micro, dropless)  # top-k, routing groups, dropless
                if key not in references:
                    references[key] = reference(*key)
            torch.save({**results, "reference": references}, out)
    finally:
        groups.destroy()


if __name__ == "__main__":
    main()
