"""The run's passages and index for a retrieval-augmented model: built at start, refreshed on schedule.

`TrainingRetrieval.prepare` is what launcher/pretrain.py calls for ``model.arch: atlas``: it builds (or
opens) the passage store, builds the first index with the model's own passage tower (sharded over the
data-parallel ranks), attaches a `PassageSource` to the model, and returns an object whose
`after_step(step)` the training loop calls; every ``refresh_every`` steps it re-embeds the passages with
the current weights and every rank swaps to the new version (Atlas's re-indexing schedule). With
``retrieval.service`` set, searches go to the index service (``python -m hybrid_pretrain.retrieval.service``) over HTTP
instead, and rank 0 tells the
service to reload after each refresh; the service must serve ``retrieval.index_dir``.

Resuming reuses the newest published index version in the run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.retrieval.auth import read_token
from hybrid_pretrain.retrieval.build import build_full
from hybrid_pretrain.retrieval.client import IndexClient
from hybrid_pretrain.retrieval.config import RetrievalConfig
from hybrid_pretrain.retrieval.contrastive import train_contrastive
from hybrid_pretrain.retrieval.encoder import DualEncoder
from hybrid_pretrain.retrieval.index import IndexSpec, current_version
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.passage_source import PassageEmbedder, PassageSource
from hybrid_pretrain.retrieval.passages import PassageStore, build_passage_store
from hybrid_pretrain.retrieval.refresh import IndexRefresher, RefreshConfig


def build_store(cfg: RetrievalConfig, run_dir: Path, data_path: str) -> Path:
    """The passage store folder for the run (main rank only: it may write one)."""
    if cfg.passages:
        return Path(cfg.passages)
    out = run_dir / "retrieval" / "passages"
    if not (out / "meta.json").is_file():
        build_passage_store(data_path, out, "train", cache_dir=run_dir / "retrieval" / "sources",
                            words=cfg.words_per_passage, max_passages=cfg.max_passages, progress=True)
    return out


class TrainingRetrieval:
    """Owns the index a model searches during training and refreshes it; see the module docstring."""

    def __init__(self, cfg: RetrievalConfig, index_dir: Path, store: PassageStore, model: torch.nn.Module,
                 tokenizer: Tokenizer, rank: int, world_size: int, barrier: Callable[[], None],
                 log: Callable[[str], None]) -> None:
        self.cfg, self.index_dir, self.store, self.model, self.tokenizer = cfg, index_dir, store, model, tokenizer
        self.rank, self.world_size, self.barrier, self.log = rank, world_size, barrier, log
        self.spec = IndexSpec(kind=cfg.index_kind, target_recall=cfg.target_recall)
        self.passage_len = model.opts.passage_len
        self.refresher = IndexRefresher(
            RefreshConfig(cfg.refresh_every, cfg.refresh_mode, cfg.rolling_fraction), index_dir, store, self.spec,
            rank=rank, world_size=world_size)
        if current_version(index_dir) is None:  # a fresh run (a resumed one has its weights in the checkpoint)
            if cfg.retriever_init == "generic":
                self._start_from_generic_encoder()
            self._build("initial index")
        if cfg.service:
            self.index = IndexClient(cfg.service, token=read_token(cfg.token_file))
        else:
            self.index = LiveIndex(index_dir, use_gpu=torch.cuda.is_available())
        source = PassageSource(self.index, store, tokenizer, self.passage_len)
        if model.opts.exclude_source == "document":  # the filter's span table, before step 1 rather than inside it
            seconds = source.build_document_table()
            log(f"retrieval: document table of {len(store)} passages for exclude_source=document in {seconds:.1f}s")
        model.attach(source)

    @classmethod
    def open(cls, cfg: RetrievalConfig, run_dir: Path, store_dir: Path, model: torch.nn.Module, tokenizer: Tokenizer,
             rank: int, world_size: int, log: Callable[[str], None] = print) -> TrainingRetrieval:
        """Every data-parallel rank calls this once the main rank has built the store (`build_store`)."""

        barrier = dist.barrier if dist.is_initialized() else (lambda: None)
        index_dir = Path(cfg.index_dir) if cfg.index_dir else run_dir / "retrieval" / "index"
        return cls(cfg, index_dir, PassageStore(store_dir), model, tokenizer, rank, world_size, barrier, log)

    def _start_from_generic_encoder(self) -> None:
        """Train the generic bi-encoder on the run's passages and start the model's retriever from it. Every rank
        trains the same one (same seed, same data), so no broadcast is needed; the run's random stream is untouched."""
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.contrastive.seed)
            encoder = DualEncoder(self.model.retriever.cfg, self.tokenizer)
            train_contrastive(encoder, self.store, self.cfg.contrastive, progress=self.rank == 0,
                              log=self.log if self.rank == 0 else (lambda m: None))
        self.model.load_retriever(encoder.query_encoder.state_dict())

    def embedder(self) -> PassageEmbedder:
        return PassageEmbedder(self.model, self.tokenizer, self.passage_len)

    def _build(self, why: str) -> None:
        manifest = build_full(self.store, self.embedder(), self.index_dir, self.spec, self.rank, self.world_size,
                              barrier=self.barrier, progress=self.rank == 0)
        self.log(f"retrieval: {why}: {manifest['ntotal']} passages, {self.spec.kind} index "
                 f"version {manifest['version']} in {self.index_dir}")

    def start_at(self, step: int) -> None:
        """Before the first step of a run that has done `step` steps: is the retriever loss on yet?"""
        self.model.learn_retriever = step >= self.cfg.retriever_delay

    def after_step(self, step: int) -> None:
        """Switch the retriever loss on after `retriever_delay` steps; re-index when `step` is due (every rank then
        searches the new version)."""
        self.start_at(step)
        if not self.refresher.due(step):
            return
        manifest = self.refresher.maybe_refresh(step, self.embedder(), progress=self.rank == 0)
        self.barrier()  # rolling refreshes run on rank 0 only: nobody reloads before it has published
        if self.cfg.service:
            if self.rank == 0:
                self.index.reload()
        else:
            self.index.reload()
        if manifest is not None:
            self.log(f"retrieval: refreshed at step {step}: index version {manifest['version']}")
