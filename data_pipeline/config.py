"""Data hyper-parameters for the training corpus, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.indexed import BlendEntry


@dataclass
class DataConfig:
    """Where text comes from and how it becomes training sequences.

    Two ways in. `indexed` names a folder of megatron-core IndexedDataset shards written by
    `launcher/preprocess_data.py`; `blend` weights its sets (e.g. `["0.7 pile/Github+PythonDocs",
    "0.3 pg19"]`; empty: every input in proportion to its tokens). Otherwise (the quick start) `path`
    is tokenised at start-up: empty means the embedded default corpus (Python standard-library
    sources); else a comma-separated list of Pile-style `.jsonl.zst` / `.jsonl` files or globs,
    Pile-style folders, PG-19-style folders, plain `.txt` files or `hf:` specs.
    """

    path: str = ""
    seq_len: int = 256
    tokenizer: str = ""  # an existing SentencePiece .model; empty: train one on the corpus
    vocab_size: int = 4096  # when training a tokenizer
    tokenizer_sample_bytes: int = 20_000_000  # deterministic sample the tokenizer is trained on
    max_corpus_bytes: int = 0  # stop reading the corpus after this many bytes (0: no limit)
    val_fraction: float = 0.02  # documents held out for validation when the source has no split
    indexed: str = ""  # folder of preprocessed shards; when set, path/tokenizer/vocab_size are not used
    blend: list[str] = field(default_factory=list)  # "WEIGHT INPUT[/SET+SET]" entries over `indexed`
    train_samples: int = 0  # size of one training epoch of the blend in sequences; 0: its tokens // seq_len

    def validate(self) -> None:
        """Raise DataError naming the first data.* field that cannot work (shapes only; files are checked later)."""
        if self.seq_len <= 0:
            raise DataError(f"data.seq_len must be a positive integer, got {self.seq_len}")
        if not self.tokenizer and self.vocab_size <= 0:
            raise DataError(f"data.vocab_size must be a positive integer, got {self.vocab_size}")
        if self.tokenizer_sample_bytes <= 0:
            raise DataError(f"data.tokenizer_sample_bytes must be positive, got {self.tokenizer_sample_bytes}")
        if self.max_corpus_bytes < 0:
            raise DataError(f"data.max_corpus_bytes must be >= 0 (0: no limit), got {self.max_corpus_bytes}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.train_samples < 0:
            raise DataError(f"data.train_samples must be >= 0 (0: one pass over the blend), got {self.train_samples}")
        if self.blend and not self.indexed:
            raise DataError("data.blend is set but data.indexed is empty; expected the folder of preprocessed shards")
        if self.indexed and self.path:
            raise DataError(f"data.indexed ('{self.indexed}') and data.path ('{self.path}') are both set; "
                            "expected one of them")

        for entry in self.blend:
            BlendEntry.parse(entry)
