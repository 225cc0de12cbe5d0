"""Open book vs closed book: an Atlas reader's perplexity on held-out text with retrieved, empty or random passages.

Every mode scores the same tokens of the same windows; only the passages the reader sees change:

- ``retrieved``: the real path, `Atlas.retrieve`: the model's query tower searches an index of the passage
  store built with the model's own passage tower, the reader reads the top K (after re-ranking, if set);
- ``empty``: no passage, the reader's encoder sees the query alone (closed book);
- ``random``: K passages drawn uniformly from the same store (seeded), cut and padded as `PassageSource` does.

A window is ``seq_len`` tokens as in training: the first ``query_len`` are the query (context only), the
rest are scored, so windows advance by ``seq_len - query_len`` and every token after the stream's first
query is scored once. The gap retrieved vs random says what the retriever's choice adds over any passage;
retrieved vs empty what reading passages adds at all.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.models.atlas.model import Atlas
from hybrid_pretrain.models.roles import IGNORE_INDEX
from hybrid_pretrain.retrieval.build import build_full
from hybrid_pretrain.retrieval.encoder import pad_token_lists
from hybrid_pretrain.retrieval.errors import PassageError
from hybrid_pretrain.retrieval.index import IndexSpec, current_version, read_manifest
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.passage_source import PassageEmbedder, PassageSource
from hybrid_pretrain.retrieval.passages import PassageStore

MODES = ("retrieved", "empty", "random")


def parse_modes(text: str) -> list[str]:
    """'retrieved,empty' -> ['retrieved', 'empty']; unknown or repeated names are refused."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise ConfigError(f"--passages must be a comma-separated list of distinct modes from {', '.join(MODES)}, "
                          f"got '{text}'")
    return modes


