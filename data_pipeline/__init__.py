"""Text corpora → SentencePiece tokenizer → packed token streams → per-rank batches.

The trainer needs only this surface: `prepare_data` on one rank then `PreparedData.load` (quick start),
or `IndexedData.open` on every rank (shards from `launcher/preprocess_data.py`); then a `RankBatches`
per rank.
"""

from data_pipeline.config import DataConfig
from data_pipeline.dataset import PackedSequences
from data_pipeline.errors import DataError
from data_pipeline.indexed import IndexedData
from data_pipeline.packing import PreparedData, prepare_data
from data_pipeline.sampler import RankBatches, eval_batches
from data_pipeline.sources import resolve_sources
from data_pipeline.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "DataError",
    "IndexedData",
    "PackedSequences",
    "PreparedData",
    "RankBatches",
    "Tokenizer",
    "eval_batches",
    "prepare_data",
    "resolve_sources",
    "train_tokenizer",
]
