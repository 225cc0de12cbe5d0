"""Run metrics in three forms users plot from: a JSONL log, TensorBoard scalars, and PNG curves."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from hybrid_pretrain.training.plots import plot_metrics


def peak_memory_bytes(device: Any) -> float:
    """This process's peak memory: the CUDA caching allocator's high-water mark on GPU, peak RSS on CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        return float(torch.cuda.max_memory_allocated(device))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (main rank only).

    Appending keeps a resumed run's history in one file; records at or after the resume step are
    dropped first, so a crash between a checkpoint and a log line never duplicates steps.
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.run_dir = run_dir
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept) if step else "")

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key,
                                        value, step)

    def close(self) -> list[Path]:
        """Flush TensorBoard and draw the PNG curves; returns the written image paths."""
        if not self.enabled:
            return []
        if self._tb is not None:
            self._tb.close()
        return plot_metrics(self.path, self.run_dir)
