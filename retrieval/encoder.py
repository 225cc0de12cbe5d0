"""The retrieval side of a Contriever-style bi-encoder (Izacard et al. 2022): tokenise, embed, save, load.

The network itself is ``models.atlas.retriever.BiEncoder`` (a bidirectional transformer, mean-pooled
token states); here it meets text. Queries and passages share one encoder (as Contriever) unless the
passage side is frozen for query-side-only training (Atlas section 2.4), which keeps a stale index valid.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hybrid_pretrain.base.hashing import state_dict_sha256, weights_fingerprint
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.models.atlas.retriever import BiEncoder, EncoderConfig


def pad_token_lists(tokens: Sequence[Sequence[int]], pad_id: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, L) right-padded with `pad_id` and mask (B, L), True on real tokens.

    L is `length`, or the longest list when 0.
    """
    L = length or max(len(t) for t in tokens)
    ids = torch.full((len(tokens), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(tokens), L), dtype=torch.bool)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = True
    return ids, mask


def tokenize_padded(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> padded ids and mask; each text cut to `max_len` tokens (an empty one becomes a lone EOS)."""
    enc = [t[:max_len] or [tokenizer.eos_id] for t in tokenizer.encode_batch(list(texts))]
    return pad_token_lists(enc, tokenizer.pad_id)


class DualEncoder(nn.Module):
    """Query and passage towers over one BiEncoder; `freeze_passages()` gives the passage side a frozen copy."""

    def __init__(self, cfg: EncoderConfig, tokenizer: Tokenizer) -> None:
        super().__init__()
        if cfg.vocab_size == 0:
            cfg = EncoderConfig(**{**asdict(cfg), "vocab_size": tokenizer.vocab_size})
        self.cfg, self.tokenizer = cfg, tokenizer
        self.query_encoder = BiEncoder(cfg)
        self.passage_encoder: BiEncoder | None = None  # None: shared with the query encoder

    @property
    def query_side_only(self) -> bool:
        return self.passage_encoder is not None

    def freeze_passages(self) -> None:
        """Query-side-only training: passages are embedded by a frozen snapshot, so the index never goes stale."""
        self.passage_encoder = copy.deepcopy(self.query_encoder).eval().requires_grad_(False)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> ids (B, L) padded with pad_id and mask (B, L); each text cut to max_len tokens."""
        return tokenize_padded(self.tokenizer, texts, self.cfg.max_len)

    def encode_queries(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, D), with gradients when training."""
        ids, mask = self.tokenize(texts)
        dev = self.query_encoder.embed.weight.device
        return self.query_encoder(ids.to(dev), mask.to(dev))

    def encode_passages(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, D); no gradient flows when the passage side is frozen."""
        enc = self.passage_encoder or self.query_encoder
        ids, mask = self.tokenize(texts)
        dev = enc.embed.weight.device
        if self.query_side_only:
            with torch.no_grad():
                return enc(ids.to(dev), mask.to(dev))
        return enc(ids.to(dev), mask.to(dev))

    def passage_fingerprint(self) -> str:
        return weights_fingerprint(self.passage_encoder or self.query_encoder)  # hashed once while frozen

    def passage_embedder(self, batch_size: int = 64) -> TorchEmbedder:
        """A no-grad numpy embedder of passages with this encoder's current weights, for index builds."""
        return TorchEmbedder(self, batch_size)


class TorchEmbedder:
    """`embed(texts) -> float32 (n, D)` with a DualEncoder's passage side; `fingerprint` names its weights."""

    def __init__(self, encoder: DualEncoder, batch_size: int = 64) -> None:
        self.encoder, self.batch_size = encoder, batch_size
        self.dim = encoder.cfg.d_model
        self.fingerprint = encoder.passage_fingerprint()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        was = self.encoder.training
        self.encoder.eval()
        try:
            out = [self.encoder.encode_passages(texts[i : i + self.batch_size]).float().cpu().numpy()
                   for i in range(0, len(texts), self.batch_size)]
        finally:
            self.encoder.train(was)
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            return self.encoder.encode_queries(texts).float().cpu().numpy()


def save_encoder(path: str | Path, encoder: DualEncoder) -> str:
    """Write the query encoder's weights and config as safetensors; returns the weights' sha256."""
    meta = {"config": json.dumps(asdict(encoder.cfg)), "sha256": state_dict_sha256(encoder.query_encoder)}
    save_file({k: v.contiguous() for k, v in encoder.query_encoder.state_dict().items()}, str(path), metadata=meta)
    return meta["sha256"]


def load_encoder(path: str | Path, tokenizer: Tokenizer) -> DualEncoder:
    """Inverse of `save_encoder`."""

    if not Path(path).is_file():
        raise FileNotFoundError(f"encoder checkpoint '{path}' does not exist; expected a save_encoder .safetensors")
    with safe_open(str(path), "pt") as f:
        cfg = EncoderConfig(**json.loads(f.metadata()["config"]))
    enc = DualEncoder(cfg, tokenizer)
    enc.query_encoder.load_state_dict(load_file(str(path)))
    return enc
