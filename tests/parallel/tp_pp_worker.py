"""Ranks of the tensor/pipeline/ZeRO equivalence test (launched by tests/parallel/test_tensor_pipeline.py).

One launch of 4 ranks runs several layouts in turn, re-forming megatron-core's groups between them:
each trains the same small hybrid H3-attention model from the same seed on the same global batches
for ``STEPS`` optimizer steps through DeepSpeed's engine, and rank 0 records the losses, the engine's
gradient norms, the full (TP-gathered, PP-assembled) gradients of every optimizer step before the
update, and the full weights at the end. Rank 0 also runs the single-rank reference: the same model
at TP=PP=1 in plain PyTorch (AdamW, clipping by the global norm, the same LR schedule) on the whole
global batch. ``--ckpt``: the layouts in CKPT_LAYOUTS also save a checkpoint after step 2 (recording the
weights saved) and resume it into a fresh engine, recording that run's step-3 loss and weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.parallel import engine as ds_engine
from hybrid_pretrain.parallel import groups, pipeline, sequence
from hybrid_pretrain.parallel.build import build_model
from hybrid_pretrain.parallel.tensor import full_state, gather
from hybrid_pretrain.training import checkpoint
from hybrid_pretrain.training.config import ParallelConfig, TrainConfig
from hybrid_pretrain.training.loop import train_step
from hybrid_pretrain.training.optimizer import param_groups

STEPS = 3
SEED = 0
GLOBAL_BATCH = 8  # sequences per optimizer step, across data-parallel ranks and micro-batches
SEQ = 24
VOCAB = 128
CLIP = 0.05  # below the gradient norm at every step, so clipping acts and a wrong TP/PP norm would show
LAYOUTS = {  # name: (tensor, pipeline, zero stage, micro-batches per step, activation checkpointing, tied head)
    "tp2_dp2_zero1": (2, 1, 1, 1, False, True),
    "pp2_dp2_zero1_ckpt": (1, 2, 1, 2, True, True),
    "tp2_pp2_zero1": (2, 2, 1, 2, False, True),
    "dp4_zero3": (1, 1, 3, 1, False, True),
    "tp2_dp2_zero2_untied": (2, 1, 2, 1, False, False),
    "tp2_pp2_zero1_untied": (2, 2, 1, 2, False, False),
    "tp2_dp2_zero0": (2, 1, 0, 1, False, True),
    "tp2_dp2_zero3": (2, 1, 3, 1, False, True),
    "tp2_dp2_sp_zero1": (2, 1, 1, 1, False, True),
    "tp2_dp2_sp_ckpt_zero2_untied": (2, 1, 2, 1, True, False),
    "tp2_pp2_sp": (2, 2, 1, 2, False, True),
    "pp2_dp2_zero2": (1, 2, 2, 2, False, True),
    "tp2_pp2_zero2": (2, 2, 2, 2, False, True),
    "pp4_zero2_ckpt": (1, 4, 2, 4, True, True),
    "pp4_zero1": (1, 4, 1, 4, False, True),
    "tp2_dp2_dropout": (2, 1, 1, 1, False, True),
    "tp2_dp2_sp_ckpt_dropout": (2, 1, 1, 1, True, True),
}
SEQUENCE_PARALLEL = {"tp2_dp2_sp_zero1", "tp2_dp2_sp_ckpt_zero2_untied", "tp2_pp2_sp",
                     "tp2_dp2_sp_ckpt_dropout"}  # parallel.sequence_parallel on
# model.dropout=DROPOUT: no single-rank reference (other masks); the test checks the tensor ranks stay in step.
DROPOUT_LAYOUTS = {"tp2_dp2_dropout", "tp2_dp2_sp_ckpt_dropout"}
DROPOUT = 0.1

# Also save after step 2 and resume into a fresh engine.
CKPT_LAYOUTS = ("tp2_pp2_zero1", "tp2_dp2_zero1", "tp2_dp2_zero3", "pp2_dp2_zero2", "tp2_dp2_sp_ckpt_dropout")


def model_config(tied: bool = True, dropout: float = 0.0) -> ModelConfig:
    # The debug hybrid's pattern at a smaller width; H3 head_dim 2 exercises the strided output split.
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, layers="HHAH", h3_d_state=8, h3_head_dim=2,
                       max_seq_len=SEQ, tie_embeddings=tied, dropout=dropout)


def train_config(zero: int, micro: int, dp: int) -> TrainConfig:
    return TrainConfig(micro_batch_size=GLOBAL_BATCH // (dp * micro), grad_accum=micro, lr=1e-2, warmup_steps=0,
                       weight_decay=0.1, grad_clip=CLIP, zero_stage=zero, precision="fp32")


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def reference(tied: bool) -> dict:
    """The single-rank run in plain PyTorch: what every layout must reproduce."""
    from hybrid_pretrain.models.lm import LanguageModel

    torch.manual_seed(SEED)
    model = LanguageModel(model_config(tied))
    out: dict = {"losses": [], "norms": [], "grads": []}
    out["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = train_config(0, 1, 1)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, t.lr,
                            t.weight_decay)], lr=t.lr, betas=tuple(t.betas), eps=1e-8)
    for step in range(STEPS):
        b = global_batch(step)
        loss = model(b[:, :-1], labels=b[:, 1:])
        opt.zero_grad()
        loss.backward()
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        out["losses"].append(loss.item())
    out["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _assemble(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every pipeline stage's (already TP-gathered) tensors, merged on every rank."""
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    merged: dict[str, torch.Tensor] = {}
    for part in every:
        merged.update(part)
    return merged


