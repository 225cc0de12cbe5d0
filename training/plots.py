"""Loss and throughput curves as PNG, drawn from a run's ``metrics.jsonl``.

Usable on its own: ``python -m hybrid_pretrain.training.plots runs/NAME/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metrics(metrics_path: Path, out_dir: Path) -> list[Path]:
    """Write ``loss.png`` (train and validation) and ``throughput.png`` (tokens/s) into ``out_dir``."""
    if not metrics_path.exists():
        return []
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    written = []
    for filename, keys, ylabel in (
        ("loss.png", ("train_loss", "val_loss"), "cross-entropy (nats/token)"),
        ("throughput.png", ("tokens_per_s",), "tokens / s (all ranks)"),
    ):
        fig = Figure(figsize=(7, 4))  # the object API: no pyplot state, no GUI backend to choose
        ax = fig.subplots()
        drew = False
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
                drew = True
        if not drew:
            continue
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw loss.png and throughput.png from a run's metrics.jsonl.")
    parser.add_argument("metrics", type=Path, help="path to runs/NAME/metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: beside the metrics file)")
    args = parser.parse_args(argv)
    for path in plot_metrics(args.metrics, args.out or args.metrics.parent):
        print(path)


if __name__ == "__main__":
    main()
