"""Atlas (Izacard et al. 2022): a dense retriever and a Fusion-in-Decoder reader trained jointly.

For a training sequence of L tokens, the first ``query_len`` tokens are the query; the retriever
embeds them, the index returns K passages, and the reader predicts the rest of the sequence from the
query-plus-passage encodings (Atlas's prefix-LM pretext task). The retriever learns from the reader
through one of the losses in `models.atlas.losses` (perplexity distillation by default).

Staleness (Atlas section 2.4): the index is rebuilt on a schedule by the trainer
(`retrieval.for_training`); ``rerank_factor > 1`` over-retrieves from the stale index and re-ranks with
the current passage tower; ``query_side_only`` freezes the passage tower so the index never goes stale.
The model holds no index: `attach(source)` gives it one (``retrieval.passage_source.PassageSource``
implements `CandidateSource`), so models never depend on the retrieval library.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.atlas import losses, source_filter
from hybrid_pretrain.models.atlas.reader import FiDReader
from hybrid_pretrain.models.atlas.retriever import BiEncoder, EncoderConfig
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.init import gpt2_init_one_stream
from hybrid_pretrain.models.options import layer_options

IGNORE_INDEX = -100


class CandidateSource(Protocol):
    """Where Atlas's passages come from: top-n hits for query embeddings, as token ids."""

    def __len__(self) -> int:
        """Passages there are to retrieve."""

    def candidates(self, query_emb: torch.Tensor, n: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """query_emb (B, D) -> (passage ids (B, n), token ids (B, n, P), mask (B, n, P)) of the top-n hits."""

    def same_document(self, windows: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """windows (B, L), ids (B, C) -> (B, C) bool: passage c is from the document window b was cut from."""


class Retrieved(NamedTuple):
    """What `Atlas.retrieve` found for a batch of queries, best first."""

    scores: torch.Tensor  # (B, K) query-passage inner products, differentiable w.r.t. the retriever
    ids: np.ndarray  # (B, K) passage ids (the store's stable ids)
    tokens: torch.Tensor  # (B, K, P) passage token ids
    mask: torch.Tensor  # (B, K, P) bool, True on real tokens


@dataclass
class AtlasOptions:
    n_passages: int = 4  # K passages per query
    query_len: int = 32  # leading tokens of each sequence used as the query
    passage_len: int = 48  # tokens kept per passage
    encoder_layers: int = 2  # reader encoder (bidirectional); the decoder is model.layers
    retriever_layers: int = 2
    retriever_loss: str = "pdist"  # adist | emdr2 | pdist | loop | none
    # The retriever's softmax over passages is softmax(q.p / sqrt(d) / temperature) (Atlas: temperature_score);
    # the reader's target is sharpened by target_temperature (Atlas: temperature_gold), see models.atlas.losses.
    temperature: float = 0.1
    target_temperature: float = 0.1
    retriever_loss_coef: float = 1.0
    query_side_only: bool = False  # freeze the passage tower (the index stays valid all run)
    rerank_factor: int = 1  # > 1: take K * factor from the index, keep the current tower's top K
    # What a training window may not retrieve (models.atlas.source_filter): none; passage: a passage holding the
    # window's text (Atlas's LM filter); document: any passage of the document the window was cut from (RETRO's
    # training filter), so training sees passages as held-out text does, from other documents only.
    exclude_source: str = "none"
    # The retriever's learning rate (0: the run's train.lr), an optimizer hint on its parameters: Atlas trains the
    # retriever at a fraction of the reader's rate (its retriever_lr), and at the reader's 2e-3 a query tower fed
    # a reader that cannot read yet collapses onto a few hub passages within 300 steps (bench/RESULTS.md).
    retriever_lr: float = 0.0
    # The reader flags each passage token that also occurs in the query (DrQA's exact-match feature): without
    # it a reader trained from scratch copies a value from any passage and never learns to check that the
    # passage names what the query asks (bench/RESULTS.md, issue 22).
    match_feature: bool = False
    # Query tokens with this id are padding (the project's tokenizers put <pad> at 0 and never emit it for
    # text): a short question padded to query_len is embedded and read without them.
    pad_id: int = 0

    def validate(self, name: str) -> None:
        for field in ("n_passages", "query_len", "passage_len", "encoder_layers", "retriever_layers",
                      "rerank_factor"):
            if getattr(self, field) <= 0:
                value = getattr(self, field)
                raise ConfigError(f"model.options.{name}.{field} must be a positive integer, got {value}")
        if self.retriever_loss not in (*losses.RETRIEVER_LOSSES, "none"):
            raise ConfigError(f"model.options.{name}.retriever_loss must be one of "
                              f"{', '.join((*losses.RETRIEVER_LOSSES, 'none'))}, got '{self.retriever_loss}'")
        if self.retriever_loss == "loop" and self.n_passages < 2:
            raise ConfigError(f"model.options.{name}.retriever_loss 'loop' needs n_passages >= 2")
        if self.exclude_source not in source_filter.EXCLUDE:
            raise ConfigError(f"model.options.{name}.exclude_source must be one of {', '.join(source_filter.EXCLUDE)}, "
                              f"got '{self.exclude_source}'")
        if self.retriever_lr < 0:
            raise ConfigError(f"model.options.{name}.retriever_lr must be >= 0 (0: train.lr), got {self.retriever_lr}")
        if self.temperature <= 0 or self.target_temperature <= 0 or self.retriever_loss_coef < 0:
            raise ConfigError(f"model.options.{name}: temperature and target_temperature must be > 0 and "
                              "retriever_loss_coef >= 0")


class Atlas(nn.Module):
    """``forward(input_ids (B, L), labels=None)``: loss (reader NLL + retriever loss in training) or logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be set (> 0) to build Atlas, got {cfg.vocab_size}")
        self.cfg, self.opts = cfg, layer_options(cfg, "atlas", AtlasOptions)
        o = self.opts
        if o.query_len + o.passage_len > cfg.max_seq_len:
            raise ConfigError(f"model.options.atlas: query_len + passage_len ({o.query_len + o.passage_len}) must be "
                              f"at most model.max_seq_len ({cfg.max_seq_len})")
        self.reader = FiDReader(cfg, o.encoder_layers, o.query_len if o.match_feature else 0)
        enc = EncoderConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads,
                            n_layers=o.retriever_layers, max_len=max(o.query_len, o.passage_len), dropout=cfg.dropout)
        self.retriever = BiEncoder(enc)
        # Query-side-only: passages are embedded by a frozen snapshot of the initial retriever.
        self.frozen_passage_tower = (copy.deepcopy(self.retriever).requires_grad_(False)
                                     if o.query_side_only else None)
        self.source: CandidateSource | None = None
        # False: training forwards skip the retriever loss (the reader still learns), e.g. while a reader
        # trained from scratch cannot read yet and would teach the retriever noise (see models.atlas.losses).
        self.learn_retriever = True
        self.last: dict[str, float] = {}
        self.source_found: float | None = None  # set by retrieve() with exclude_source
        self.reset_parameters()

    @property
    def passage_tower(self) -> BiEncoder:
        return self.frozen_passage_tower if self.frozen_passage_tower is not None else self.retriever

    def reset_parameters(self) -> None:
        """Projections and embeddings ~ N(0, init_std) as the LM; SSM layers keep their own init. The frozen
        passage tower is a copy of the retriever, not a draw: query-side-only starts from the same weights (and
        the same random stream afterwards) as training both towers."""
        frozen = () if self.frozen_passage_tower is None else (self.frozen_passage_tower,)
        gpt2_init_one_stream(self, self.cfg.init_std, skip=frozen)
        with torch.no_grad():
            if self.frozen_passage_tower is not None:
                self.frozen_passage_tower.load_state_dict(self.retriever.state_dict())
        if self.opts.retriever_lr:  # attached here so a meta-built model keeps it after to_empty()
            for p in self.retriever.parameters():
                p._optim = {"lr": self.opts.retriever_lr}

    def load_retriever(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start the retriever (and the frozen passage tower, if any) from a bi-encoder's weights, e.g.
        the project's generic one (retrieval.contrastive), as Atlas starts from Contriever."""
        self.retriever.load_state_dict(state_dict)
        if self.frozen_passage_tower is not None:
            self.frozen_passage_tower.load_state_dict(state_dict)

    def attach(self, source: CandidateSource) -> None:
        """Give the model its passages (an index over a passage store); needed before the first forward."""
        if len(source) < self.opts.n_passages * self.opts.rerank_factor:
            raise ConfigError(f"{source} holds {len(source)} passages; Atlas needs at least "
                              f"n_passages x rerank_factor = {self.opts.n_passages * self.opts.rerank_factor}")
        self.source = source

    def _embed(self, tower: BiEncoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tower is self.frozen_passage_tower:
            with torch.no_grad():
                return tower(ids, mask)
        return tower(ids, mask)

    def query_mask(self, query: torch.Tensor) -> torch.Tensor:
        """query (B, Lq) -> (B, Lq) bool, False on padding."""
        return query != self.opts.pad_id

    def retrieve(self, query: torch.Tensor, window: torch.Tensor | None = None) -> Retrieved:
        """query (B, Lq) -> the K passages the index and (when re-ranking) the current tower rank first.

        `window` (B, L), the whole training sequence: with ``exclude_source``, passages holding its text are
        skipped (`models.atlas.source_filter`)."""
        if self.source is None:
            raise RuntimeError("Atlas has no passages: call attach(source) before forward "
                               "(launcher/pretrain.py does this from the run's `retrieval:` section)")
        o = self.opts
        q_emb = self.retriever(query, self.query_mask(query))  # (B, Dr)
        n = o.n_passages * o.rerank_factor
        if o.exclude_source != "none" and window is not None:
            fetch = n * source_filter.OVERFETCH[o.exclude_source]
            ids, p_ids, p_mask = self.source.candidates(q_emb, fetch)  # (B, fetch), (B, fetch, P)
            holds = source_filter.holds_window_text(window.cpu(), p_ids, p_mask)  # (B, fetch)
            if o.exclude_source == "document":
                holds |= self.source.same_document(window.cpu(), ids)
            keep = source_filter.without_source(holds, n)  # (B, n)
            # share of windows whose own text (or document) was in the unfiltered top n
            self.source_found = float(holds[:, :n].any(dim=1).float().mean())
            ids = np.take_along_axis(ids, keep.numpy(), axis=1)
            p_ids = p_ids.gather(1, keep[..., None].expand(-1, -1, p_ids.shape[2]))
            p_mask = p_mask.gather(1, keep[..., None].expand(-1, -1, p_mask.shape[2]))
        else:
            ids, p_ids, p_mask = self.source.candidates(q_emb, n)  # (B, n), (B, n, P)
        B, _, P = p_ids.shape
        p_ids, p_mask = p_ids.to(query.device), p_mask.to(query.device)
        p_emb = self._embed(self.passage_tower, p_ids.view(B * n, P), p_mask.view(B * n, P)).view(B, n, -1)
        scores = torch.einsum("bd,bnd->bn", q_emb, p_emb) / q_emb.shape[-1] ** 0.5  # (B, n), Atlas's scaling
        if o.rerank_factor > 1:  # keep the current tower's top K of the stale index's top K * factor
            top = scores.topk(o.n_passages, dim=1).indices  # (B, K)
            scores = scores.gather(1, top)
            p_ids = p_ids.gather(1, top[..., None].expand(-1, -1, P))
            p_mask = p_mask.gather(1, top[..., None].expand(-1, -1, P))
            ids = np.take_along_axis(ids, top.cpu().numpy(), axis=1)
        return Retrieved(scores, ids, p_ids, p_mask)

    def context(self, query: torch.Tensor, p_ids: torch.Tensor, p_mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """Each passage prefixed by the query: (B, K, Lq + P) ids and mask (query padding masked out)."""
        B, K, _ = p_ids.shape
        q = query[:, None, :].expand(B, K, -1)  # (B, K, Lq)
        q_mask = self.query_mask(query)[:, None, :].expand(B, K, -1)
        return torch.cat([q, p_ids], dim=2), torch.cat([q_mask, p_mask], dim=2)

    @torch.no_grad()
    def answer_log_likelihood(self, ctx: torch.Tensor, ctx_mask: torch.Tensor, target: torch.Tensor,
                              labels: torch.Tensor) -> torch.Tensor:
        """log p_LM(labels | context) summed over the target, for a (B, K', C) context -> (B,)."""
        logits, _ = self.reader(ctx, ctx_mask, target)
        logp = -F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return logp.sum(dim=1)

    def _retriever_loss(self, scores: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor, target: torch.Tensor,
                        labels: torch.Tensor, attention_mass: torch.Tensor | None) -> torch.Tensor:
        o = self.opts
        B, K, C = ctx.shape
        T = target.shape[1]
        if o.retriever_loss == "adist":
            share = attention_mass / attention_mass.sum(dim=1, keepdim=True).clamp_min(1e-30)  # (B, K)
            return losses.attention_distillation(share, scores, o.temperature, o.target_temperature)
        tokens = (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)[:, None]  # (B, 1) answer tokens per query
        if o.retriever_loss == "loop":  # the reader with every passage but k, for each k
            keep = ~torch.eye(K, dtype=torch.bool, device=ctx.device)  # (K, K) row k drops passage k
            sub = ctx[:, None].expand(B, K, K, C)[:, keep].view(B * K, K - 1, C)
            sub_mask = ctx_mask[:, None].expand(B, K, K, C)[:, keep].view(B * K, K - 1, C)
            ll = self.answer_log_likelihood(sub, sub_mask, target.repeat_interleave(K, 0),
                                            labels.repeat_interleave(K, 0)).view(B, K)
            return losses.leave_one_out_distillation(ll / tokens, scores, o.temperature, o.target_temperature)
        # pdist and emdr2: the reader with passage k alone
        ll = self.answer_log_likelihood(ctx.reshape(B * K, 1, C), ctx_mask.reshape(B * K, 1, C),
                                        target.repeat_interleave(K, 0).view(B * K, T),
                                        labels.repeat_interleave(K, 0)).view(B, K)
        if o.retriever_loss == "emdr2":  # a likelihood of the whole answer: no target to sharpen
            return losses.emdr2(ll, scores, o.temperature)
        return losses.perplexity_distillation(ll / tokens, scores, o.temperature, o.target_temperature)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                passages: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids (B, L) with L > query_len; labels (B, L) aligned as LanguageModel's.

        Returns logits (B, L - query_len, V) for the continuation when `labels` is None; otherwise the
        reader's mean cross-entropy over the continuation, plus the retriever loss in training mode.
        `passages` ((B, K', P) ids, (B, K', P) mask) replaces retrieval (no retriever loss): empty ones
        (P = 0) read closed-book, random ones measure what retrieval adds.
        """
        o = self.opts
        if input_ids.shape[1] <= o.query_len:
            raise ConfigError(f"Atlas needs sequences longer than model.options.atlas.query_len ({o.query_len}); "
                              f"got length {input_ids.shape[1]}: raise data.seq_len")
        query, target = input_ids[:, : o.query_len], input_ids[:, o.query_len :]
        if passages is None:
            found = self.retrieve(query, input_ids)
            scores, p_ids, p_mask = found.scores, found.tokens, found.mask
        else:
            scores, (p_ids, p_mask) = None, passages
        ctx, ctx_mask = self.context(query, p_ids.to(query.device), p_mask.to(query.device))  # (B, K, C)
        train_retriever = (self.training and self.learn_retriever and labels is not None and scores is not None
                           and o.retriever_loss != "none")
        want_attention = train_retriever and o.retriever_loss == "adist"
        logits, attention_mass = self.reader(ctx, ctx_mask, target, passage_scores=want_attention)
        if labels is None:
            return logits
        labels = labels[:, o.query_len :]
        reader_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        if not train_retriever:
            return reader_loss
        retriever_loss = self._retriever_loss(scores, ctx, ctx_mask, target, labels, attention_mass)
        self.last = {"reader_loss": reader_loss.item(), "retriever_loss": retriever_loss.item()}
        if self.source_found is not None:
            self.last["source_found"] = self.source_found
        return reader_loss + o.retriever_loss_coef * retriever_loss

    def step_metrics(self) -> dict[str, float]:
        """The last training forward's reader and retriever losses, for the metrics log."""
        return dict(self.last)
