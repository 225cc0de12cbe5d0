"""Data pipeline throughput, measured side by side in one run: ``python bench/data_pipeline.py``.

1. Tokenisation into IndexedDataset shards (launcher/preprocess_data.py's code) with 1 and 2 processes
   vs Hugging Face `datasets.map` (num_proc 1 and 2) tokenising the same documents with the same
   SentencePiece model.
2. Loader: blended samples/s drawn through RankBatches, divided by what the debug model consumes
   (`--consume-tokens-per-s`, default 4,800 tokens/s: debug_hybrid on 2 CPU ranks, from its metrics).
Uses ../shared/data when present, else the embedded standard-library corpus.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from hybrid_pretrain.data_pipeline.indexed import IndexedData
from hybrid_pretrain.data_pipeline.preprocess import PreprocessSettings, _chunks, preprocess
from hybrid_pretrain.data_pipeline.sampler import RankBatches
from hybrid_pretrain.data_pipeline.sources import parse_sources
from hybrid_pretrain.data_pipeline.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def corpus_docs(work: Path, max_bytes: int) -> list[str]:
    """Up to `max_bytes` of documents: the shared Pile + PG-19 samples interleaved, or the embedded corpus."""
    if (SHARED / "pile_sample").is_dir():
        streams = [parse_sources(str(SHARED / "pile_sample"))[0].documents(),
                   parse_sources(str(SHARED / "pg19_sample"))[0].documents()]
        docs_iter = (d for pair in itertools.zip_longest(*streams) for d in pair if d)
    else:
        docs_iter = parse_sources("", work / "cache")[0].documents()
    docs, total = [], 0
    for doc in docs_iter:
        pieces = list(_chunks(doc, 20_000))  # books as ~20 kB documents, so both pipelines get many units
        docs += pieces
        total += sum(len(p.encode()) for p in pieces)
        if total >= max_bytes:
            break
    return docs


def write_shards(docs: list[str], folder: Path, n: int) -> str:
    """The documents as `n` .jsonl.zst files, so the process pool has units to share."""
    from hybrid_pretrain.tests.data_pipeline.corpora import write_jsonl_zst

    for k in range(n):
        write_jsonl_zst(folder / f"{k:02d}.jsonl.zst", [{"text": d} for d in docs[k::n]])
    return str(folder / "*.jsonl.zst")


def ours(spec: str, tok: Path, out: Path, workers: int) -> float:
    t0 = time.perf_counter()
    report = preprocess({"x": spec}, out, tok, PreprocessSettings(val_fraction=0.01, max_doc_chars=0),
                        workers=workers, log=lambda m: None)
    return report["tokens"] / (time.perf_counter() - t0)


def hf_map(docs: list[str], tok: Path, num_proc: int) -> float:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": docs})
    model = str(tok)

    def encode(batch: dict) -> dict:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=model)
        return {"ids": [ids + [sp.eos_id()] for ids in sp.encode(batch["text"])]}

    t0 = time.perf_counter()
    out = ds.map(encode, batched=True, batch_size=64, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=["text"], load_from_cache_file=False)
    tokens = sum(len(x) for x in out["ids"])
    return tokens / (time.perf_counter() - t0)


def loader(shards: Path, seq_len: int, micro_batch: int, batches: int) -> float:
    data = IndexedData.open(shards, seq_len, seed=0, log=lambda m: None)
    it = RankBatches(data.train, micro_batch, 0, 2, seed=0)
    next(it)  # opens the memmaps
    t0 = time.perf_counter()
    for _ in tqdm(range(batches), desc="loader", disable=None):
        next(it)
    return batches * micro_batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mbytes", type=float, default=8.0, help="MB of text to tokenise (default 8)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128, help="debug config's data.seq_len")
    p.add_argument("--consume-tokens-per-s", type=float, default=4800.0,
                   help="debug model's training consumption on this machine (2 ranks), tokens/s")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = corpus_docs(work, int(args.mbytes * 1e6))
        mb = sum(len(d.encode()) for d in docs) / 1e6
        tok = train_tokenizer(docs, work / "tok", args.vocab_size, 4_000_000, log=lambda m: None)
        spec = write_shards(docs, work / "src", 4)
        print(f"corpus: {len(docs)} documents, {mb:.1f} MB; tokenizer: {args.vocab_size} BPE pieces")
        rates = {
            "ours_1": ours(spec, tok, work / "out1", 1),
            "ours_2": ours(spec, tok, work / "out2", 2),
            "hf_1": hf_map(docs, tok, 1),
            "hf_2": hf_map(docs, tok, 2),
        }
        for name, rate in rates.items():
            print(f"tokenise {name:<8} {rate:>12,.0f} tokens/s")
        print(f"ratio ours/hf.map, 1 process : {rates['ours_1'] / rates['hf_1']:.2f}")
        print(f"ratio ours/hf.map, 2 processes: {rates['ours_2'] / rates['hf_2']:.2f}")
        print(f"scaling ours 2/1 processes    : {rates['ours_2'] / rates['ours_1']:.2f}")
        print(f"scaling hf.map 2/1 processes  : {rates['hf_2'] / rates['hf_1']:.2f}")
        samples = loader(work / "out1", args.seq_len, 8, 2000)
        need = args.consume_tokens_per_s / args.seq_len
        print(f"loader: {samples:,.0f} samples/s of {args.seq_len} tokens on one rank; the debug model consumes "
              f"{need:.1f} samples/s over 2 ranks")
        print(f"ratio loader / debug-model consumption: {samples / need:,.0f}x")


if __name__ == "__main__":
    main()
