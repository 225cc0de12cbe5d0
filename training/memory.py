"""Per-rank memory estimate from shapes alone, for `--dry-run` before any weight is allocated.

Weights, gradients and Adam states follow the ZeRO paper's accounting (stage 1 shards optimizer
states, 2 also gradients, 3 also weights, over data-parallel ranks).

Activations count what this code base's layers keep for backward, per token in units of d_model
(Korthikanti et al.'s method, our tensors; measured with ``training.memory_probe``): a block's two
norms keep their inputs and outputs (4), the MLP its hidden state before and after GELU (2 ffn_dim),
attention q, k, v and its output (4: the flash kernels keep no (L, L) matrix), H3 the key before and
after the shift, v, q, the output and the kv its diagonal SSM reads and writes (5 + 2 head_dim). H3 also
keeps its convolution kernel, (s, H) fp32 whatever the batch, on GPU and for short sequences; a CPU training
run from ``CPU_CHUNKED_FROM`` steps convolves by chunks instead (``kernels.ssm_chunked``) and keeps the states
entering each chunk, (N/2) complex numbers per channel and chunk of J steps (``h3_convolution_saved``).
The peak adds, once, the largest backward transient: a layer's (5 per token, plus its largest weight gradient
before it is added to the accumulated one) or the loss's (two fp32 logits gradients). Activation
checkpointing keeps each block's input instead and recomputes one block at a time.
tests/training/test_memory_estimate.py holds the estimate within 20% of the measured CPU peak (debug_hybrid
with and without checkpointing, 125M-shape H3 and attention layers at L 2K: all within 2% when written; the
H3 layer 3% under since it runs by chunks).

Under ``bf16_autocast`` (fp32 weights, bf16 matmuls; kernels/README.md, "Precision under bf16") the
weights and gradients are fp32, ZeRO-1/2/3 still keep a separate fp32 master partition, activations
are bf16 except the fp32 residual stream (the norms' inputs), and every matmul saves for backward the
bf16 copy autocast made of its weight: 2 bytes per weight this rank computes with, not sharded by ZeRO-3.

Mixture-of-experts layers hold ``num_experts`` expert MLPs, of which each rank keeps 1/EP; their
weights and optimizer states are sharded by ZeRO over the expert-data-parallel group (DP / EP
ranks). Their activations are the expert rows in and out (D wide) and the hidden states before and
after GELU (d_ffn wide): top_k * tokens rows when dropless, E * C padded slots with capacity,
C = capacity_factor * top_k * tokens / E. (Under expert parallelism a rank's experts may receive more
or fewer rows than it sends; the estimate assumes balance.)
"""

from __future__ import annotations

import math

from hybrid_pretrain.kernels.fftconv import CPU_CHUNKED_FROM
from hybrid_pretrain.kernels.ssm_chunked import chunk_length
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.parallel.engine import NVME_SUB_GROUP


def expert_parameters(model_cfg) -> tuple[int, int]:
    """(parameters in all experts of all MoE layers, those a single token uses: top_k experts per layer)."""
    d, f = model_cfg.d_model, model_cfg.ffn_dim
    per_expert = 2 * d * f + f + d  # w_in, b_in, w_out, b_out
    n_moe = sum(layer.ffn == "moe" for layer in parse_pattern(model_cfg.layers, model_cfg.ffn).layers)
    return n_moe * model_cfg.num_experts * per_expert, n_moe * model_cfg.top_k * per_expert


# Saved for backward inside a layer's mixer, per token in units of d_model (split by tensor parallelism).
MIXER_SAVED = {"attention": 4.0}  # q, k, v (one buffer) and the output the row projection reads
DEFAULT_MIXER_SAVED = 7.0  # other mixers: as H3 with one channel per head (a rough default)
OUTSIDE_SAVED = 4.0  # both norms' inputs and outputs: replicated over tensor ranks unless sequence-parallel
LAYER_TRANSIENT = 5.0  # gradients alive at once inside one layer's backward, per token (measured, attention and H3)


