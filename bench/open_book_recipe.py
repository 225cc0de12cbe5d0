"""Open book vs closed book on held-out documents (issue 22, item 3), with the recipe of ``configs/pg19_atlas.yaml``
at a small scale, on data every Python ships: standard-library modules. ``python bench/open_book_recipe.py [SEEDS]``
trains one model per seed (~5-7 min each on a shared core; 3000 steps ~4 min on an unshared one) and prints the
held-out NLL per token with retrieved, empty and random passages. A benchmark, not a test: too long for the CI
budget (the reader needs ~1500 steps to read at all), while ``tests/models/atlas/test_open_book_gap.py`` guards
retrieved < empty for a reader trained on gold passages.

The retriever starts from the generic bi-encoder (`retrieval.contrastive`, as Atlas starts from Contriever) and
stays fixed by default (query side only, no retriever loss), so the index stays exact; ``--retriever-loss pdist
--retriever-delay N --retriever-lr LR`` trains the query tower from step N as a launcher run would. Training windows
never retrieve from their own module (``exclude_source: document``), so training sees passages as held-out text does:
from other documents only. Held-out modules (not in the store) are scored as ``launcher/perplexity.py`` does; each
gap is printed with the standard error of its per-window paired difference, and the retrieved top-1 passages' hub
statistic (distinct of all windows) says whether a trained retriever collapsed.

Measured (bench/RESULTS.md, "Breaking the cold start" and "Retrieved vs random"), NLL per token, seeds 0/1/2, random -
retrieved: 1500 steps, 6,000 tokens +0.0006 / +0.0044 / -0.0013; 3000 steps, ``--held-out-tokens 30000`` +0.0021 /
+0.0009 / +0.0022 (standard errors 0.0005 / 0.0004 / 0.0004) on the launcher's parameter groups (+0.0018 / +0.0006 /
+0.0017 with AdamW's default decay on every parameter): retrieved beats random, by 0.03-0.07%, in all three seeds
(two beyond 3 standard errors), and empty by 1.6-2.9%. Earlier rows used the default decay: at 6000 steps (seed 0)
the difference is gone again (-0.0000); PDist from step 1500 (three temperature settings) collapses the query tower
onto hubs (12-41 distinct top-1) and retrieved ties or loses to random. With ``exclude_source: passage`` (Atlas's
own filter) or at 600 steps retrieved passages were worse than none.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
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
from hybrid_pretrain.training.config import TrainConfig
from hybrid_pretrain.training.optimizer import param_groups

PACKAGES = ("asyncio", "email", "importlib", "multiprocessing", "xml", "concurrent", "json", "http")
HELD_OUT_EVERY = 5  # every fifth module of these packages (in path order) is held out
Q, SEQ, P, K = 16, 48, 48, 4
LR = 3e-3  # the reader's rate, constant
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
                    retriever_loss: str = "none", retriever_delay: int = 0, retriever_lr: float = 0.0,
                    temperature: float = 0.1, target_temperature: float = 0.1, k: int = K,
                    held_out_tokens: int = HELD_OUT_TOKENS, log=lambda m: None) -> dict[str, float]:
    """NLL per token of the held-out modules with retrieved, empty and random passages, and the held-out windows'
    hub statistic (distinct top-1 passages). `retriever_loss` other than none trains the query tower from step
    `retriever_delay` on, at `retriever_lr` (0 or above LR: the reader's rate), as retrieval.retriever_delay and
    model.options.atlas.retriever_lr do in a launcher run."""
    t0 = time.time()
    train, held = modules()
    tokenizer = Tokenizer(train_tokenizer(train, tmp_path / "tok", vocab_size=1024, sample_bytes=400_000,
                                          log=lambda s: None))
    store = write_store(tmp_path / "passages", [("train", i, t) for i, t in enumerate(train)], words=30,
                        progress=False)
    torch.manual_seed(seed)
    opts = {"n_passages": k, "query_len": Q, "passage_len": P, "encoder_layers": 1, "retriever_layers": 1,
            "query_side_only": True, "retriever_loss": retriever_loss, "exclude_source": exclude_source,
            "retriever_lr": retriever_lr, "temperature": temperature, "target_temperature": target_temperature}
    model = Atlas(ModelConfig(arch="atlas", vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, layers="A",
                              max_seq_len=SEQ + P, rotary_dim=16, options={"atlas": opts}))
    encoder = DualEncoder(model.retriever.cfg, tokenizer)
    train_contrastive(encoder, store, ContrastiveConfig(steps=40, batch_size=64, seed=seed), progress=False,
                      log=log)
    model.load_retriever(encoder.query_encoder.state_dict())
    log(f"store {len(store)} passages, contrastive done at {time.time() - t0:.0f}s")
    stream = [i for t in train for i in [tokenizer.eos_id, *tokenizer.encode(t)]]
    held_stream = [i for t in held for i in [tokenizer.eos_id, *tokenizer.encode(t)]][:held_out_tokens]
    rng = random.Random(seed)
    with open_book.open_passages(model, tokenizer, store.path, None, IndexSpec(kind="flat"),
                                 log=lambda m: None) as source:
        if exclude_source == "document":
            log(f"document table in {source.build_document_table():.1f}s")
        # The launcher's groups (launcher/pretrain.py): matrices decay at train.weight_decay, which
        # configs/pg19_atlas.yaml leaves at the launcher's default (TrainConfig, 0.1), vectors (norms, biases) do
        # not, and the retriever's retriever_lr hint applies, capped at the reader's rate. The rate stays this
        # recipe's constant LR (the config's 2e-3 with warmup and cosine is for its larger model).
        optimizer = torch.optim.AdamW(param_groups(model, LR, TrainConfig().weight_decay), lr=LR)
        model.train()
        retriever_losses: list[float] = []
        for step in range(steps):
            model.learn_retriever = step >= retriever_delay
            starts = [rng.randrange(len(stream) - SEQ - 1) for _ in range(BATCH)]
            window = torch.tensor([stream[s : s + SEQ + 1] for s in starts])
            loss = model(window[:, :-1], window[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if "retriever_loss" in model.last and model.learn_retriever:
                retriever_losses.append(model.last["retriever_loss"])
                if len(retriever_losses) % 250 == 0:
                    log(f"step {step + 1}: reader {model.last['reader_loss']:.3f}, retriever loss (mean of 250) "
                        f"{sum(retriever_losses[-250:]) / 250:.4f}")
        model.eval()
        log(f"trained at {time.time() - t0:.0f}s, loss {loss.item():.3f}")
        rows: list = []
        scores = open_book.score_modes(model, held_stream, SEQ, 32, open_book.MODES,
                                       open_book.RandomPassages(source, k, seed), progress=False, retrieved_rows=rows)
    hubs = open_book.hub_statistics(np.concatenate(rows))
    log(f"scored at {time.time() - t0:.0f}s")
    per_window = {mode: np.asarray(s.window_nll) for mode, s in scores.items()}  # (windows,) NLL per token
    diff = {other: per_window[other] - per_window["retrieved"] for other in ("empty", "random")}  # paired by window
    se = {f"se_{other}": float(d.std(ddof=1) / np.sqrt(len(d))) for other, d in diff.items()}
    first = open_book.count_windows(HELD_OUT_TOKENS, SEQ, Q)  # the windows of the default 6,000 tokens
    head = {f"{mode}_head": float(w[:first].mean()) for mode, w in per_window.items()}
    return {**{mode: s.nll / s.tokens for mode, s in scores.items()}, **se, **head,
            "distinct_top1": hubs["distinct_top1"], "windows": hubs["windows"],
            "commonest_top1_share": hubs["commonest_top1_share"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("seeds", nargs="*", type=int, default=[0, 1, 2], help="one training run per seed")
    parser.add_argument("--steps", type=int, default=STEPS, help="reader training steps")
    parser.add_argument("--exclude-source", default="document", choices=("none", "passage", "document"),
                        help="what a training window may not retrieve (model.options.atlas.exclude_source)")
    parser.add_argument("--retriever-loss", default="none", choices=("none", "pdist", "emdr2", "adist", "loop"),
                        help="train the query tower with this loss (model.options.atlas.retriever_loss)")
    parser.add_argument("--retriever-delay", type=int, default=0,
                        help="reader-only steps before the retriever loss starts (retrieval.retriever_delay)")
    parser.add_argument("--retriever-lr", type=float, default=0.0,
                        help="the retriever's learning rate, 0: the reader's; at most the reader's 3e-3, as "
                             "param_groups caps it (model.options.atlas.retriever_lr)")
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="the retriever's softmax temperature (model.options.atlas.temperature)")
    parser.add_argument("--target-temperature", type=float, default=0.1,
                        help="sharpens the reader's target for PDist/LOOP (model.options.atlas.target_temperature)")
    parser.add_argument("--held-out-tokens", type=int, default=HELD_OUT_TOKENS,
                        help="held-out tokens scored (more: a smaller standard error of the gaps)")
    parser.add_argument("--k", type=int, default=K, help="passages per query (model.options.atlas.n_passages)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            nll = train_and_score(Path(tmp), seed, args.exclude_source, args.steps, args.retriever_loss,
                                  args.retriever_delay, args.retriever_lr, args.temperature,
                                  args.target_temperature, args.k, args.held_out_tokens, log=print)
        print(f"seed {seed}: " + ", ".join(f"{m} {nll[m]:.4f}" for m in open_book.MODES)
              + f"; empty - retrieved {nll['empty'] - nll['retrieved']:+.4f} (se {nll['se_empty']:.4f}), "
              f"random - retrieved {nll['random'] - nll['retrieved']:+.4f} (se {nll['se_random']:.4f}); "
              f"top-1 distinct {nll['distinct_top1']} of {nll['windows']}, "
              f"commonest {nll['commonest_top1_share']:.1%}", flush=True)
        if args.held_out_tokens > HELD_OUT_TOKENS:
            print(f"seed {seed}, first {HELD_OUT_TOKENS} tokens (window means): "
                  + ", ".join(f"{m} {nll[m + '_head']:.4f}" for m in open_book.MODES), flush=True)


if __name__ == "__main__":
    main()
