"""Perplexity and bits per byte of a checkpoint on a corpus: ``python launcher/perplexity.py CKPT --data PATH``.

An Atlas checkpoint is scored open book and closed book in one run (``--passages retrieved,empty,random``,
see evaluation.open_book): its passages come from the run's store, searched with its own towers.

Reads like a table of contents: load the weights (a run directory at any ZeRO stage, or a folder from
convert_checkpoint.py) -> read the documents of a split (any data.path spec: Pile, PG-19, .txt) ->
tokenize into one stream, EOS before every document as in training -> score it in non-overlapping
windows -> print perplexity = exp(mean NLL) and bits per byte = total NLL / ln 2 / UTF-8 bytes of the
text whose tokens were scored (each document's closing EOS is scored and covers 0 bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.sources import parse_sources, resolve_sources
from hybrid_pretrain.evaluation import open_book
from hybrid_pretrain.models.roles import IGNORE_INDEX
from hybrid_pretrain.retrieval.errors import PassageError, RetrievalIndexError
from hybrid_pretrain.retrieval.index import IndexSpec
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.safe_load import add_trust_flag
from hybrid_pretrain.training.weights import build_model, load_weights

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class TokenStream:
    """Token ids to score (ids[0] is context only) and the UTF-8 bytes of the text the rest cover."""

    ids: list[int]
    num_bytes: int
    documents: int


def build_stream(documents: Iterable[str], tokenizer, max_tokens: int = 0) -> TokenStream:
    """EOS + doc_1 + EOS + doc_2 ... capped at `max_tokens` scored tokens (0: all); a cut document counts
    only the bytes its kept tokens decode to."""
    ids, num_bytes, count = [tokenizer.eos_id], 0, 0
    for doc in documents:
        if not doc:
            continue
        doc_ids = tokenizer.encode(doc) + [tokenizer.eos_id]
        room = max_tokens - (len(ids) - 1) if max_tokens else len(doc_ids)
        count += 1
        if room < len(doc_ids):
            kept = doc_ids[:room]
            ids += kept
            num_bytes += len(tokenizer.decode(kept).encode("utf-8"))
            break
        ids += doc_ids
        num_bytes += len(doc.encode("utf-8"))
        if max_tokens and len(ids) - 1 >= max_tokens:
            break
    return TokenStream(ids, num_bytes, count)


def windows(ids: list[int], seq_len: int, batch_size: int) -> Iterator[tuple]:
    """Batches of (inputs (B, L), labels (B, L)) covering ids[1:] once each; short tails padded with -100."""
    return open_book.atlas_windows(ids, seq_len, 0, batch_size)  # no query: every window's labels all count


def score(model, stream: TokenStream, seq_len: int, batch_size: int, device, progress: bool = True) -> dict:
    """Total NLL over the stream and the metrics derived from it."""

    total_nll, tokens = 0.0, 0
    steps = math.ceil(math.ceil((len(stream.ids) - 1) / seq_len) / batch_size)
    with torch.no_grad():
        for inputs, labels in tqdm(windows(stream.ids, seq_len, batch_size), total=steps, desc="perplexity",
                                   unit="batch", disable=not progress, file=sys.stderr):
            logits = model(inputs.to(device)).float()  # (B, L, V)
            labels = labels.to(device)
            total_nll += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                         reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    return {
        "perplexity": math.exp(total_nll / tokens),
        "bits_per_byte": total_nll / math.log(2) / stream.num_bytes if stream.num_bytes else float("nan"),
        "nll_per_token": total_nll / tokens,
        "tokens": tokens,
        "bytes": stream.num_bytes,
        "documents": stream.documents,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Perplexity and bits per byte of a run directory or converted checkpoint on a corpus; "
        "the last line printed is a JSON object with the results.",
        epilog="Example: python launcher/perplexity.py runs/debug_hybrid --data ../shared/data/pg19_sample "
        "--split validation --max-tokens 200000",
    )
    parser.add_argument("checkpoint", help="run directory (config.yaml + checkpoints/) or convert_checkpoint.py folder")
    parser.add_argument("--data", required=True, help="a data.path spec: .jsonl.zst files/globs, a Pile or PG-19 "
                        "folder, .txt files; comma-separated")
    parser.add_argument("--split", help="train, validation or test (default: validation where the data has it, "
                        "else train, e.g. for .txt files)")
    parser.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's data.seq_len)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens (0: all)")
    parser.add_argument("--tag", help="checkpoint tag of a run directory (default: newest intact one)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--passages", help="Atlas checkpoints only: comma-separated modes from "
                        f"{','.join(open_book.MODES)} (default: all three): passages retrieved by the model from "
                        "its passage store, none (closed book), or random ones from the same store")
    parser.add_argument("--passage-store", help="Atlas: the passage store to retrieve from (default: the run's "
                        "retrieval.passages, else <run dir>/retrieval/passages)")
    parser.add_argument("--seed", type=int, default=0, help="Atlas: seed of the random passages")
    add_trust_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        for flag in ("batch_size", "seq_len", "max_tokens"):
            if getattr(args, flag) < (1 if flag == "batch_size" else 0):
                raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
        weights = load_weights(args.checkpoint, args.tag, args.trust_checkpoint)
        is_atlas = weights.config.model.arch == "atlas"
        if args.passages and not is_atlas:
            raise ConfigError(f"--passages needs an Atlas checkpoint (model.arch: atlas); {args.checkpoint} is "
                              f"model.arch '{weights.config.model.arch}'")
        modes = open_book.parse_modes(args.passages) if args.passages else list(open_book.MODES)
        if weights.tokenizer is None:
            raise ConfigError(f"{args.checkpoint} has no tokenizer.model; expected the checkpoint's tokenizer")
        seq_len = args.seq_len or weights.config.data.seq_len
        if args.split is None:
            has_validation = any("validation" in s.splits for s in parse_sources(args.data))
            args.split = "validation" if has_validation else "train"
        stream = build_stream(resolve_sources(args.data, args.split), weights.tokenizer, args.max_tokens)
        if len(stream.ids) < 2:
            raise DataError(f"--data '{args.data}' split '{args.split}' holds no text; expected documents to score")
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model = build_model(weights, device, getattr(torch, DTYPES[args.dtype]))
    if is_atlas:
        try:
            result = score_atlas(model, weights, stream, seq_len, modes, args, device)
        except (ConfigError, PassageError, RetrievalIndexError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        result = score(model, stream, seq_len, args.batch_size, device, progress=not args.no_progress)
    result.update(checkpoint=str(args.checkpoint), tag=weights.tag, data=args.data, split=args.split, seq_len=seq_len)
    print(json.dumps(result))
    return 0


def score_atlas(model, weights, stream: TokenStream, seq_len: int, modes: list[str], args: argparse.Namespace,
                device: torch.device) -> dict:
    """Perplexity in each passage mode and the gaps; prints a small table before the JSON line."""
    retrieval = weights.config.retrieval
    run_dir = Path(args.checkpoint)
    store = args.passage_store or retrieval.passages or run_dir / "retrieval" / "passages"
    run_index = Path(retrieval.index_dir) if retrieval.index_dir else run_dir / "retrieval" / "index"
    spec = IndexSpec(kind=retrieval.index_kind, target_recall=retrieval.target_recall)
    with open_book.open_passages(model, weights.tokenizer, store, run_index, spec,
                                 log=lambda m: print(m, file=sys.stderr), search="retrieved" in modes) as source:
        rand = open_book.RandomPassages(source, model.opts.n_passages, args.seed)
        found: list[np.ndarray] = []
        scores = open_book.score_modes(model, stream.ids, seq_len, args.batch_size, modes, rand, device,
                                       progress=not args.no_progress, retrieved_rows=found)
    result = open_book.gaps(scores)
    for mode, s in scores.items():
        print(f"{mode:>10}  perplexity {s.perplexity:9.3f}  ({s.tokens} tokens)")
    for key in ("gap_vs_empty", "gap_vs_random"):
        if key in result:
            print(f"retrieved vs {key[7:]}: {result[key]:+.2%} perplexity")
    if found:  # a retriever collapsed onto hub passages answers every window with the same few
        result.update(open_book.hub_statistics(np.concatenate(found)))
        print(f"retrieved top-1: {result['distinct_top1']} distinct passages over {result['windows']} windows; "
              f"the commonest is top-1 for {result['commonest_top1_share']:.1%} of them")
    result.update(tokens=next(iter(scores.values())).tokens, documents=stream.documents, passages=len(source),
                  n_passages=model.opts.n_passages, query_len=model.opts.query_len, seed=args.seed)
    return result


if __name__ == "__main__":
    sys.exit(main())
