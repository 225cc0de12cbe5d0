"""Per-rank memory estimate from shapes alone, for `--dry-run` before any weight is allocated.

Weights, gradients and Adam states follow the ZeRO paper's accounting (stage 1 shards optimizer
states, 2 also gradients, 3 also weights, over data-parallel ranks). Activations use Korthikanti et
al.'s per-layer count s*b*h*(34 + 5*a*s/h) bytes at 16 bits for attention layers; H3 layers have
no attention matrix but keep FFT buffers, counted as 34 + 16.

Mixture-of-experts layers hold ``num_experts`` expert MLPs, of which each rank keeps 1/EP; their
weights and optimizer states are sharded by ZeRO over the expert-data-parallel group (DP / EP
ranks). Their activations are the expert rows in and out (D wide) and the hidden states before and
after GELU (d_ffn wide): top_k * tokens rows when dropless, E * C padded slots with capacity,
C = capacity_factor * top_k * tokens / E. (Under expert parallelism a rank's experts may receive more
or fewer rows than it sends; the estimate assumes balance.)
"""

from __future__ import annotations

import math

from hybrid_pretrain.models.pattern import parse_pattern


def expert_parameters(model_cfg) -> tuple[int, int]:
    """(parameters in all experts of all MoE layers, those a single token uses: top_k experts per layer)."""
    d, f = model_cfg.d_model, model_cfg.ffn_dim
    per_expert = 2 * d * f + f + d  # w_in, b_in, w_out, b_out
    n_moe = sum(layer.ffn == "moe" for layer in parse_pattern(model_cfg.layers, model_cfg.ffn).layers)
    return n_moe * model_cfg.num_experts * per_expert, n_moe * model_cfg.top_k * per_expert


def estimate_memory(n_params: int, model_cfg, train_cfg, seq_len: int, vocab_size: int,
                    dp_size: int, precision: str, ep_size: int = 1, tp_size: int = 1,
                    pp_size: int = 1, sequence_parallel: bool = False) -> dict[str, float]:
    """Bytes per rank by category, plus 'total'.

    Tensor and pipeline parallelism divide the weights by TP x PP (norms are replicated, a small
    overcount). Activations follow Korthikanti et al.: per layer s*b*h*(10 + 24/t + 5*a*s/(h*t)); with
    sequence parallelism the 10 s*b*h outside the tensor-parallel regions is split too (their 34/t); under
    1F1B the first stage holds PP micro-batches of its L/PP layers, i.e. every layer's worth, so PP leaves
    the activation term unchanged.
    """
    half = precision == "bf16"
    stage = train_cfg.zero_stage
    experts, _ = expert_parameters(model_cfg)
    # Experts are whole on every tensor rank (no expert tensor parallelism) and split across pipeline stages.
    dense, local_experts = (n_params - experts) / (tp_size * pp_size), experts / (ep_size * pp_size)
    expert_dp = max(1, dp_size // ep_size)  # ranks holding copies of the same experts

    def sharded(bytes_per_param: float, shard: bool) -> float:
        if not shard:
            return (dense + local_experts) * bytes_per_param
        return dense * bytes_per_param / dp_size + local_experts * bytes_per_param / expert_dp

    weights = sharded(2 if half else 4, stage >= 3)
    master = sharded(4, stage >= 1) if half else 0
    grads = sharded(2 if half else 4, stage >= 2)
    adam = sharded(8, stage >= 1)
    b, s, h, a = train_cfg.micro_batch_size, seq_len, model_cfg.d_model, model_cfg.n_heads
    scale = 1 if half else 2
    acts = 0.0
    for layer in parse_pattern(model_cfg.layers, model_cfg.ffn).layers:
        outside_tp = 10 / tp_size if sequence_parallel else 10  # norms, residuals, dropout: split by SP only
        per_token = outside_tp + 24 / tp_size + (5 * a * s / h if layer.mixer == "attention" else 16) / tp_size
        acts += s * b * h * per_token * scale
        if layer.ffn == "moe":
            e, k = model_cfg.num_experts, model_cfg.top_k
            capacity = max(model_cfg.min_capacity, math.ceil(model_cfg.capacity_factor * k * s * b / e))
            rows = k * s * b if model_cfg.moe_dropless else e * capacity
            acts += rows * (2 * h + 2 * model_cfg.ffn_dim) * scale  # rows in/out, hidden before/after GELU
    logits = s * b * vocab_size / tp_size * 4 * 2  # fp32 logits and their gradient (this rank's vocabulary slice)
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
