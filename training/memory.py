"""Per-rank memory estimate from shapes alone, for `--dry-run` before any weight is allocated.

Weights, gradients and Adam states follow the ZeRO paper's accounting (stage 1 shards optimizer
states, 2 also gradients, 3 also weights, over data-parallel ranks). Activations use Korthikanti et
al.'s per-layer count s*b*h*(34 + 5*a*s/h) bytes at 16 bits for attention layers; H3 layers have
no attention matrix but keep FFT buffers, counted as 34 + 16.
"""

from __future__ import annotations

from models.pattern import parse_pattern


def estimate_memory(n_params: int, model_cfg, train_cfg, seq_len: int, vocab_size: int,
                    dp_size: int, precision: str) -> dict[str, float]:
    """Bytes per rank by category, plus 'total'."""
    half = precision == "bf16"
    stage = train_cfg.zero_stage
    weights = n_params * (2 if half else 4)
    master = n_params * 4 if half else 0
    grads = n_params * (2 if half else 4)
    adam = n_params * 8
    if stage >= 1:
        adam, master = adam / dp_size, master / dp_size
    if stage >= 2:
        grads /= dp_size
    if stage >= 3:
        weights /= dp_size
    b, s, h, a = train_cfg.micro_batch_size, seq_len, model_cfg.d_model, model_cfg.n_heads
    scale = 1 if half else 2
    acts = 0.0
    for layer in parse_pattern(model_cfg.layers, model_cfg.ffn).layers:
        per_token = 34 + (5 * a * s / h if layer.mixer == "attention" else 16)
        acts += s * b * h * per_token * scale
    logits = s * b * vocab_size * 4 * 2  # fp32 logits and their gradient
    out = {"weights": weights, "master_weights": master, "gradients": grads, "optimizer_states": adam,
           "activations": acts + logits}
    out["total"] = sum(out.values())
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
