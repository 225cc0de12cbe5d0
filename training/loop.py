"""The training loop: steps, validation, checkpoints and metrics around a DeepSpeed engine.

Everything parallel is already inside the engine and the per-rank batch iterator; the loop only
averages scalars across data-parallel ranks for logging.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from training import checkpoint
from training.metrics import MetricsLogger


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


def _loss(engine: Any, batch: torch.Tensor) -> torch.Tensor:
    batch = batch.to(engine.device)
    return engine(batch[:, :-1], labels=batch[:, 1:])  # (B, L) inputs predict the next token


def train_step(engine: Any, batches: Iterator[torch.Tensor], grad_accum: int) -> tuple[float, float | None]:
    """One optimizer step over ``grad_accum`` micro-batches; returns this rank's mean loss and the grad norm."""
    total, norm = 0.0, None
    for micro in range(grad_accum):
        loss = _loss(engine, next(batches))
        engine.backward(loss)
        if micro == grad_accum - 1 and engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips fp32 gradients but keeps no norm; grads are all-reduced here.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).item()
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        total += loss.item()
    return total / grad_accum, _grad_norm(engine) if norm is None else norm


@torch.no_grad()
def evaluate(engine: Any, val_batches: list[torch.Tensor], group: Any) -> float:
    """Mean validation loss over the same fixed batches every time, averaged across ranks."""
    engine.eval()
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
        if settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps) and val_batches:
            record["val_loss"] = evaluate(engine, val_batches, dp_group)
            if is_main:
                tqdm.write(f"step {step}: train loss {loss:.4f}, val loss {record['val_loss']:.4f}")
        if step % settings.log_every == 0 or "val_loss" in record:
            metrics.log(step, **record)
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
