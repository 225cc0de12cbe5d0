"""The training loop: steps, validation, checkpoints and metrics around a DeepSpeed engine.

Everything parallel is already inside the engine and the per-rank batch iterator; the loop only
averages scalars across data-parallel ranks for logging.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from hybrid_pretrain.parallel.tensor import grad_norm
from hybrid_pretrain.training import checkpoint
from hybrid_pretrain.training.metrics import MetricsLogger, peak_memory_bytes


@dataclass
class LoopSettings:
    steps: int
    grad_accum: int
    log_every: int
    eval_every: int
    eval_batches: int
    save_every: int
    keep_checkpoints: int
    tokens_per_step: int  # across all data-parallel ranks
    flops_per_token: float = 0.0  # model training FLOPs per token (training.flops); 0: FLOP/s not logged
    peak_flops: float = math.nan  # dense peak FLOP/s of one device (training.gpu_peaks); NaN: no MFU (CPU)
    world_size: int = 1  # devices sharing the work, for per-device FLOP/s and MFU


def _mean_across_ranks(value: float, group: Any) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def _mean_dict_across_ranks(values: dict[str, float], group: Any) -> dict[str, float]:
    """One all-reduce for a dict of scalars whose keys are the same on every rank."""
    if not values:
        return {}
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return dict(zip(values, (t / dist.get_world_size(group)).tolist()))


def _throughput(settings: LoopSettings, tokens_per_s: float) -> dict[str, float | None]:
    """Achieved model TFLOP/s per device and MFU (None where the device's peak is unknown, e.g. on CPU)."""
    if not settings.flops_per_token:
        return {}
    per_device = settings.flops_per_token * tokens_per_s / settings.world_size
    utilisation = per_device / settings.peak_flops if math.isfinite(settings.peak_flops) else None
    return {"model_tflops": per_device / 1e12, "mfu": utilisation}


def _peak_memory(device: torch.device) -> dict[str, Any]:
    """Every rank's peak memory (MiB), gathered over the world; a collective, so call it on all ranks at once."""
    mine = torch.tensor([peak_memory_bytes(device) / 2**20], dtype=torch.float64, device=device)
    every = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(every, mine)
    per_rank = [round(v, 1) for v in every.tolist()]
    return {"peak_mem_mib": max(per_rank), "peak_mem_mib_per_rank": per_rank}


def _loss(engine: Any, batch: torch.Tensor) -> torch.Tensor:
    batch = batch.to(engine.device)
    return engine(batch[:, :-1], labels=batch[:, 1:])  # (B, L) inputs predict the next token


def _is_pipeline(engine: Any) -> bool:
    """DeepSpeed's PipelineEngine runs forward, backward and step itself (``train_batch``, 1F1B)."""
    return bool(getattr(engine, "pipeline_parallelism", False))


def _pipeline_micro_batches(engine: Any, micro: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Every stage takes the same micro-batches from its iterator (only the ends use them), so every
    # rank's data position stays the same and a checkpoint's data state is valid on every rank.
    return iter([(b[:, :-1].to(engine.device), b[:, 1:].to(engine.device)) for b in micro])


def train_step(engine: Any, batches: Iterator[torch.Tensor], grad_accum: int) -> tuple[float, float | None]:
    """One optimizer step over ``grad_accum`` micro-batches; returns this rank's mean loss and the grad norm."""
    if _is_pipeline(engine):  # the loss comes back already averaged over micro-batches and data-parallel ranks
        micro = [next(batches) for _ in range(grad_accum)]
        loss = engine.train_batch(_pipeline_micro_batches(engine, micro))
        return float(loss), _grad_norm(engine)
    total, norm = 0.0, None
    for micro in range(grad_accum):
        loss = _loss(engine, next(batches))
        engine.backward(loss)
        if micro == grad_accum - 1 and engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips fp32 gradients but keeps no norm; grads are all-reduced here.
            norm = grad_norm([p for p in engine.module.parameters() if p.grad is not None])
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        total += loss.item()
    return total / grad_accum, _grad_norm(engine) if norm is None else norm


@torch.no_grad()
def evaluate(engine: Any, val_batches: list[torch.Tensor], group: Any) -> float:
    """Mean validation loss over the same fixed batches every time, averaged across ranks."""
    engine.eval()
    if _is_pipeline(engine):
        losses = [float(engine.eval_batch(_pipeline_micro_batches(engine, [b]), num_micro_batches=1))
                  for b in val_batches]
    else:
        losses = [_loss(engine, b).item() for b in val_batches]
    engine.train()
    return _mean_across_ranks(sum(losses) / max(1, len(losses)), group)


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def run(engine: Any, batches: Any, val_batches: list[torch.Tensor], settings: LoopSettings, run_dir: Path,
        is_main: bool, dp_group: Any, start_step: int = 0, start_tokens: int = 0,
        after_step: Callable[[int], None] | None = None) -> dict:
    """Train from ``start_step`` to ``settings.steps``; returns a summary that is also written to summary.json.

    `after_step(step)` runs on every rank after each optimizer step, before evaluation and saving
    (e.g. an Atlas run's index refresh).
    """
    ckpt_dir = run_dir / "checkpoints"
    metrics = MetricsLogger(run_dir, enabled=is_main, resume_step=start_step)
    step, tokens = start_step, start_tokens
    first_loss, recent = None, []
    last_saved = start_step
    bar = tqdm(total=settings.steps, initial=start_step, desc="train", unit="step", disable=not is_main,
               dynamic_ncols=True)
    engine.train()
    while step < settings.steps:
        t0 = time.perf_counter()
        local_loss, grad_norm = train_step(engine, batches, settings.grad_accum)
        # One all-reduce for the loss and the model's own metrics of the last micro-batch (MoE routing:
        # tokens per expert, dropped fraction, aux and z losses; Atlas: reader and retriever losses).
        reduced = _mean_dict_across_ranks(
            {"train_loss": local_loss, **getattr(engine.module, "step_metrics", dict)()}, dp_group)
        loss = reduced["train_loss"]
        elapsed = time.perf_counter() - t0
        step += 1
        tokens += settings.tokens_per_step
        if after_step is not None:
            after_step(step)
        first_loss = loss if first_loss is None else first_loss
        recent = (recent + [loss])[-10:]
        record = {**reduced, "lr": engine.get_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_s": settings.tokens_per_step / elapsed, "tokens": tokens}
        record.update(_throughput(settings, record["tokens_per_s"]))
        if settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps) and val_batches:
            record["val_loss"] = evaluate(engine, val_batches, dp_group)
            if is_main:
                tqdm.write(f"step {step}: train loss {loss:.4f}, val loss {record['val_loss']:.4f}")
        if step % settings.log_every == 0 or "val_loss" in record:  # the same steps on every rank
            metrics.log(step, **record, **_peak_memory(engine.device))
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", gnorm=f"{grad_norm or 0:.2f}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if (settings.save_every and step % settings.save_every == 0) or step == settings.steps:
            checkpoint.save(engine, ckpt_dir, step, {"step": step, "tokens": tokens, "data": batches.state_dict()},
                            settings.keep_checkpoints)
            last_saved = step
    bar.close()
    images = metrics.close()
    summary = {
        "start_step": start_step,
        "final_step": step,
        "first_loss": first_loss,
        "last10_mean_loss": sum(recent) / len(recent) if recent else None,
        "tokens": tokens,
        "last_checkpoint_step": last_saved,
        "plots": [str(p) for p in images],
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
