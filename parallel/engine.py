"""The DeepSpeed bridge: the engine's JSON is derived from our RunConfig, never written by hand."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.parallel import one_f_one_b
from hybrid_pretrain.parallel.pipeline import one_norm_all_reduce


def resolve_precision(precision: str, auto: str | None = None) -> str:
    """'auto' means ``auto`` when given (a named device's default), else bf16 where the GPU supports it and fp32
    elsewhere (CPU bf16 is slower than fp32)."""
    if precision != "auto":
        return precision
    if auto:
        return auto
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX on x86, BF16 on Arm), as oneDNN detects them."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def computes_in_bf16(precision: str) -> bool:
    """Whether a resolved train.precision runs its matmuls in bf16 (so bf16 peak FLOP/s and bf16 math apply)."""
    return precision in ("bf16", "bf16_autocast")


def check_precision_supported(precision: str) -> None:
    """Refuse bf16 on a device without bf16 math, where it would be emulated (slow) or fail inside DeepSpeed."""
    if not computes_in_bf16(precision):
        return
    if torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision={precision}: {torch.cuda.get_device_name()} has no bf16 support; "
                              "use train.precision=fp32 (or auto)")
    elif not cpu_supports_bf16():
        raise ConfigError(f"train.precision={precision}: this CPU has no bf16 support (no AVX512-BF16 or AMX, as "
                          "oneDNN reports); use train.precision=fp32 (or auto)")


# ZeRO-Infinity's optimizer step works on sub-groups of this many elements, each read from NVMe with its
# Adam states, updated and written back: 100M elements keep the working set near 1.6 GB (DeepSpeed's 1e9: 16 GB).
NVME_SUB_GROUP = 100_000_000
# DeepSpeed's async I/O settings for the swap files (its documented defaults, written out so they are visible).
AIO = {"block_size": 1_048_576, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True}


def offload_sections(offload: Any) -> dict:
    """ZeRO's ``offload_optimizer`` / ``offload_param`` for a train.offload config (empty when nothing moves).

    Pinned host memory only pays off (and only exists) with a GPU to copy to.
    """
    pin = torch.cuda.is_available()
    zero: dict = {}
    for section, device in (("offload_optimizer", offload.optimizer), ("offload_param", offload.params)):
        if device != "none":
            zero[section] = {"device": device, "pin_memory": pin}
            if device == "nvme":
                zero[section]["nvme_path"] = offload.nvme_path
    if offload.optimizer == "nvme":
        zero["sub_group_size"] = NVME_SUB_GROUP
    return zero


def deepspeed_config(train: Any, dp_size: int) -> dict:
    """The DeepSpeed JSON for a TrainConfig at data-parallel size ``dp_size``."""
    precision = resolve_precision(train.precision)
    offload = train.offload
    # An offloaded optimizer steps on the host with DeepSpeed's vectorised CPU Adam (op cpu_adam, built by
    # `make setup`); otherwise torch's AdamW: the fused one would JIT-compile ~40 s on CPU and needs CUDA to pay off.
    adam = {} if offload.optimizer != "none" else {"torch_adam": True}
    config = {
        "train_batch_size": train.micro_batch_size * train.grad_accum * dp_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8,
                       "weight_decay": train.weight_decay, **adam},
        },
        "zero_optimization": {"stage": train.zero_stage, **offload_sections(offload)},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if precision == "bf16_autocast":
        # fp32 weights and optimizer; torch.autocast runs matmuls in bf16 and DeepSpeed reduces the gradients of
        # nn.Linear / Conv weights in bf16 (deepspeed/runtime/torch_autocast.py). DeepSpeed's "bf16" mode cannot
        # keep a parameter in fp32 (engine._cast_module_mixed_precision casts them all), which rounds SSM log_dt/A.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if offload.uses_nvme:
        config["aio"] = dict(AIO)
    return config


class MegatronMPU:
    """megatron-core's groups in the shape DeepSpeed's ``mpu`` argument expects.

    With it the engine all-reduces gradients over the data-parallel group only (not across tensor
    ranks, which hold different slices), sums sharded gradients' norms across the tensor group for
    clipping, and names checkpoint files by tensor rank (``mp_rank_XX``). A pipeline engine gets its
    own grid from the PipelineModule's topology instead.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state  # optional: megatron-core only at tensor-parallel size > 1

        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()


def initialize(model: torch.nn.Module, param_groups: list[dict], ds_config: dict,
               lr_lambda: Callable[[int], float], mpu: Any = None) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with our parameter groups and LR multiplier schedule.

    A ``PipelineModule`` gives a ``PipelineEngine`` (``train_batch``), or under ZeRO-2 our 1F1B schedule
    over the plain engine (``parallel.one_f_one_b``); ``mpu`` (a MegatronMPU) is for tensor parallelism
    without a pipeline.
    """
    import deepspeed  # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)

    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.pipe import PipelineModule

    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.utils import logger as ds_logger

    pipe = model if isinstance(model, PipelineModule) else None
    zero_stage = ds_config["zero_optimization"]["stage"]
    scheduled = pipe is not None and zero_stage >= 2  # DeepSpeed's PipelineEngine refuses ZeRO-2
    if scheduled:
        model, param_groups, mpu = one_f_one_b.plain_engine_args(pipe, param_groups)
    ds_logger.setLevel(logging.WARNING)
    # ZeRO calls torch's deprecated all_gather_into_tensor every step; one warning per rank is noise.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
        mpu=mpu,
    )
    if pipe is not None and zero_stage >= 1:
        one_norm_all_reduce(engine.optimizer)  # stages hold different parameter groups
    return one_f_one_b.OneFOneBEngine(pipe, engine) if scheduled else engine
