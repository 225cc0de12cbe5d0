"""Contriever-style bi-encoder (Izacard et al. 2022): a bidirectional transformer, mean-pooled token states.

Built from the project's own parts (`models.block.Block`, `models.ffn.mlp.MLP`, `parallel.linear` roles);
only the attention is local, because the LM's mixer is causal by contract and a retriever must let every
token see the whole passage. Queries and passages share one encoder (as Contriever) unless the passage
side is frozen for query-side-only training (Atlas section 2.4), which keeps a stale index valid.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ConfigError, ModelConfig
from hybrid_pretrain.models.ffn.mlp import MLP
from hybrid_pretrain.parallel.linear import column_linear, row_linear


@dataclass
class EncoderConfig:
    vocab_size: int = 0  # 0: the tokenizer's
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    max_len: int = 256  # tokens per query or passage (~100 words of prose is ~150 tokens)
    dropout: float = 0.0
    init_std: float = 0.02

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"retrieval.encoder.{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"retrieval.encoder.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )

    def model_config(self) -> ModelConfig:
        """The LM config the shared MLP is built from."""
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads, dropout=self.dropout)


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


class BidirectionalAttention(nn.Module):
    """Multi-head self-attention without a causal mask; padded keys are masked out."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.dropout
        self.qkv_proj = column_linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)
        self.key_mask: torch.Tensor | None = None  # (B, L) bool, set by the encoder around each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        B, L, D = x.shape
        qkv = self.qkv_proj(x).view(B, L, self.n_heads, 3, self.head_dim)  # (B, L, H, 3, hd), head-major as Attention
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, H, L, hd)
        mask = None if self.key_mask is None else self.key_mask[:, None, None, :]  # (B, 1, 1, L)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class BiEncoder(nn.Module):
    """Token ids (B, L) and mask (B, L) -> mean-pooled embeddings (B, D)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)  # learned positions: bidirectional attention is order-blind
        mcfg = cfg.model_config()
        self.blocks = nn.ModuleList(
            Block(BidirectionalAttention(cfg), MLP(mcfg, i), nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model),
                  cfg.dropout)
            for i in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) int64, mask: (B, L) bool (True = real token) -> (B, D)."""
        L = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(L, device=ids.device))  # (B, L, D)
        for block in self.blocks:
            block.mixer.key_mask = mask
            x = block(x)
            block.mixer.key_mask = None
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # mean over real tokens, (B, D)


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of a module's weights (names, shapes, dtypes, values): identifies the encoder an index was built with."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
        return state_dict_sha256(self.passage_encoder or self.query_encoder)

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
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"encoder checkpoint '{path}' does not exist; expected a save_encoder .safetensors")
    with safe_open(str(path), "pt") as f:
        cfg = EncoderConfig(**json.loads(f.metadata()["config"]))
    enc = DualEncoder(cfg, tokenizer)
    enc.query_encoder.load_state_dict(load_file(str(path)))
    return enc