def atlas_windows(ids: Sequence[int], seq_len: int, query_len: int, batch_size: int) -> Iterator[tuple]:
    """Batches of (inputs (B, seq_len), labels (B, seq_len)); each window's labels past the query are scored.

    Windows start every seq_len - query_len tokens, so the scored labels ids[s + query_len + 1 : s + seq_len + 1]
    tile ids[query_len + 1:] once; a short tail is padded (inputs 0, labels -100), its query is always whole.
    """
    if seq_len <= query_len:
        raise ConfigError(f"--seq-len ({seq_len}) must exceed the model's query_len ({query_len})")
    starts = list(range(0, len(ids) - 1 - query_len, seq_len - query_len))
    for b in range(0, len(starts), batch_size):
        chunk = starts[b: b + batch_size]
        inputs = torch.zeros(len(chunk), seq_len, dtype=torch.long)
        labels = torch.full((len(chunk), seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(chunk):
            piece = torch.tensor(ids[s: s + seq_len + 1])
            inputs[row, : len(piece) - 1] = piece[:-1]
            labels[row, : len(piece) - 1] = piece[1:]
        labels[:, :query_len] = IGNORE_INDEX  # the query is context only, as in training
        yield inputs, labels


def count_windows(n_ids: int, seq_len: int, query_len: int) -> int:
    return len(range(0, n_ids - 1 - query_len, seq_len - query_len))


def empty_passages(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One passage of no tokens per query: the reader's encoder sees the query alone. (B, 1, 0) ids and mask."""
    return torch.zeros(batch, 1, 0, dtype=torch.long), torch.zeros(batch, 1, 0, dtype=torch.bool)


class RandomPassages:
    """K passages per query drawn uniformly from a store (seeded), tokenised, cut and padded as retrieved ones."""

    def __init__(self, source: PassageSource, k: int, seed: int = 0) -> None:
        self.source, self.k = source, k
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """-> (store rows (B, K), ids (B, K, P), mask (B, K, P))."""
        rows = torch.randint(len(self.source), (batch, self.k), generator=self.generator).numpy()
        ids, mask = pad_token_lists(self.source.tokens_of_rows(rows.reshape(-1).tolist()), self.source.tokenizer.pad_id,
                                    self.source.passage_len)  # (B * K, P)
        return rows, ids.view(batch, self.k, -1), mask.view(batch, self.k, -1)


@dataclass
class ModeScore:
    nll: float = 0.0  # summed over scored tokens
    tokens: int = 0
    window_nll: list[float] = field(default_factory=list)  # mean NLL per scored token of each window, in order

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def _window_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), labels (B, T) -> (summed NLL per window (B,), scored tokens per window (B,))."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def score_modes(model: Atlas, ids: Sequence[int], seq_len: int, batch_size: int, modes: Sequence[str],
                random_passages: RandomPassages | None = None, device: torch.device | str = "cpu",
                progress: bool = True, retrieved_rows: list[np.ndarray] | None = None) -> dict[str, ModeScore]:
    """Score the token stream `ids` (ids[0] context only) in each mode; see the module docstring.

    `retrieved_rows`, when a list, receives the retrieved passages' ids (B, K) batch by batch, for analysis.
    """
    if "random" in modes and random_passages is None:
        raise ValueError("mode 'random' needs random_passages")
    q = model.opts.query_len
    scores = {mode: ModeScore() for mode in modes}
    steps = math.ceil(count_windows(len(ids), seq_len, q) / batch_size)
    for inputs, labels in tqdm(atlas_windows(ids, seq_len, q, batch_size), total=steps, desc="open book",
                               unit="batch", disable=not progress, file=sys.stderr):
        inputs, labels = inputs.to(device), labels.to(device)
        B = inputs.shape[0]
        for mode in modes:
            if mode == "retrieved":
                found = model.retrieve(inputs[:, :q])
                passages = (found.tokens, found.mask)
                if retrieved_rows is not None:
                    retrieved_rows.append(found.ids)
            elif mode == "empty":
                passages = empty_passages(B)
            else:
                passages = random_passages(B)[1:]
            logits = model(inputs, passages=passages)  # (B, seq_len - q, V)
            nll, tokens = _window_nll(logits, labels[:, q:])
            s = scores[mode]
            s.nll += float(nll.sum())
            s.tokens += int(tokens.sum())
            s.window_nll += (nll / tokens.clamp_min(1)).tolist()
    return scores


def gaps(scores: dict[str, ModeScore]) -> dict[str, float]:
    """Perplexity and the relative gaps of retrieved vs the other modes (negative: retrieval helps)."""
    out = {f"perplexity_{m}": s.perplexity for m, s in scores.items()}
    if "retrieved" in scores:
        for other in ("empty", "random"):
            if other in scores:
                out[f"gap_vs_{other}"] = scores["retrieved"].perplexity / scores[other].perplexity - 1.0
    return out


def hub_statistics(retrieved: np.ndarray) -> dict[str, float]:
    """retrieved (N, K) passage ids per window -> how many distinct passages come first, and the share of windows
    the commonest one comes first for (1/N and ~0 for a retriever that tells windows apart; near 1 for hubs)."""
    _, counts = np.unique(retrieved[:, 0], return_counts=True)
    return {"windows": len(retrieved), "distinct_top1": len(counts),
            "commonest_top1_share": float(counts.max() / len(retrieved))}


@contextlib.contextmanager
def open_passages(model: Atlas, tokenizer: Tokenizer, store_dir: str | Path, run_index_dir: str | Path | None,
                  spec: IndexSpec, log=print, search: bool = True) -> Iterator[PassageSource]:
    """Attach to `model` a `PassageSource` over `store_dir`, searched in an index of the model's own passage tower.

    The run's index (`run_index_dir`) is reused when its published version was embedded by exactly these
    passage-tower weights and holds this store; otherwise (the last refresh was before the checkpoint, or
    there is no run index) the store is re-embedded into a temporary index, as Atlas's refresh would.
    ``search=False`` (no "retrieved" mode): the store alone, for random passages; nothing is embedded or indexed.
    """
    store_dir = Path(store_dir)
    if not (store_dir / "meta.json").is_file():
        raise PassageError(f"no passage store at {store_dir}; pass --passage-store DIR (a run's retrieval/passages "
                           "or a folder from launcher/build_index.py)")
    store = PassageStore(store_dir)
    if not search:
        try:
            yield PassageSource(None, store, tokenizer, model.opts.passage_len)
        finally:
            store.close()
        return
    embedder = PassageEmbedder(model, tokenizer, model.opts.passage_len)
    with contextlib.ExitStack() as stack:
        index_dir = Path(run_index_dir) if run_index_dir else None
        if index_dir is not None and current_version(index_dir) is not None:
            manifest = read_manifest(index_dir)
            fresh = (manifest.get("encoder_sha256") == embedder.fingerprint
                     and manifest.get("passage_store", {}).get("passages") == len(store))
        else:
            fresh = False
        if fresh:
            log(f"open book: the run's index {index_dir} (version {current_version(index_dir)}) matches the "
                "checkpoint's passage tower")
        else:
            index_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="open-book-index-")))
            log(f"open book: embedding {len(store)} passages with the checkpoint's passage tower")
            build_full(store, embedder, index_dir, spec, barrier=lambda: None, progress=True)
        source = PassageSource(LiveIndex(index_dir, use_gpu=torch.cuda.is_available()), store, tokenizer,
                               model.opts.passage_len)
        model.attach(source)
        try:
            yield source
        finally:
            model.source = None
            store.close()
