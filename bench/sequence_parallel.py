"""Sequence parallelism on vs off at TP=2, side by side in one run: ``python bench/sequence_parallel.py``.

Two gloo ranks (spawned here) build the debug hybrid (``HHAH``, d_model 256) at tensor-parallel size 2
twice, once with ``parallel.sequence_parallel`` off and once on, from the same seed, and time
forward + backward of the same batches, alternating the two models step by step so load on a shared
machine hits them alike. Prints per rank:

- activation memory: bytes of the tensors autograd saves for the backward pass during one forward
  (parameters excluded, shared storages counted once), the quantity sequence parallelism divides;
- tokens/s (median step) and the ON / OFF ratios;
- the loss of both models on the same batch (they must agree: same weights, same math).

Peak RSS on CPU is dominated by the weights, libraries and allocator, so it does not show the
difference; on GPU the same numbers appear as ``peak_mem_mib`` in a run's ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.base.net import free_port
from hybrid_pretrain.training.memory_probe import saved_bytes

REPO = Path(__file__).resolve().parents[1]


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward with labels, parameters excluded, storages counted once."""
    losses = []
    saved = saved_bytes(lambda: losses.append(model(ids[:, :-1], labels=ids[:, 1:])), model)
    losses[0].backward()
    model.zero_grad(set_to_none=True)
    return saved


def _worker(rank: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    from hybrid_pretrain.models.config import ModelConfig
    from hybrid_pretrain.parallel import groups, sequence
    from hybrid_pretrain.parallel.build import build_model
    from hybrid_pretrain.training.config import ParallelConfig

    cfg = ModelConfig(vocab_size=4096, d_model=256, n_heads=4, layers="HHAH", h3_d_state=32,
                      max_seq_len=args.seq_len)
    ctx = groups.initialize(ParallelConfig(tensor=2))
    try:
        models = {}
        for on in (False, True):
            sequence.set_enabled(on)
            models[on] = build_model(cfg, ParallelConfig(tensor=2, sequence_parallel=on), seed=0, dp_size=ctx.dp_size)
        sequence.set_enabled(False)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
                   for _ in range(args.steps)]
        result: dict = {}
        for on, model in models.items():
            sequence.set_enabled(on)  # the tied head reads the switch at run time
            result[on] = {"act": saved_activation_bytes(model, batches[0]),
                          "loss": model(batches[0][:, :-1], labels=batches[0][:, 1:]).item(), "times": []}
        for step, ids in enumerate(batches):
            for on, model in models.items():
                sequence.set_enabled(on)
                dist.barrier()
                start = time.perf_counter()
                model(ids[:, :-1], labels=ids[:, 1:]).backward()
                dist.barrier()
                if step >= args.warmup:
                    result[on]["times"].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"per rank, TP=2, batch {args.batch} x {args.seq_len} tokens, {args.threads} thread(s) per rank")
            tokens = args.batch * args.seq_len
            rows = {}
            for on in (False, True):
                r = result[on]
                rows[on] = (r["act"] / 2**20, tokens / statistics.median(r["times"]))
                print(f"  sequence parallel {'on ' if on else 'off'}: activations {rows[on][0]:8.2f} MiB  "
                      f"{rows[on][1]:8.0f} tokens/s  loss {r['loss']:.6f}")
            print(f"  on / off: activation memory {rows[True][0] / rows[False][0]:.2f}x, "
                  f"tokens/s {rows[True][1] / rows[False][1]:.2f}x")
            out.write_text("ok")
    finally:
        groups.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (divisible by 2)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--steps", type=int, default=8, help="timed forward + backward steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    if args.seq_len % 2:
        parser.error(f"--seq-len must be divisible by the tensor-parallel size 2, got {args.seq_len}")
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        done = Path(tmp) / "done"
        mp.spawn(_worker, args=(free_port(), args, done), nprocs=2, join=True)
        return 0 if done.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
