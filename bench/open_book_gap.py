"""Where does an Atlas run's open-book gap come from? Per document, and the windows retrieval helps or hurts most.

    python bench/open_book_gap.py RUN_DIR --data ../shared/data/pg19_sample --split validation --threads 1

Scores each document of the split on its own (evaluation.open_book: retrieved, empty and random passages,
the same tokens in every mode), prints a per-document table beside the total, then the windows with the
largest NLL gain and loss from the retrieved passages, with the query text and the top passage's source
document, so shared text (licence boilerplate, tables of contents, play formatting) shows up by eye.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from hybrid_pretrain.data_pipeline.sources import resolve_sources
from hybrid_pretrain.evaluation import open_book
from hybrid_pretrain.launcher.perplexity import build_stream
from hybrid_pretrain.retrieval.index import IndexSpec
from hybrid_pretrain.training.weights import build_model, load_weights


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="an Atlas run directory from launcher/pretrain.py")
    parser.add_argument("--data", required=True, help="a data.path spec, e.g. ../shared/data/pg19_sample")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-tokens-per-doc", type=int, default=0, help="score at most this many tokens of "
                        "each document (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top", type=int, default=5, help="windows to show with the largest gain and loss")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random passages")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the per-document numbers here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = load_weights(args.run_dir)
    model = build_model(weights)
    run_dir, r = Path(args.run_dir), weights.config.retrieval
    seq_len, q = weights.config.data.seq_len, model.opts.query_len
    spec = IndexSpec(kind=r.index_kind, target_recall=r.target_recall)
    rows, totals = [], {m: open_book.ModeScore() for m in open_book.MODES}
    windows = []  # (gain empty - retrieved in nats/token, doc, query text, top passage)
    with open_book.open_passages(model, weights.tokenizer, r.passages or run_dir / "retrieval" / "passages",
                                 run_dir / "retrieval" / "index", spec, log=lambda m: print(m, file=sys.stderr)) as src:
        rand = open_book.RandomPassages(src, model.opts.n_passages, args.seed)
        for d, doc in enumerate(resolve_sources(args.data, args.split)):
            stream = build_stream([doc], weights.tokenizer, args.max_tokens_per_doc)
            found: list[np.ndarray] = []
            scores = open_book.score_modes(model, stream.ids, seq_len, args.batch_size, open_book.MODES, rand,
                                           progress=False, retrieved_rows=found)
            for m, s in scores.items():
                totals[m].nll, totals[m].tokens = totals[m].nll + s.nll, totals[m].tokens + s.tokens
            rows.append({"doc": d, "chars": len(doc), "tokens": scores["retrieved"].tokens,
                         **open_book.gaps(scores), "title": doc.strip()[:40]})
            top_ids = np.concatenate(found)[:, 0]
            starts = range(0, len(stream.ids) - 1 - q, seq_len - q)
            for w, (s, pid) in enumerate(zip(starts, top_ids)):
                gain = scores["empty"].window_nll[w] - scores["retrieved"].window_nll[w]
                windows.append((gain, d, weights.tokenizer.decode(stream.ids[s: s + q]), src.store.by_ids([pid])[0]))
    total = {"doc": "all", "tokens": totals["retrieved"].tokens, **open_book.gaps(totals)}
    print(f"{'doc':>4} {'tokens':>8} {'retrieved':>10} {'empty':>8} {'random':>8} {'vs empty':>9} "
          f"{'vs random':>9}  start")
    for row in [*rows, total]:
        print(f"{row['doc']!s:>4} {row['tokens']:>8} {row['perplexity_retrieved']:>10.2f} "
              f"{row['perplexity_empty']:>8.2f} {row['perplexity_random']:>8.2f} {row['gap_vs_empty']:>+9.2%} "
              f"{row['gap_vs_random']:>+9.2%}  {row.get('title', '')!r}")
    gains = np.array([w[0] for w in windows])
    distinct = len({w[3].id for w in windows})  # a collapsed retriever answers every query with the same hubs
    print(f"windows: {len(gains)}; retrieved beats empty in {(gains > 0).mean():.1%}; mean gain {gains.mean():+.4f} "
          f"nats/token; median {np.median(gains):+.4f}; distinct top-1 passages: {distinct} of {len(src)}")
    order = np.argsort(gains)
    for label, picks in (("largest gains", order[::-1][: args.top]), ("largest losses", order[: args.top])):
        print(f"{label} (empty - retrieved NLL per token):")
        for i in picks:
            gain, d, query, passage = windows[i]
            print(f"  {gain:+.3f} doc {d} query {query[:70]!r}\n         top passage: {passage.source} doc "
                  f"{passage.doc} @{passage.offset}: {passage.text[:90]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"documents": rows, "total": total}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
