"""Every registered sequence mixer under the same settings, side by side: ``python bench/mixers.py``.

For each mixer (``--mixers s4,s4d,dss,gss,h3,attention``; default: every registered mixer whose module
imports) a 2-layer model of that mixer alone is measured on:

- the H3 paper's synthetic induction-head and associative-recall tasks (test accuracy after a fixed,
  small training budget, ``synthetic.train``; same data, width, state size, optimiser and epochs for all);
- training tokens/s at ``--length`` (forward + backward of the 2-layer LM, best of ``--repeats``), with
  the ratio to attention measured in the same run;
- sequence classification accuracy (``classify.train.train_classifier``: sequential digits as pixel tokens or
  ListOps, ``--classify-task``), when the ``classify`` package is importable; the column is left out otherwise.

Prints the settings, then one markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch
from tqdm import tqdm

from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers import MIXERS
from hybrid_pretrain.synthetic.train import SyntheticRun, train_synthetic

TASKS = ("induction_head", "associative_recall")


def importable_mixers() -> list[str]:
    """Registered mixers whose module imports (others are being written or need missing packages)."""
    names = []
    for name, target in MIXERS.items():
        try:
            importlib.import_module(target.partition(":")[0])
        except ImportError:
            continue
        names.append(name)
    return names


def synthetic_accuracy(symbol: str, task: str, args: argparse.Namespace) -> float:
    run = SyntheticRun(task=task, layers=symbol * args.depth, vocab=args.vocab, seq_len=args.seq_len,
                       train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
                       batch_size=args.batch_size, d_model=args.d_model, n_heads=args.n_heads, d_state=args.d_state,
                       lr=args.lr, seed=args.seed, warmup_epochs=1, embed_dropout=0.0)  # as the recorded table
    _, acc = train_synthetic(run, eval_every=args.epochs, progress=False, log=lambda _: None)
    return acc


def tokens_per_second(symbol: str, args: argparse.Namespace) -> float:
    cfg = ModelConfig(vocab_size=args.throughput_vocab, d_model=args.d_model, n_heads=args.n_heads,
                      layers=symbol * args.depth, h3_d_state=args.d_state, max_seq_len=args.length)
    torch.manual_seed(args.seed)
    model = build_arch(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.throughput_batch, args.length))
    best = float("inf")
    for _ in range(args.repeats + 1):  # the first call warms up (allocations, FFT plans)
        t0 = time.perf_counter()
        model(ids, labels=ids).backward()
        best = min(best, time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return ids.numel() / best


def classification_runner(args: argparse.Namespace):
    """``f(symbol) -> test accuracy`` through the classification harness, or None if it is not installed."""
    try:
        from hybrid_pretrain.classify.config import ClassifyConfig
        from hybrid_pretrain.classify.train import train_classifier
    except ImportError:
        return None

    def run(symbol: str) -> float:
        cfg = ClassifyConfig(task=args.classify_task, layers=symbol * args.depth, d_model=args.d_model,
                             n_heads=args.n_heads, d_state=args.d_state, epochs=args.classify_epochs, lr=args.lr,
                             train_size=args.train_size, test_size=args.test_size, seed=args.seed)
        cfg.validate()
        return train_classifier(cfg, progress=False, log=lambda _: None)[1]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default="", help="comma-separated registry names (default: all importable)")
    parser.add_argument("--depth", type=int, default=2, help="layers, all of the mixer under test")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-heads", type=int, default=1, help="attention heads (attention-based mixers)")
    parser.add_argument("--d-state", type=int, default=64, help="model.h3_d_state: the SSMs' state size N")
    parser.add_argument("--vocab", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=30)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--length", type=int, default=1024, help="sequence length of the throughput column")
    parser.add_argument("--throughput-batch", type=int, default=1)
    parser.add_argument("--throughput-vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--classify-task", default="digits", choices=["digits", "listops"])
    parser.add_argument("--classify-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.mixers.split(",") if n] or importable_mixers()
    symbols = {name: sym for sym, name in MIXERS.symbols().items()}
    unknown = [n for n in names if n not in symbols]
    if unknown:
        parser.error(f"--mixers: unknown {', '.join(unknown)}; registered: {', '.join(sorted(symbols))}")
    classify = classification_runner(args)
    print(f"settings: {args.depth} layers, d_model {args.d_model}, d_state {args.d_state}, heads {args.n_heads}; "
          f"synthetic: vocab {args.vocab}, seq {args.seq_len}, train {args.train_size}, test {args.test_size}, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; throughput: L={args.length}, "
          f"batch {args.throughput_batch}, vocab {args.throughput_vocab}, fwd+bwd best of {args.repeats}; "
          f"threads {torch.get_num_threads()}" + (f"; classification: {args.classify_task}, "
          f"{args.classify_epochs} epochs, causal layers, mean pooling" if classify else ""))
    if classify is None:
        print("classification column left out: the classify package is not importable")
    rows: dict[str, dict] = {}
    for name in tqdm(names, desc="mixers", unit="mixer"):
        row: dict = {}
        try:
            t0 = time.perf_counter()
            for task in TASKS:
                row[task] = synthetic_accuracy(symbols[name], task, args)
            row["synthetic_s"] = time.perf_counter() - t0
            row["tok_s"] = tokens_per_second(symbols[name], args)
        except Exception as e:  # one broken mixer must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"
        if classify is not None and "error" not in row:
            try:
                row["classify"] = f"{classify(symbols[name]):.3f}"
            except Exception as e:  # the harness is another package: report, keep the other columns
                row["classify"] = f"error: {type(e).__name__}: {str(e)[:60]}"
        rows[name] = row
    base = rows.get("attention", {}).get("tok_s")
    header = "| mixer | symbol | induction head | associative recall | tokens/s @ L={} | vs attention |{}"
    print(header.format(args.length, f" {args.classify_task} classification |" if classify else ""))
    print("|---|---|---|---|---|---|" + ("---|" if classify else ""))
    for name, row in rows.items():
        if "error" in row:
            print(f"| {name} | `{symbols[name]}` | error: {row['error'][:80]} | | | |" + (" |" if classify else ""))
            continue
        ratio = f"{row['tok_s'] / base:.2f}x" if base else "n/a"
        line = (f"| {name} | `{symbols[name]}` | {row['induction_head']:.3f} | {row['associative_recall']:.3f} | "
                f"{row['tok_s']:,.0f} | {ratio} |")
        print(line + (f" {row['classify']} |" if classify else ""))
    print("synthetic seconds per mixer (both tasks): " + ", ".join(
        f"{n} {r['synthetic_s']:.0f}" for n, r in rows.items() if "synthetic_s" in r))


if __name__ == "__main__":
    main()
