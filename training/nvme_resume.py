"""Restore the optimizer of a ZeRO-3 run whose optimizer lives on NVMe (``train.offload.optimizer: nvme``).

With the optimizer swapped to NVMe, deepspeed 0.19.8's ``DeepSpeedEngine.load_checkpoint`` skips
``_load_zero_checkpoint`` (its ``if load_zero_checkpoint and not self.zero_nvme_offload_optimizer()``):
it only copies the checkpoint's ``offloaded_tensors`` into the live swap folder and calls
``reset_swap_buffers``, which reads the fp32 master weights of the swapped sub-groups back and refreshes
their bf16 weights from them. ``DeepSpeedZeroOptimizer_Stage3.load_state_dict`` never runs, so a resumed
run lost (dumped after the load at the shape of tests/training/test_nvme_checkpoint.py):

- the base optimizer's state: CPU Adam's ``step`` of every sub-group, and, for the swapped sub-groups,
  the registration of their ``exp_avg-*``/``exp_avg_sq-*`` swap files (the swapper only reads a state
  tensor it finds in ``optimizer.state``): Adam restarted from zero moments and bias correction step 1,
  and overwrote the checkpoint's moments;
- the sub-groups too small to swap (under ``aio.block_size``, 1 MiB: norms and biases), which stay in
  RAM: their fp32 master weights, bf16 weights and Adam states kept the fresh model's values.

``restore_nvme_optimizer`` loads those from this rank's ``*_optim_states.pt`` once the swap files are in
place, with DeepSpeed's own steps (those of ``_rigid_load_state_dict``), and hands the swapper full-size
placeholders for the moments so that the next swap-in reads the checkpoint's files. With it the resumed
steps repeat the uninterrupted run's bit for bit. It does not call ``_rigid_load_state_dict`` itself: that
assumes the bf16 weights in RAM and fails (``'NoneType' object has no attribute 'data'``) when
``offload_param: nvme`` swaps them out too, which ``_reassign_or_swap_out_partitioned_parameters`` handles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hybrid_pretrain.training.errors import CheckpointError
from hybrid_pretrain.training.nvme_checkpoint import OFFLOADED

# Keys of DeepSpeed's ZeRO optimizer file (deepspeed.checkpoint.constants).
OPTIMIZER_STATE = "optimizer_state_dict"
FP32_FLAT_GROUPS = "fp32_flat_groups"


def check_saved_ranks(tag_dir: Path) -> None:
    """Before loading: DeepSpeed copies the swap folder ``offloaded_tensors/rank<global rank>`` of each rank (and
    would fail with a traceback, or load another rank's share, at a different number of ranks)."""
    saved = len(list((tag_dir / OFFLOADED).glob("rank*")))
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    if saved != ranks:
        raise CheckpointError(f"{tag_dir} holds the NVMe swap files of {saved} ranks, this run has {ranks}; an "
                              "NVMe-offloaded optimizer resumes only with the number of ranks that saved it")


def restore_nvme_optimizer(engine: Any, ckpt_dir: str, tag: str) -> None:
    """After ``engine.load_checkpoint(ckpt_dir, tag)`` of an NVMe-offloaded ZeRO-3 run: load what it skipped.

    Needs the checkpoint's swap files already copied into the swap folder (``load_checkpoint`` does that): the
    swapped sub-groups' fp32 weights and moments are read from there.
    """
    optimizer = engine.optimizer
    saved = engine.checkpoint_engine.load(engine._get_zero_ckpt_name(ckpt_dir, tag), map_location="cpu")
    saved = saved[OPTIMIZER_STATE]
    optimizer.checkpoint_event_prologue()  # every parameter partitioned, as load_checkpoint has it
    # Adam's state: the step count of every sub-group, the moments of those in RAM (the optimizer's param groups
    # hold the fp32 sub-groups only while their state is read or written, as in DeepSpeed's own save and load).
    optimizer._set_fp32_optimizer_param_groups()
    optimizer.optimizer.load_state_dict(saved[OPTIMIZER_STATE])
    optimizer._clear_fp32_optimizer_param_groups()
    for sub_group, (fp32, saved_fp32) in enumerate(zip(optimizer.fp32_partitioned_groups_flat,
                                                       saved[FP32_FLAT_GROUPS], strict=True)):
        if optimizer._swappable_optimizer_subgroup(sub_group):
            # The moments were saved as empty tensors (their values are the swap files). The swapper registers a
            # state tensor (file "<key>-<ds_id>.tensor.swp") once it is large enough to swap and reads it at the
            # next swap-in into its own buffers (an untouched torch.empty costs no memory meanwhile).
            numel = int(optimizer.fp16_partitioned_groups_flat_numel[sub_group])
            state = optimizer.optimizer.state[fp32]
            for key, value in state.items():
                if torch.is_tensor(value) and value.numel() == 0:
                    state[key] = torch.empty(numel, dtype=fp32.dtype, device=fp32.device)
        else:  # kept in RAM, saved whole: its fp32 master weights, and the bf16 weights from them
            fp32.data.copy_(saved_fp32.data)
            optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)  # in RAM or into their swap files
    optimizer.checkpoint_event_epilogue()  # persistent parameters gathered again from their restored partitions
