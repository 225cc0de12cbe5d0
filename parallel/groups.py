"""Process groups: torch.distributed via DeepSpeed, model-parallel groups via megatron-core.

megatron-core's ``parallel_state`` is the one source of tensor/pipeline/data-parallel groups, so
later parallel layers (its ColumnParallelLinear etc.) and our own code agree on who is who.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.base.net import free_port
from hybrid_pretrain.parallel import roles, sequence

_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """This process's global rank as the launcher set it, before any process group exists."""
    for var in ("RANK", *_MPI_RANK_VARS):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _single_process_env() -> None:
    """Plain `python launcher/pretrain.py` runs as a world of one, without a launcher or MPI."""
    if "RANK" in os.environ or any(v in os.environ for v in _MPI_RANK_VARS):
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def initialize(parallel) -> ParallelContext:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU) and megatron-core's model-parallel groups.

    ``parallel`` is a ParallelConfig; its sizes are checked against the world before megatron-core
    (which would only assert) sees them.
    """
    import deepspeed  # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)

    _single_process_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        parallel.check_world(world)
    except Exception:
        dist.destroy_process_group()
        raise
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    with warnings.catch_warnings():  # megatron-core warns that Apex/TE are absent; we do not use them
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state  # optional: megatron-core only at tensor-parallel size > 1

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor, pipeline_model_parallel_size=parallel.pipeline
    )
    _initialize_expert_groups(getattr(parallel, "expert", 1), parallel.tensor, parallel.pipeline)
    sequence.set_enabled(getattr(parallel, "sequence_parallel", False))  # read by the layers built next
    roles.install()  # models' projection roles now follow these groups
    return ParallelContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
    )


def _initialize_expert_groups(ep_size: int, tp: int = 1, pp: int = 1) -> None:
    """Expert-parallel groups of ``ep_size`` data-parallel ranks, and expert-data-parallel groups across them.

    Built by DeepSpeed's rank arithmetic, not megatron-core (whose ``expert_model_parallel_size`` makes
    equivalent groups): DeepSpeed's engine reduces expert gradients and names expert checkpoint files by
    its own groups (``ep_size_N``), so these are the ones that must exist; made for EP=1 too, since the
    engine looks them up. Under tensor/pipeline parallelism the experts are not tensor-split (as in
    Megatron-DeepSpeed without expert tensor parallelism): an expert-parallel group joins ranks of the same
    tensor rank and pipeline stage, so EP divides DP. ``_get_expert_parallel_ranks`` lays ranks out as
    megatron-core does (tensor fastest, then data, then pipeline); its caller
    ``_create_expert_data_and_model_parallel`` is not used because it reads sizes from the ``mpu`` an engine
    records later.
    """
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.utils import groups as ds_groups

    name = f"ep_size_{ep_size}"
    if name in ds_groups._get_expert_parallel_group_dict():
        return
    rank = dist.get_rank()
    ep_ranks, edp_ranks = ds_groups._get_expert_parallel_ranks(dist.get_world_size(), tp, ep_size, pp)
    for table, ranks_table, all_ranks in ((ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
                                           ep_ranks),
                                          (ds_groups._EXPERT_DATA_PARALLEL_GROUP,
                                           ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, edp_ranks)):
        for ranks in all_ranks:  # every rank creates every group, in the same order (torch.distributed's rule)
            group = dist.new_group(ranks)
            if rank in ranks:
                table[name], ranks_table[name] = group, ranks
    ds_groups.expert_tensor_parallel_world_size = tp


def _forget_expert_groups() -> None:
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.utils import groups as ds_groups

    for table in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP,
                  ds_groups._EXPERT_PARALLEL_GROUP_RANKS, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        table.clear()  # their process groups die with the default group, or linger unused until then


def data_parallel_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state  # optional: megatron-core only at tensor-parallel size > 1

    return parallel_state.get_data_parallel_group()


def reset_model_parallel() -> None:
    """Forget the model-parallel groups (megatron-core's and the ``mpu`` DeepSpeed's last engine recorded),
    keeping the default group, so a process can form another layout (the equivalence tests do)."""
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state  # optional: megatron-core only at tensor-parallel size > 1

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    ds_groups.mpu = None  # else an engine built without mpu would inherit the previous engine's
    _forget_expert_groups()  # they depend on the tensor/pipeline sizes of the layout

    sequence.set_enabled(False)


def destroy() -> None:
    """Tear groups down; without it gloo runs sometimes abort at interpreter exit."""
    reset_model_parallel()
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        _unlink_shm_buffer(rank)


def _unlink_shm_buffer(rank: int) -> None:
    """Delete DeepSpeed's CPU shared-memory all-reduce buffer (~69 MB a rank), which it never unlinks.

    Every rank mapped all peers' buffers at initialisation, so removing the name now frees the memory
    once the processes exit instead of leaving it in /dev/shm for good.
    """
    port, addr = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR")
    if port and addr:
        Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


class PeerFailed(RuntimeError):
    """Raised on the other ranks when the main rank failed in ``run_on_main`` (it reports the error)."""


def run_on_main(fn, *, user_errors: tuple[type[BaseException], ...] = ()):
    """Run ``fn`` on rank 0 only while the others wait; every rank gets its (picklable) result.

    Without this a rank-0-only step that fails (say, an empty corpus) leaves the other ranks
    blocked at the next collective until the timeout. A user error is re-raised on every rank with
    the same message; anything else is re-raised on rank 0 and surfaces as PeerFailed elsewhere.
    """
    outcome: list = [None]  # ("ok", result) or (index into user_errors or -1, message)
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - every failure must reach the peers
            error = e
            kind = next((i for i, t in enumerate(user_errors) if isinstance(e, t)), -1)
            outcome[0] = (kind, str(e))
    dist.broadcast_object_list(outcome, src=0)
    status, payload = outcome[0]
    if status == "ok":
        return payload
    if error is not None:
        raise error
    if status >= 0:
        raise user_errors[status](payload)
    raise PeerFailed(payload)
