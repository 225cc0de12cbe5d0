"""Synthetic recall tasks from the H3 paper: ``python launcher/synthetic.py --task induction_head --layers HH``.

Load flags -> generate train/test sequences -> build the LanguageModel with the layer pattern ->
train -> print the final test accuracy as the last line (``final test accuracy: 0.9980``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.malloc import keep_freed_memory
from hybrid_pretrain.base.typed_config import build
from hybrid_pretrain.synthetic.tasks import TASKS, make_task
from hybrid_pretrain.synthetic.train import SyntheticRun, train_synthetic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = SyntheticRun()
    parser = argparse.ArgumentParser(
        description="Train a small model on induction head / associative recall and report test accuracy. "
        "Layer symbols: H (H3), A (attention), S (S4D: diagonal SSM without the shift SSM).",
        epilog="Paper setting: --task associative_recall --layers HH --vocab 20 --seq-len 40 --train-size 5000 "
        "(defaults: width 32, 400 epochs, lr 5e-4, weight decay 0.1, 10% warmup, embedding dropout 0.1)",
    )
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--layers", default=d.layers, help=f"layer pattern, one symbol per layer (default {d.layers})")
    parser.add_argument("--vocab", type=int, default=d.vocab)
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per example, the answer included")
    parser.add_argument("--train-size", type=int, default=d.train_size)
    parser.add_argument("--test-size", type=int, default=d.test_size)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--width", type=int, default=d.d_model, help="d_model")
    parser.add_argument("--heads", type=int, default=d.n_heads, help="attention heads")
    parser.add_argument("--d-state", type=int, default=d.d_state, help="SSM state size")
    parser.add_argument("--h3-head-dim", type=int, default=d.h3_head_dim,
                        help=f"H3 head size: a d x d memory per head (default {d.h3_head_dim}; 1: scalar memories, "
                        "as the paper's synthetic config)")
    parser.add_argument("--rotary-dim", type=int, default=d.rotary_dim,
                        help="rotary dims per attention head; -1: whole heads if every layer is attention, else 0 "
                        "(H3 and S4D layers give the stack its positions)")
    parser.add_argument("--loss-on", choices=("sequence", "answer"), default=None,
                        help="train on every next token (as the H3 paper's code) or on the answer alone "
                        "(default: sequence for associative_recall, answer for induction_head)")
    parser.add_argument("--embed-dropout", type=float, default=d.embed_dropout,
                        help="dropout on the token embeddings (the paper's code: 0.1)")
    parser.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                        help="linear LR warmup before the cosine decay; -1: a tenth of --epochs")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--eval-every", type=int, default=10, help="epochs between test evaluations")
    parser.add_argument("--stop-at", type=float, default=1.01,
                        help="end training once the test accuracy reaches this (default: run every epoch)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="log evaluations as lines instead of a bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # CPU temporaries reuse heap pages (base/malloc.py)

    if args.threads:
        torch.set_num_threads(args.threads)
    values = dict(
        task=args.task, layers=args.layers, vocab=args.vocab, seq_len=args.seq_len, train_size=args.train_size,
        test_size=args.test_size, epochs=args.epochs, batch_size=args.batch_size, d_model=args.width,
        n_heads=args.heads, d_state=args.d_state, h3_head_dim=args.h3_head_dim, rotary_dim=args.rotary_dim, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, loss_on=args.loss_on or "", embed_dropout=args.embed_dropout,
        warmup_epochs=args.warmup_epochs,
    )
    try:
        run = build(SyntheticRun, values, source="command line")  # the one config loader, as for every config
        run.validate()
        make_task(run.task, 1, run.vocab, run.seq_len, 0)  # shape errors before any training
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, acc = train_synthetic(run, eval_every=max(1, args.eval_every), progress=not args.no_progress,
                             stop_at=args.stop_at)
    print(f"final test accuracy: {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
