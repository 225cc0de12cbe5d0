"""Pretrain a language model: ``deepspeed launcher/pretrain.py --config configs/debug_hybrid.yaml``.

Reads like a table of contents: load config -> start process groups -> build data -> build model
-> wrap in the DeepSpeed engine -> loop. Each step lives in its own library.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.malloc import keep_freed_memory, return_freed_memory
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.indexed import IndexedData
from hybrid_pretrain.data_pipeline.packing import PreparedData, prepare_data
from hybrid_pretrain.data_pipeline.sampler import RankBatches, eval_batches
from hybrid_pretrain.launcher import preflight
from hybrid_pretrain.models.architectures import count_parameters
from hybrid_pretrain.parallel import engine as ds_engine
from hybrid_pretrain.parallel import groups
from hybrid_pretrain.parallel import pipeline as pipeline_parallel
from hybrid_pretrain.parallel import tensor as tensor_parallel
from hybrid_pretrain.parallel.build import build_model
from hybrid_pretrain.parallel.engine import resolve_precision
from hybrid_pretrain.parallel.groups import PeerFailed, launched_rank
from hybrid_pretrain.retrieval.errors import AccessTokenError, PassageError, RetrievalIndexError
from hybrid_pretrain.retrieval.for_training import TrainingRetrieval, build_store
from hybrid_pretrain.training import checkpoint, loop
from hybrid_pretrain.training.checkpoint import CheckpointError, has_checkpoints
from hybrid_pretrain.training.config import RunConfig, load_config, save_resolved
from hybrid_pretrain.training.device_profiles import PROFILES, DeviceProfile, device_profile, step_seconds
from hybrid_pretrain.training.flops import training_flops_per_token
from hybrid_pretrain.training.gpu_peaks import current_device_peak
from hybrid_pretrain.training.init_from import init_from as load_initial_weights
from hybrid_pretrain.training.init_from import prepare_config
from hybrid_pretrain.training.memory import cpu_rss, estimate_memory, expert_parameters, format_bytes
from hybrid_pretrain.training.optimizer import param_groups, warmup_cosine
from hybrid_pretrain.training.safe_load import add_trust_flag

USER_ERRORS = (ConfigError, DataError, CheckpointError, PassageError, RetrievalIndexError, AccessTokenError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pretrain a hybrid H3-attention (or other pattern) language model with DeepSpeed.",
        epilog="Example: deepspeed --num_gpus 2 launcher/pretrain.py --config configs/debug_hybrid.yaml "
        "train.steps=50 model.layers=HAHH",
    )
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    parser.add_argument("--data", help="shorthand for data.path=...: .jsonl.zst files/globs, a PG-19 folder or "
                        ".txt files, comma-separated; omitted: the embedded standard-library corpus")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run dir")
    parser.add_argument("--init-from", metavar="CKPT", help="start from the weights of a convert_checkpoint.py folder "
                        "(fresh optimizer and schedule, step 0) at this run's layout; uses its tokenizer unless "
                        "data.tokenizer is set")
    add_trust_flag(parser, help_prefix="with --resume: ")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run dir that already has checkpoints (they are deleted)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameter count and per-rank memory estimate, allocate nothing, exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: ranks to estimate for (default: WORLD_SIZE or 1)")
    parser.add_argument("--device-profile", choices=sorted(PROFILES), default=None,
                        help="with --dry-run: estimate the step time and check the memory for this device "
                        "(h100, a100: datasheet peaks; cpu: this machine, measured)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.steps=10")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after flags


def dry_run(cfg: RunConfig, world_size: int, profile_name: str | None = None) -> None:
    """Shapes only: build the model on the meta device and account memory (and, for a device, time) per rank."""

    dp = cfg.parallel.check_world(world_size)
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    n = count_parameters(model_cfg)
    profile = device_profile(profile_name) if profile_name else None
    precision = resolve_precision(cfg.train.precision, profile.default_precision if profile else None)
    ep = cfg.parallel.expert
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    # the H3 convolution keeps different tensors on CPU (training.memory.h3_convolution_saved): plan for the
    # profile's device, or without one for this machine
    cpu = profile.name == "cpu" if profile else not torch.cuda.is_available()
    mem = estimate_memory(n, model_cfg, cfg.train, cfg.data.seq_len, vocab, dp, precision, ep, tp_size=tp, pp_size=pp,
                          sequence_parallel=cfg.parallel.sequence_parallel,
                          checkpointing=cfg.parallel.activation_checkpointing, cpu=cpu)
    print(f"config: {cfg.name}  layers: {cfg.model.layers}  d_model: {cfg.model.d_model}  vocab: {vocab}")
    print(f"parameters: {n:,} ({n / 1e6:.1f}M)")
    experts, active_experts = expert_parameters(model_cfg)
    if experts:
        active = n - experts + active_experts
        print(f"  experts: {experts:,} in {model_cfg.num_experts} experts per MoE layer (1/{ep} per rank); "
              f"active per token: {active:,} ({active / 1e6:.1f}M, top-{model_cfg.top_k})")
    print(f"per-rank memory estimate ({world_size} ranks, DP={dp}, TP={tp}, PP={pp}, EP={ep}, "
          f"ZeRO-{cfg.train.zero_stage}, {precision}, "
          f"micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens"
          f"{', activation checkpointing' if cfg.parallel.activation_checkpointing else ''}):")
    for key, value in mem.items():
        print(f"  {key:<18}{format_bytes(value):>12}")
    offload = cfg.train.offload
    if offload.enabled:  # 'total' is the device's share; the offloaded bytes sit in host RAM or the NVMe files
        where = f" under {offload.nvme_path}" if offload.uses_nvme else ""
        print(f"offload: optimizer {offload.optimizer}, params {offload.params}{where}; on a CPU-only machine device "
              f"and host are one memory: peak RSS about {format_bytes(cpu_rss(mem))} per rank")
    if profile:  # on a CPU the "device" memory is host RAM: compare the whole RSS with it
        print_step_time(cfg, model_cfg, n, dp, profile, precision,
                        cpu_rss(mem) if profile.name == "cpu" else mem["total"])


def print_step_time(cfg: RunConfig, model_cfg, n_params: int, dp: int, profile: DeviceProfile, precision: str,
                    total_bytes: float) -> None:
    """The estimated step time of one rank on ``profile`` and whether the rank's memory fits it."""
    t, p = cfg.train, cfg.parallel
    flops = training_flops_per_token(model_cfg, cfg.data.seq_len, n_params).total
    tokens = t.micro_batch_size * t.grad_accum * cfg.data.seq_len  # per data-parallel replica
    seconds = step_seconds(flops, tokens, profile, precision, p.tensor * p.pipeline, p.pipeline, t.grad_accum)
    bubble = f", 1F1B bubble x{1 + (p.pipeline - 1) / t.grad_accum:.2f}" if p.pipeline > 1 else ""
    peak = profile.peak(precision)
    peak_text = f"{peak / 1e12:.1f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.0f} GFLOP/s"
    print(f"device profile {profile.name}: {profile.description}; peak {peak_text} {precision}, "
          f"assumed utilisation {profile.utilisation:.0%}, memory {format_bytes(profile.memory_bytes)}")
    per_token = f"{flops / 1e9:.2f} GFLOP" if flops >= 1e9 else f"{flops / 1e6:.1f} MFLOP"
    print(f"  estimated step time {seconds:.3g} s per rank (compute only): {per_token} per token x {tokens:,} tokens "
          f"per replica / {p.tensor * p.pipeline} model-parallel rank(s){bubble}; {tokens * dp / seconds:,.0f} "
          f"tokens/s over {dp} replicas")
    fits = "fits" if total_bytes <= profile.memory_bytes else "does NOT fit"
    print(f"  memory: {format_bytes(total_bytes)} per rank {fits} in {format_bytes(profile.memory_bytes)} "
          f"({total_bytes / profile.memory_bytes:.0%})")


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Check the run dir against --resume/--overwrite (main rank) before anything is written."""

    run_dir = cfg.run_path
    ckpt = run_dir / "checkpoints"
    has_ckpt = has_checkpoints(ckpt)  # also a checkpoint published by a crashed first save, before any `latest`
    if resume and not has_ckpt:
        raise ConfigError(f"--resume given but {ckpt} holds no checkpoint; run without --resume to start")
    if not resume and has_ckpt:
        if not overwrite:
            raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue, --overwrite to "
                              "start afresh, or choose another run_dir=... / name=...")
        shutil.rmtree(ckpt)
        for stale in ("metrics.jsonl", "summary.json", "loss.png", "throughput.png", "tensorboard"):
            path = run_dir / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    save_resolved(cfg, run_dir)
    return run_dir


def train(cfg: RunConfig, resume: bool, overwrite: bool, init_from: str | None = None,
          trust_checkpoint: bool = False) -> dict:
    # before the first step's temporaries (base/malloc.py says why): speed, or RSS that follows the live tensors where
    # offload sizes the run to the machine's RAM
    allocator = return_freed_memory() if cfg.train.offload.enabled else keep_freed_memory()
    ctx = groups.initialize(cfg.parallel)
    try:
        preflight.check_run(cfg, ctx.world_size)  # world size and every rank's free memory, before data or model
        run_dir = groups.run_on_main(lambda: prepare_run_dir(cfg, resume, overwrite), user_errors=USER_ERRORS)
        data_dir = run_dir / "data"
        if cfg.data.indexed:  # preprocessed shards: verified on every rank, blended by megatron-core
            data = IndexedData.open(cfg.data.indexed, cfg.data.seq_len, cfg.seed, cfg.data.blend,
                                    cfg.data.train_samples, data_dir / "index_cache",
                                    log=(lambda m: print(m, flush=True)) if ctx.is_main else (lambda m: None))
        else:  # quick start: tokenise data.path (or the embedded corpus) once on the main rank
            groups.run_on_main(lambda: prepare_data(cfg.data, data_dir), user_errors=USER_ERRORS)
            data = PreparedData.load(data_dir)

        model_cfg = cfg.model
        if model_cfg.vocab_size == 0:
            model_cfg.vocab_size = data.vocab_size
        elif model_cfg.vocab_size < data.vocab_size:
            raise ConfigError(f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's "
                              f"vocabulary ({data.vocab_size}); expected >= {data.vocab_size} or 0")
        tensor_parallel.check_model(model_cfg, cfg.parallel.tensor)  # the vocabulary size is known now
        # This rank's model: the whole one, or its tensor slice / pipeline stage of the same initial weights.
        model = build_model(model_cfg, cfg.parallel, cfg.seed, ctx.dp_size)
        if init_from:  # a consolidated checkpoint's weights, cut to this layout before the engine partitions them

            load_initial_weights(model, init_from, model_cfg)
        retrieval = None
        if model_cfg.arch == "atlas":  # the model searches the run's passages; the index is refreshed on schedule

            store = groups.run_on_main(lambda: build_store(cfg.retrieval, run_dir, cfg.data.path),
                                       user_errors=USER_ERRORS)
            retrieval = TrainingRetrieval.open(cfg.retrieval, run_dir, store, model, data.tokenizer, ctx.dp_rank,
                                               ctx.dp_size, log=(lambda m: print(m, flush=True)) if ctx.is_main
                                               else (lambda m: None))

        t = cfg.train
        engine = ds_engine.initialize(
            model,
            param_groups(model, t.lr, t.weight_decay),
            {**ds_engine.deepspeed_config(t, ctx.dp_size), **pipeline_parallel.deepspeed_config(model_cfg)},
            warmup_cosine(t.warmup_steps, t.steps, t.min_lr_ratio),
            mpu=ds_engine.MegatronMPU() if cfg.parallel.tensor > 1 and cfg.parallel.pipeline == 1 else None,
        )
        batches = RankBatches(data.train, t.micro_batch_size, ctx.dp_rank, ctx.dp_size, cfg.seed, t.overfit_batches)
        val = list(eval_batches(data.val, t.micro_batch_size, ctx.dp_rank, ctx.dp_size, t.eval_batches))
        n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: partitioned
        # The pattern-stack LM is counted whole (unsharded, all experts); other architectures as built.
        flops = training_flops_per_token(model_cfg, cfg.data.seq_len, None if model_cfg.arch == "lm" else n)
        if ctx.is_main:
            print(f"model: {n / 1e6:.2f}M parameters, layers '{model_cfg.layers}'; data: {len(data.train)} train "
                  f"sequences of {cfg.data.seq_len} tokens; ranks: {ctx.world_size} (DP={ctx.dp_size}) on "
                  f"{ctx.device.type} (malloc: {allocator}); {flops.total / 1e6:.1f} MFLOP per trained token; run dir: "
                  f"{run_dir}", flush=True)
        settings = loop.LoopSettings(
            steps=t.steps, grad_accum=t.grad_accum, log_every=t.log_every, eval_every=t.eval_every,
            eval_batches=t.eval_batches, save_every=t.save_every, keep_checkpoints=t.keep_checkpoints,
            tokens_per_step=t.micro_batch_size * t.grad_accum * cfg.data.seq_len * ctx.dp_size,
            flops_per_token=flops.total, world_size=ctx.world_size,
            peak_flops=current_device_peak(ds_engine.resolve_precision(t.precision)),
        )
        start_step = start_tokens = 0
        # Resume last, right before the loop: the RNG state it restores is where the saved run's next step
        # began, so nothing may draw after it (counting parameters on the meta device draws an init seed).
        if resume:
            state = checkpoint.load(engine, run_dir / "checkpoints", trust_checkpoint)
            start_step, start_tokens = state["step"], state["tokens"]
            batches.load_state_dict(state["data"])
            if ctx.is_main:
                print(f"resumed from step {start_step} ({run_dir / 'checkpoints' / state['tag']})", flush=True)
        if retrieval:
            retrieval.start_at(start_step)
        summary = loop.run(engine, batches, val, settings, run_dir, ctx.is_main, groups.data_parallel_group(),
                           start_step, start_tokens, after_step=retrieval.after_step if retrieval else None)
        if ctx.is_main and summary["first_loss"] is not None:
            print(f"done: step {summary['final_step']}, loss {summary['first_loss']:.3f} -> "
                  f"{summary['last10_mean_loss']:.3f} (mean of last 10); outputs in {run_dir}", flush=True)
        return summary
    finally:
        groups.destroy()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # DeepSpeed's CPU Adam and async-I/O ops as `make setup` built them into the venv; unset, a plain `deepspeed
    # launcher/pretrain.py` JIT-builds them again under ~/.cache (minutes) and waits forever on a lock file a
    # killed build left there (seen: an NVMe-offload run asleep in FileBaton.wait).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            if launched_rank() == 0:
                dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", 1)), args.device_profile)
            return 0
        ds_engine.check_precision_supported(resolve_precision(cfg.train.precision))
        unreachable = preflight.master_problems()  # before the group forms, where only this rank can tell
        if unreachable:
            print(f"error: {preflight.PreflightError(unreachable)}", file=sys.stderr, flush=True)
            return 2
        if args.init_from:
            if args.resume:
                raise ConfigError("--init-from starts a new run from a checkpoint's weights; expected it "
                                  "without --resume")
            prepare_config(cfg, args.init_from)
        train(cfg, args.resume, args.overwrite, args.init_from, args.trust_checkpoint)
        return 0
    except USER_ERRORS as e:
        if launched_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except PeerFailed:
        return 1  # rank 0 printed the traceback


if __name__ == "__main__":
    sys.exit(main())