def mixer_saved(model_cfg, mixer: str) -> float:
    """Per-token elements (units of d_model) a mixer keeps for backward."""
    if mixer == "h3":
        return 5.0 + 2.0 * model_cfg.h3_head_dim  # k before/after the shift, v, q, out; kv and its SSM output
    return MIXER_SAVED.get(mixer, DEFAULT_MIXER_SAVED)


def h3_convolution_saved(model_cfg, tokens: int, seq_len: int, tp_size: int = 1, cpu: bool = False) -> float:
    """Bytes an H3 layer's diagonal-SSM convolution keeps for backward beyond its input, on `tokens` = b * s tokens.

    GPU (and CPU below ``CPU_CHUNKED_FROM`` steps): the (s, H) fp32 kernel, shared by the batch. CPU training from
    there on (``kernels.fftconv.ssm_conv_path``): the chunk states, complex64 (N/2) per chunk of J steps for each
    of the b d^2 sequences the heads' memories convolve (its tables are rebuilt in backward, not kept).
    """
    heads = model_cfg.d_model // model_cfg.h3_head_dim / tp_size
    if not cpu or seq_len < CPU_CHUNKED_FROM:
        return seq_len * heads * 4
    sequences = tokens // seq_len * model_cfg.h3_head_dim ** 2
    return sequences * math.ceil(seq_len / chunk_length(seq_len)) * heads * model_cfg.h3_d_state / 2 * 8


def layer_activations(model_cfg, layer, tokens: int, seq_len: int, elem: int, tp_size: int = 1,
                      sequence_parallel: bool = False, residual_elem: int | None = None,
                      cpu: bool = False) -> tuple[float, float]:
    """(bytes kept for backward, bytes of its backward's transient peak) of one block on `tokens` = b * s tokens.

    `elem` is the activation element size (2 bf16, 4 fp32); SSM kernels and their spectra are fp32.
    `residual_elem` is the residual stream's (the norms' inputs; default `elem`, 4 under bf16_autocast).
    `cpu`: a CPU training run, whose H3 layers convolve long sequences by chunks (``h3_convolution_saved``).
    """
    h = model_cfg.d_model
    residual_elem = residual_elem or elem
    outside = OUTSIDE_SAVED / 2 * (elem + residual_elem) / (tp_size if sequence_parallel else 1)
    inside = (mixer_saved(model_cfg, layer.mixer) + 2.0 * model_cfg.ffn_dim / h) / tp_size * elem
    saved = tokens * h * (outside + inside)
    transient = tokens * h * LAYER_TRANSIENT / tp_size * elem
    transient += max(model_cfg.ffn_dim, 3 * h) * h / tp_size * elem  # its largest weight gradient, not yet accumulated
    if layer.mixer == "h3":
        saved += h3_convolution_saved(model_cfg, tokens, seq_len, tp_size, cpu)
    if layer.ffn == "moe":
        e, k = model_cfg.num_experts, model_cfg.top_k
        capacity = max(model_cfg.min_capacity, math.ceil(model_cfg.capacity_factor * k * tokens / e))
        rows = k * tokens if model_cfg.moe_dropless else e * capacity  # dropless: exactly the routed rows
        saved += rows * (2 * h + 2 * model_cfg.ffn_dim) * elem  # rows in/out, hidden before/after GELU
    return saved, transient


def activation_bytes(model_cfg, micro_batch: int, seq_len: int, vocab_size: int, elem: int, tp_size: int = 1,
                     sequence_parallel: bool = False, checkpointing: bool = False,
                     residual_elem: int | None = None, cpu: bool = False) -> float:
    """Peak activation bytes of one micro-batch's forward and backward on one rank (see the module docstring).

    Under 1F1B the first pipeline stage holds PP micro-batches of its L/PP layers, i.e. every layer's
    worth, so the count covers all layers whatever the pipeline split.
    """
    tokens = micro_batch * seq_len
    residual_elem = residual_elem or elem
    layers = [layer_activations(model_cfg, layer, tokens, seq_len, elem, tp_size, sequence_parallel, residual_elem, cpu)
              for layer in parse_pattern(model_cfg.layers, model_cfg.ffn).layers]
    h = model_cfg.d_model
    if checkpointing:  # each block keeps its input; backward recomputes one block at a time
        kept = len(layers) * tokens * h * residual_elem / (tp_size if sequence_parallel else 1)
        layer_peak = max(saved + transient for saved, transient in layers)
    else:
        kept = sum(saved for saved, _ in layers)
        layer_peak = max(transient for _, transient in layers)
    logits = tokens * vocab_size / tp_size * 4  # fp32 log-probabilities kept by the loss (this rank's vocabulary)
    final_norm = tokens * h * (elem + residual_elem)
    return kept + final_norm + logits + max(layer_peak, 2 * logits)  # the loss's backward holds two more