def _full_grads(engine, rename) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in engine.module.named_parameters():
        if getattr(p, "ds_pipe_replicated", False):
            continue  # the last stage's copy of the tied matrix; the first stage holds its whole gradient
        out[rename(name)] = gather(safe_get_full_grad(p).detach().clone(), p)
    return _assemble(out)


def capture_step_grads(engine, rename) -> list[dict[str, torch.Tensor]]:
    """A list that receives the full averaged gradients just before each optimizer update (and clipping)."""
    grads: list = []
    inner = getattr(engine, "ds_engine", engine)  # ZeRO-2 pipelines: the DeepSpeed engine inside the 1F1B schedule
    original = inner._take_model_step

    def capture(*args, **kwargs):
        grads.append(_full_grads(engine, rename))
        return original(*args, **kwargs)

    inner._take_model_step = capture
    return grads


def _replicated_spread(module) -> float:
    """The largest difference of a replicated (not tensor-split) parameter between tensor ranks, over all ranks."""
    from hybrid_pretrain.parallel.tensor import is_sharded, tensor_parallel_group, tensor_parallel_size

    worst = torch.zeros(())
    if tensor_parallel_size() > 1:
        for p in module.parameters():
            if not is_sharded(p):
                copies = [torch.empty_like(p) for _ in range(tensor_parallel_size())]
                dist.all_gather(copies, p.detach().contiguous(), group=tensor_parallel_group())
                worst = torch.maximum(worst, max((c - copies[0]).abs().max() for c in copies))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def build_engine(par: ParallelConfig, t: TrainConfig, dp: int, tied: bool, dropout: float = 0.0):
    """(engine, this rank's names -> single-rank names, the full initial weights as every rank built them)."""
    model = build_model(model_config(tied, dropout), par, SEED, dp)
    rename = getattr(model, "lm_name", lambda n: n)
    initial = _assemble(full_state(model, rename))
    mpu = ds_engine.MegatronMPU() if par.tensor > 1 and par.pipeline == 1 else None
    ds_config = {**ds_engine.deepspeed_config(t, dp), **pipeline.deepspeed_config(model_config(tied))}
    engine = ds_engine.initialize(model, param_groups(model, t.lr, t.weight_decay), ds_config, lambda step: 1.0,
                                  mpu=mpu)
    return engine, rename, initial


def run_layout(name: str, ckpt: Path | None) -> dict:
    tp, pp, zero, micro, checkpointing, tied = LAYOUTS[name]
    par = ParallelConfig(tensor=tp, pipeline=pp, activation_checkpointing=checkpointing,
                         sequence_parallel=name in SEQUENCE_PARALLEL)
    ctx = groups.initialize(par)
    sequence.set_enabled(par.sequence_parallel)
    dp = ctx.dp_size
    t = train_config(zero, micro, dp)
    dropout = DROPOUT if name in DROPOUT_LAYOUTS else 0.0
    engine, rename, initial = build_engine(par, t, dp, tied, dropout)
    grads = capture_step_grads(engine, rename)
    out: dict = {"losses": [], "norms": [], "initial": initial}
    for step in range(STEPS):
        micro_batches = global_batch(step).chunk(dp, dim=0)[ctx.dp_rank].chunk(micro, dim=0)
        loss, norm = train_step(engine, iter(micro_batches), micro)
        lt = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(lt, group=groups.data_parallel_group())  # pipeline losses are DP means already: same
        out["losses"].append(lt.item() / dp if pp == 1 else loss)
        out["norms"].append(norm)
        if ckpt is not None and step == STEPS - 2:
            checkpoint.save(engine, ckpt, step + 1, {"step": step + 1}, keep=1)
            out["saved_weights"] = _assemble(full_state(engine.module, rename))
    out["grads"] = grads
    out["weights"] = _assemble(full_state(engine.module, rename))
    out["replicated_spread"] = _replicated_spread(engine.module)
    if ckpt is not None:  # a fresh engine resumed from the step-2 checkpoint repeats step 3
        engine2, _, _ = build_engine(par, t, dp, tied, dropout)
        checkpoint.load(engine2, ckpt)
        micro_batches = global_batch(STEPS - 1).chunk(dp, dim=0)[ctx.dp_rank].chunk(micro, dim=0)
        loss, _ = train_step(engine2, iter(micro_batches), micro)
        lt = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(lt, group=groups.data_parallel_group())
        out["resumed_loss"] = lt.item() / dp if pp == 1 else loss
        out["resumed_weights"] = _assemble(full_state(engine2.module, rename))
    _reset_groups()
    return out


def _reset_groups() -> None:
    """Drop the model-parallel groups (the default group stays) so the next layout can form its own."""
    dist.barrier()
    groups.reset_model_parallel()
    sequence.set_enabled(False)


def run_layouts(description: str, layouts: dict, ckpt_layouts: tuple[str, ...], run) -> tuple[dict, Path]:
    """A layout worker's command line: ``run(name, ckpt folder or None)`` for each layout asked for; returns
    the results by layout name and the path rank 0 writes them to."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--layouts", default=",".join(layouts), help="comma-separated names from LAYOUTS")
    parser.add_argument("--ckpt", default="", help="folder for the save/resume checks (one subfolder per layout)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    results = {}
    for name in args.layouts.split(","):
        results[name] = run(name, Path(args.ckpt) / name if args.ckpt and name in ckpt_layouts else None)
    return results, Path(args.out)


def main() -> None:
    try:
        results, out = run_layouts(__doc__, LAYOUTS, CKPT_LAYOUTS, run_layout)
        if dist.get_rank() == 0:
            results["reference"] = {tied: reference(tied) for tied in (True, False)}
            torch.save(results, out)
    finally:
        groups.destroy()


if __name__ == "__main__":
    main()
