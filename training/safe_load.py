"""Read DeepSpeed's pickled checkpoint files without running code from them.

A ``.pt`` file is a pickle, and unpickling can call any function: a crafted ``mp_rank_00_model_states.pt``
runs a shell command in whoever converts, evaluates or resumes from the folder, and the sha256 manifest
does not help (whoever writes the folder writes the manifest). So every load is
``torch.load(weights_only=True)``: tensors, containers and numbers, plus the few DeepSpeed types its
optimizer files hold (``DEEPSPEED_TYPES``, allowed by name). DeepSpeed's engine and its ``zero_to_fp32``
call ``torch.load(weights_only=False)`` themselves, so inside ``restricted_unpickling`` torch is told to
load weights-only anyway through ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which torch reads on every call.
Anything else is refused in one line, unless the user vouches for the folder with ``--trust-checkpoint``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from hybrid_pretrain.training.errors import CheckpointError

TRUST_FLAG = "--trust-checkpoint"
TRUST_HELP = ("unpickle anything the checkpoint files hold (they can run code): only for a folder you or someone you "
              "trust wrote; by default only tensors and DeepSpeed's own types are read")
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# Besides tensors and containers, DeepSpeed's ZeRO optimizer files pickle these (found by scanning the
# checkpoints of every ZeRO stage, bf16, MoE, tensor- and pipeline-parallel run the tests write).
DEEPSPEED_TYPES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file wants to unpickle something that is not a tensor or an allowed DeepSpeed type."""

    def __init__(self, where: Path, detail: str) -> None:
        found = _GLOBAL.search(detail)
        self.global_name = found.group(1) if found else ""
        what = f"'{self.global_name}'" if found else "an object that is not a tensor"
        super().__init__(f"{where}: refusing to unpickle {what} (checkpoint files may only hold tensors and "
                         f"DeepSpeed's own types); if you trust whoever wrote this folder, rerun with {TRUST_FLAG}")


def add_trust_flag(parser: argparse.ArgumentParser, help_prefix: str = "") -> None:
    """The one ``--trust-checkpoint`` switch every command that reads a checkpoint offers, with one help text."""
    parser.add_argument(TRUST_FLAG, action="store_true", help=help_prefix + TRUST_HELP)


def deepspeed_types() -> list[type]:
    """The classes named in DEEPSPEED_TYPES (weights-only unpickling needs the objects, not their names)."""
    # optional: DeepSpeed only where its optimizer files are read (importing it probes accelerators and logs)
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum  # optional: as above
    from deepspeed.utils.tensor_fragment import fragment_address  # optional: as above

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextmanager
def restricted_unpickling(where: Path, trust: bool = False, with_deepspeed: bool = True) -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only with the DeepSpeed allow-list (nothing changes if `trust`).

    A refused file raises UntrustedCheckpointError naming `where` and the type it wanted.
    """
    if trust:
        yield
        return
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_types() if with_deepspeed else []):
            yield
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(where, str(e)) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def load_pt(path: Path, trust: bool = False) -> Any:
    """``torch.load`` of one checkpoint file onto the CPU, weights-only unless `trust`.

    Model-state files hold no DeepSpeed types, so DeepSpeed (slow to import, chatty on stdout) is only
    imported when a file turns out to need one of them.
    """
    try:
        with restricted_unpickling(path, trust, with_deepspeed=False):
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except UntrustedCheckpointError as e:
        if e.global_name not in DEEPSPEED_TYPES:
            raise
    with restricted_unpickling(path):
        return torch.load(path, map_location="cpu", weights_only=True)
