"""The ``retrieval:`` section of a run config; imports nothing heavy so every launcher can load configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hybrid_pretrain.base.errors import ConfigError

WORDS_PER_PASSAGE = 100  # Atlas's passage length; retrieval.passages splits documents with it
KINDS = ("flat", "ivfpq", "hnsw")  # index kinds retrieval.index builds
INDEX_KINDS = ("auto", *KINDS)  # what a user may ask for; auto: chosen by corpus size (retrieval.auto)
MODES = ("full", "rolling")  # refresh modes of retrieval.refresh
RETRIEVER_INITS = ("random", "generic")  # how retrieval.retriever_init starts an Atlas retriever


@dataclass
class ContrastiveConfig:
    """Training of the generic bi-encoder (retrieval.contrastive): Contriever's independent-cropping InfoNCE."""

    steps: int = 150
    batch_size: int = 128  # passages per step; each gives one positive pair, the rest of the batch are negatives
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05  # of the softmax over in-batch passages (Contriever: 0.05)
    min_crop: float = 0.5  # each view keeps a random span of [min_crop, 1] of the passage's tokens
    seed: int = 0

    def validate(self) -> None:
        if self.steps <= 0 or self.batch_size < 2:
            raise ConfigError(f"contrastive steps must be > 0 and batch_size >= 2, got {self.steps}, "
                              f"{self.batch_size}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError(f"contrastive lr and temperature must be > 0, got {self.lr}, {self.temperature}")
        if not 0.0 < self.min_crop <= 1.0:
            raise ConfigError(f"contrastive min_crop must be in (0, 1], got {self.min_crop}")


@dataclass
class RetrievalConfig:
    """The ``retrieval:`` section of a run config (used when ``model.arch`` is ``atlas``)."""

    passages: str = ""  # a passage store folder (launcher/build_index.py); empty: built from data.path's train split
    max_passages: int = 20000  # when building the store from data.path
    words_per_passage: int = WORDS_PER_PASSAGE
    index_kind: str = "flat"  # auto | flat | ivfpq | hnsw
    target_recall: float = 0.95  # recall@10 the builder tunes search parameters for (retrieval.tuning); 0: no tuning
    index_dir: str = ""  # empty: <run_dir>/retrieval/index
    refresh_every: int = 0  # steps between re-indexing with the current passage tower; 0: never
    refresh_mode: str = "full"  # full | rolling (re-embed the stalest rolling_fraction per refresh)
    rolling_fraction: float = 0.25
    # random: the retriever starts as initialised; generic: from the project's generic bi-encoder, trained on the
    # run's passages by `contrastive` before the first index (Atlas starts from Contriever). A random retriever
    # with a reader that cannot read yet is a cold start the joint training never leaves (bench/RESULTS.md, issue 22).
    retriever_init: str = "random"
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    # Steps the reader trains alone before the retriever loss is switched on (Atlas warms its reader up first): a
    # reader that cannot read yet gives every passage the same likelihood, and fitting that uniform target
    # collapses the retriever onto hub passages.
    retriever_delay: int = 0
    # URL of an index service (python -m hybrid_pretrain.retrieval.service --index-dir <index_dir>) to search
    # instead of in-process
    service: str = ""
    # A file holding the service's access token (else $RETRIEVAL_TOKEN): the token itself never goes in a config,
    # which is written into the run directory and every converted checkpoint.
    token_file: str = ""

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if self.max_passages <= 0 or self.words_per_passage <= 0:
            raise ConfigError("retrieval.max_passages and retrieval.words_per_passage must be positive integers")
        if self.index_kind not in INDEX_KINDS:
            raise ConfigError(f"retrieval.index_kind must be one of {', '.join(INDEX_KINDS)}, got '{self.index_kind}'")
        if not 0.0 <= self.target_recall <= 1.0:
            raise ConfigError(f"retrieval.target_recall must be in (0, 1] (or 0: no tuning), got {self.target_recall}")
        if self.index_kind == "auto" and self.refresh_mode == "rolling":
            raise ConfigError("retrieval.index_kind auto may choose an index that re-ranks from disk, which a rolling "
                              "refresh cannot update in place; use refresh_mode full, or index_kind flat or ivfpq")
        if self.refresh_every < 0:
            raise ConfigError(f"retrieval.refresh_every must be >= 0, got {self.refresh_every}")
        if self.refresh_mode not in MODES:
            raise ConfigError(f"retrieval.refresh_mode must be one of {', '.join(MODES)}, got '{self.refresh_mode}'")
        if not 0.0 < self.rolling_fraction <= 1.0:
            raise ConfigError(f"retrieval.rolling_fraction must be in (0, 1], got {self.rolling_fraction}")
        if self.retriever_init not in RETRIEVER_INITS:
            raise ConfigError(f"retrieval.retriever_init must be one of {', '.join(RETRIEVER_INITS)}, "
                              f"got '{self.retriever_init}'")
        self.contrastive.validate()
        if self.retriever_delay < 0:
            raise ConfigError(f"retrieval.retriever_delay must be >= 0 (steps), got {self.retriever_delay}")
        if self.passages and not Path(self.passages).is_dir():
            raise ConfigError(f"retrieval.passages '{self.passages}' is not a folder; expected a passage store "
                              "(launcher/build_index.py writes one) or empty to build it from data.path")


def drop_legacy_token(values: object, source: str) -> object:
    """Config values with an old, empty ``retrieval.token`` removed (every run directory written before the
    token moved out of configs has one); a non-empty one is refused rather than written to disk again."""
    section = values.get("retrieval") if isinstance(values, dict) else None
    if not isinstance(section, dict) or "token" not in section:
        return values
    if section["token"]:
        raise ConfigError(f"retrieval.token in {source}: the access token no longer goes in configs (they are written "
                          "to disk); put it in a file and set retrieval.token_file=PATH, or export RETRIEVAL_TOKEN")
    return {**values, "retrieval": {k: v for k, v in section.items() if k != "token"}}
