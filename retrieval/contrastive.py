"""The project's generic bi-encoder: unsupervised contrastive training on a passage store (Contriever-style).

Atlas starts its retriever from Contriever (Izacard et al. 2021), which learns from unlabeled text alone:
two random spans of the same passage ("independent cropping") are a positive pair, the other passages of
the batch are negatives, and the encoder minimises the InfoNCE loss
``-log softmax_j(s(q_i, p_j) / temperature)[i]``. What it learns is which tokens make a passage
recognisable (rare names, not "the" or "of"), which is the lexical matching a query needs before any
reader has said what is useful. No query, answer or relevance label is used.

`train_contrastive(encoder, store, ...)` trains a `DualEncoder` in place; `save_encoder` writes it.
Scores are scaled as Atlas's retriever scores (``q.p / sqrt(d)``), so the temperature means the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hybrid_pretrain.retrieval.config import ContrastiveConfig
from hybrid_pretrain.retrieval.encoder import DualEncoder, pad_token_lists
from hybrid_pretrain.retrieval.passages import PassageStore


def random_crop(tokens: list[int], min_crop: float, rng: random.Random) -> list[int]:
    """A contiguous span of `tokens` holding a random fraction in [min_crop, 1] of them (at least one)."""
    n = len(tokens)
    length = max(1, round(n * rng.uniform(min_crop, 1.0)))
    start = rng.randint(0, n - length)
    return tokens[start : start + length]


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """q, p (B, D): row i of each is a positive pair, every other row a negative -> mean InfoNCE loss."""
    logits = q @ p.T / q.shape[-1] ** 0.5 / temperature  # (B, B)
    return F.cross_entropy(logits.float(), torch.arange(len(q), device=q.device))


def train_contrastive(encoder: DualEncoder, store: PassageStore, cfg: ContrastiveConfig, progress: bool = True,
                      log: Callable[[str], None] = print) -> list[float]:
    """Train `encoder` (both towers: they share weights) on independent crops of `store`'s passages.

    Returns the loss of every step. Passages are tokenised once and cut to the encoder's max_len.
    """
    cfg.validate()
    if encoder.query_side_only:
        raise ValueError("contrastive training needs a shared (unfrozen) passage tower")
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    L = encoder.cfg.max_len
    texts = store.texts(range(len(store)))
    tokens = [t[:L] or [encoder.tokenizer.eos_id] for t in encoder.tokenizer.encode_batch(texts)]
    net = encoder.query_encoder
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = next(net.parameters()).device
    net.train()
    history = []
    bar = tqdm(range(cfg.steps), desc="contrastive", unit="step", disable=not progress)
    for _ in bar:
        rows = torch.randperm(len(tokens), generator=gen)[: cfg.batch_size].tolist()
        views = [random_crop(tokens[r], cfg.min_crop, rng) for r in rows] + \
                [random_crop(tokens[r], cfg.min_crop, rng) for r in rows]
        ids, mask = pad_token_lists(views, encoder.tokenizer.pad_id)  # (2B, L')
        emb = net(ids.to(device), mask.to(device))  # (2B, D)
        B = len(rows)
        loss = (info_nce(emb[:B], emb[B:], cfg.temperature) + info_nce(emb[B:], emb[:B], cfg.temperature)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    net.eval()
    if not progress:
        log(f"contrastive: {cfg.steps} steps, loss {history[0]:.3f} -> {history[-1]:.3f}")
    return history
