"""One rank of the save-failure test (tests/training/test_checkpoint_failsafe.py): disk full on one rank.

Started as two plain processes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment). Every rank saves
a checkpoint; on ``--failing-rank`` every file write under the checkpoint folder raises ENOSPC, as a full
disk does. Each rank writes what checkpoint.save raised (or "saved") to ``<out>/rank<r>.txt``.
``--engine deepspeed`` saves through a real DeepSpeed ZeRO-1 engine; ``--engine fake`` through a stand-in
that writes and synchronises the way DeepSpeed's save does (its checkpoint engine, then a closing barrier).
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.parallel import engine as ds_engine
from hybrid_pretrain.parallel import groups
from hybrid_pretrain.training import checkpoint
from hybrid_pretrain.training.config import ParallelConfig, TrainConfig
from hybrid_pretrain.training.optimizer import param_groups


class TorchWrites:
    def save(self, state_dict, path):  # noqa: ANN001
        torch.save(state_dict, path)


class FakeEngine:
    """DeepSpeed's save in miniature: writes through `checkpoint_engine`, then waits at a barrier."""

    def __init__(self) -> None:
        self.checkpoint_engine = TorchWrites()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):  # noqa: ANN001
        folder = Path(save_dir) / tag
        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.checkpoint_engine.save({"w": torch.ones(4), **client_state}, folder / f"rank{dist.get_rank()}_states.pt")
        dist.barrier()


def deepspeed_engine():  # noqa: ANN201
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    train = TrainConfig(micro_batch_size=1, lr=1e-3, warmup_steps=0, zero_stage=1)
    return ds_engine.initialize(model, param_groups(model, train.lr, train.weight_decay),
                                ds_engine.deepspeed_config(train, dist.get_world_size()), lambda step: 1.0)


def fill_disk_under(folder: Path) -> None:
    """Every torch.save into `folder` fails as on a full disk (the file is left half written)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202
        if str(f).startswith(str(folder)):
            Path(f).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("fake", "deepspeed"), required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--failing-rank", type=int, default=1)
    args = parser.parse_args()
    groups.initialize(ParallelConfig())
    try:
        engine = FakeEngine() if args.engine == "fake" else deepspeed_engine()
        if dist.get_rank() == args.failing_rank:
            fill_disk_under(Path(args.ckpt))
        try:
            checkpoint.save(engine, Path(args.ckpt), 7, {"step": 7}, keep=2)
            result = "saved"
        except checkpoint.CheckpointError as e:
            result = str(e)
        Path(args.out, f"rank{dist.get_rank()}.txt").write_text(result)
    finally:
        groups.destroy()


if __name__ == "__main__":
    main()