# Resident memory of a training process beyond its tensors on a CPU-only machine: Python, torch, DeepSpeed,
# the tokenizer and data pipeline, allocator slack (measured 0.3 GiB after imports, ~1 GiB at a 358M run's peak).
CPU_RUNTIME = 0.75 * 2**30
# DeepSpeed ZeRO defaults the offload accounting follows (deepspeed.runtime.zero.config / offload_config).
REDUCE_BUCKET = 500_000_000  # reduce_bucket_size: gradient elements gathered on the device before each reduction
OPTIMIZER_SWAP_BUFFERS = 4  # offload_optimizer.buffer_count: fp32 host buffers, each as large as the largest sub-group
PARAM_SWAP_ELEMENTS = 5 * 100_000_000  # offload_param.buffer_count x buffer_size elements in host RAM
PARAM_MAX_IN_CPU = 1_000_000_000  # offload_param.max_in_cpu: weight elements NVMe offload keeps in host RAM


def estimate_memory(n_params: int, model_cfg, train_cfg, seq_len: int, vocab_size: int,
                    dp_size: int, precision: str, ep_size: int = 1, tp_size: int = 1,
                    pp_size: int = 1, sequence_parallel: bool = False,
                    checkpointing: bool = False, offload=None, cpu: bool = False) -> dict[str, float]:
    """Bytes per rank by category; 'total' is what stays in device memory.

    Tensor and pipeline parallelism divide the weights by TP x PP (norms are replicated, a small
    overcount); activations follow ``activation_bytes``. ``offload`` (default: ``train_cfg.offload``, a
    training.config.OffloadConfig) moves categories off the device as DeepSpeed's ZeRO-Offload does;
    'offloaded_host' and 'offloaded_nvme' count what then sits in host RAM and in the NVMe swap files
    (see ``offload_plan``). ``cpu``: the run trains on CPU (its H3 layers' convolutions, ``h3_convolution_saved``).
    """
    half = precision == "bf16"  # DeepSpeed bf16: bf16 weights and gradients, fp32 master copy
    autocast = precision == "bf16_autocast"  # fp32 weights and gradients, bf16 matmuls
    stage = train_cfg.zero_stage
    experts, _ = expert_parameters(model_cfg)
    # Experts are whole on every tensor rank (no expert tensor parallelism) and split across pipeline stages.
    dense, local_experts = (n_params - experts) / (tp_size * pp_size), experts / (ep_size * pp_size)
    expert_dp = max(1, dp_size // ep_size)  # ranks holding copies of the same experts

    def sharded(bytes_per_param: float, shard: bool) -> float:
        if not shard:
            return (dense + local_experts) * bytes_per_param
        return dense * bytes_per_param / dp_size + local_experts * bytes_per_param / expert_dp

    offload = offload if offload is not None else getattr(train_cfg, "offload", None)
    weights = sharded(2 if half else 4, stage >= 3)
    # ZeRO-1/2/3 clone an fp32 partition even of fp32 weights (stage_1_and_2.py; stage3.py's
    # _create_fp32_partitions means to alias them but compares a torch.device with a str: measured, a copy);
    # at ZeRO-0 torch's AdamW steps autocast's fp32 weights themselves
    master = sharded(4, stage >= 1) if half or (autocast and stage >= 1) else 0
    grads = sharded(2 if half else 4, stage >= 2)
    adam = sharded(8, stage >= 1)
    elem = 2 if half or autocast else 4
    acts = activation_bytes(model_cfg, train_cfg.micro_batch_size, seq_len, vocab_size, elem, tp_size,
                            sequence_parallel, checkpointing, residual_elem=4 if autocast else elem, cpu=cpu)
    if autocast:  # the bf16 weight copies the matmuls save for backward, whole on every ZeRO-3 rank
        acts += sharded(2, False)
    out = {"weights": weights, "master_weights": master, "gradients": grads, "optimizer_states": adam,
           "activations": acts}
    if offload is None or not offload.enabled:
        out["total"] = sum(out.values())
        return out
    local = sharded(1, stage >= 3)  # parameters this rank's partition holds
    host, nvme = offload_plan(out, offload, model_cfg, local, 2 if half else 4)  # the weights' and gradients' size
    out["total"] = sum(out.values())
    out["offloaded_host"], out["offloaded_nvme"] = host, nvme
    return out


def offload_plan(device: dict[str, float], offload, model_cfg, local_params: float, elem: int) -> tuple[float, float]:
    """Move ZeRO-Offload's categories out of ``device`` (in place): (host RAM bytes, NVMe bytes).

    Optimizer offload moves the fp32 master weights and Adam states, and the gradient partition the host
    optimizer steps on (in the model's dtype, plus the fp32 copy CPU Adam reads); the device keeps one
    reduction bucket of gradients and, under bf16, its fp32 copy for the reduction (DeepSpeed communicates
    bf16 gradients in fp32). On NVMe the host holds the gradient partition and the pinned swap buffers,
    one optimizer sub-group per buffer, and the fp32 gradients go to the swap files with the states; the
    device's bucket then also has its reduce-scatter output and its fp32 copies for the swap files beside it.
    Parameter offload moves the weight partition; the device keeps the layers being computed (the
    largest one gathered, the next prefetched), NVMe adds the host's parameter swap buffers and the
    weights DeepSpeed keeps in host RAM anyway (``max_in_cpu``). Measured on CPU for the 358M shape
    (bench/offload_memory.py, and a gc inventory of live tensors): these are the live tensors; the
    peak RSS adds the runtime.
    """
    host = nvme = 0.0
    largest = model_cfg.d_model * max(model_cfg.vocab_size, model_cfg.ffn_dim, 3 * model_cfg.d_model)  # one matrix
    if offload.optimizer != "none":
        states = device["master_weights"] + device["optimizer_states"]
        partition = device["gradients"]
        bucket = min(REDUCE_BUCKET, local_params)
        device["master_weights"] = device["optimizer_states"] = 0.0
        host += partition
        if offload.optimizer == "cpu":
            device["gradients"] = bucket * (elem + (4 if elem < 4 else 0))
            host += states + (partition / elem * 4 if elem < 4 else 0)  # fp32 gradients for CPU Adam
        else:  # the fp32 gradients are swapped out with the states (measured: 18 B/param of files with bf16 weights)
            nvme += states + local_params * 4
            # While a full bucket is partitioned, DeepSpeed holds its reduce-scatter output (model dtype) and the
            # fp32 copies of its gradients on their way to the swap files, beside the bucket (stage3.py
            # _offload_grad_partition_at_boundary; measured at 1.39B: the backward's peak, ~1.9 GiB above the
            # bucket and its fp32 reduction copy counted for CPU offload).
            device["gradients"] = bucket * (2 * elem + 4)
            # A sub-group closes once it reaches sub_group_size, so one larger matrix (the embedding) is a sub-group
            # of its own and sizes the buffers: 4 x 128.7M fp32 elements at d_model 2560, measured.
            host += OPTIMIZER_SWAP_BUFFERS * min(local_params, max(NVME_SUB_GROUP, largest)) * 4
    if offload.params != "none":
        partition = device["weights"]
        device["weights"] = min(partition, 2 * largest * elem)  # one matrix gathered, the next prefetched
        if offload.params == "cpu":
            host += partition
        else:
            nvme += partition
            host += (PARAM_SWAP_ELEMENTS + min(local_params, PARAM_MAX_IN_CPU)) * elem
    return host, nvme


def cpu_rss(plan: dict[str, float]) -> float:
    """A rank's peak RSS on a CPU-only machine, where the "device" and the host are one memory (NVMe: files)."""
    return plan["total"] + plan.get("offloaded_host", 0.0) + CPU_RUNTIME


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
