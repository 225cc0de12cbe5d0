"""Open book vs closed book on held-out documents (issue 22, item 3), with the recipe of ``configs/pg19_atlas.yaml``
at a small scale, on data every Python ships: standard-library modules. ``python bench/open_book_recipe.py [SEEDS]``
trains one model per seed (~5-7 min each on one core) and prints the held-out NLL per token with retrieved, empty and
random passages. A benchmark, not a test: too long for the CI budget (the reader needs ~1500 steps to read at all),
while ``tests/models/atlas/test_open_book_gap.py`` guards retrieved < empty for a reader trained on gold passages.

The retriever starts from the generic bi-encoder (`retrieval.contrastive`, as Atlas starts from Contriever) and
stays fixed (query side only, no retriever loss), so the index stays exact; training windows never retrieve from
their own module (``exclude_source: document``), so training sees passages as held-out text does: from other
documents only. Held-out modules (not in the store) are scored as ``launcher/perplexity.py`` does.

Measured (bench/RESULTS.md, "Breaking the cold start"), NLL per token, seeds 0/1/2 at 1500 steps: empty - retrieved
+0.0455 / +0.0084 / +0.0187; random - retrieved +0.0006 / +0.0044 / -0.0013. So retrieved beats empty in every seed;
retrieved does NOT beat random (the reader uses passages as generic
in-domain text; which one the fixed retriever picks does not matter to it yet), so nothing is asserted about it.
With ``exclude_source: passage`` (Atlas's own filter) or at 600 steps retrieved passages were worse than none.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from hybrid_pretrain.data_pipeline.embedded import stdlib_root, stdlib_sources
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer
from hybrid_pretrain.evaluation import open_book
from hybrid_pretrain.models.atlas.model import Atlas
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.retrieval.config import ContrastiveConfig
from hybrid_pretrain.retrieval.contrastive import train_contrastive
from hybrid_pretrain.retrieval.encoder import DualEncoder
from hybrid_pretrain.retrieval.index import IndexSpec
from hybrid_pretrain.retrieval.passages import write_store

PACKAGES = ("asyncio", "email", "importlib", "multiprocessing", "xml", "concurrent", "json", "http")
HELD_OUT_EVERY = 5  # every fifth module of these packages (in path order) is held out
Q, SEQ, P, K = 16, 48, 48, 4
STEPS, BATCH = 1500, 16  # at 600 the reader does not read yet (retrieved worse than empty)
HELD_OUT_TOKENS = 6000


def modules() -> tuple[list[str], list[str]]:
    """(training modules, held-out modules) of PACKAGES, as text."""
    root = stdlib_root()
    paths = [p for p in stdlib_sources(root) if p.relative_to(root).parts[0] in PACKAGES]
    texts = [p.read_text(encoding="utf-8") for p in paths]
    held = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def train_and_score(tmp_path: Path, seed: int, exclude_source: str = "document", steps: int = STEPS,
                    log=lambda m: None) -> dict[str, float]:
    """NLL per token of the held-out modules with retrieved, empty and random passages."""
    t0 = time.time()
    train, held = modules()
    tokenizer = Tokenizer(train_tokenizer(train, tmp_path / "tok", vocab_size=1024, sample_bytes=400_000,
                                          log=lambda s: None))
    store = write_store(tmp_path / "passages", [("train", i, t) for i, t in enumerate(train)], words=30,
                        progress=False)
    torch.manual_seed(seed)
    opts = {"n_passages": K, "query_len": Q, "passage_len": P, "encoder_layers": 1, "retriever_layers": 1,
            "query_side_only": True, "retriever_loss": "none", "exclude_source": exclude_source}
    model = Atlas(ModelConfig(arch="atlas", vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, layers="A",
                              max_seq_len=SEQ + P, rotary_dim=16, options={"atlas": opts}))
    encoder = DualEncoder(model.retriever.cfg, tokenizer)
    train_contrastive(encoder, store, ContrastiveConfig(steps=40, batch_size=64, seed=seed), progress=False,
                      log=log)
    model.load_retriever(encoder.query_encoder.state_dict())
    log(f"store {len(store)} passages, contrastive done at {time.time() - t0:.0f}s")
    stream = [i for t in train for i in [tokenizer.eos_id, *tokenizer.encode(t)]]
    held_stream = [i for t in held for i in [tokenizer.eos_id, *tokenizer.encode(t)]][:HELD_OUT_TOKENS]
    rng = random.Random(seed)
    with open_book.open_passages(model, tokenizer, store.path, None, IndexSpec(kind="flat"),
                                 log=lambda m: None) as source:
        if exclude_source == "document":
            log(f"document table in {source.build_document_table():.1f}s")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        model.train()
        for _ in range(steps):
            starts = [rng.randrange(len(stream) - SEQ - 1) for _ in range(BATCH)]
            window = torch.tensor([stream[s : s + SEQ + 1] for s in starts])
            loss = model(window[:, :-1], window[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        log(f"trained at {time.time() - t0:.0f}s, loss {loss.item():.3f}")
        scores = open_book.score_modes(model, held_stream, SEQ, 32, open_book.MODES,
                                       open_book.RandomPassages(source, K, seed), progress=False)
    log(f"scored at {time.time() - t0:.0f}s")
    return {mode: s.nll / s.tokens for mode, s in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("seeds", nargs="*", type=int, default=[0, 1, 2], help="one training run per seed")
    parser.add_argument("--steps", type=int, default=STEPS, help="reader training steps")
    parser.add_argument("--exclude-source", default="document", choices=("none", "passage", "document"),
                        help="what a training window may not retrieve (model.options.atlas.exclude_source)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            nll = train_and_score(Path(tmp), seed, args.exclude_source, args.steps, log=print)
        print(f"seed {seed}: " + ", ".join(f"{m} {v:.4f}" for m, v in nll.items())
              + f"; empty - retrieved {nll['empty'] - nll['retrieved']:+.4f}, random - retrieved "
              f"{nll['random'] - nll['retrieved']:+.4f}", flush=True)


if __name__ == "__main__":
    main()
