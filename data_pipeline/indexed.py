"""Training data from preprocessed IndexedDataset shards: verified, blended by weight, split three ways.

megatron-core's `BlendedMegatronDatasetBuilder` + `GPTDataset` do the packing (documents back to back,
EOS already in the shards), the weighted blend and the per-split sample indices; we only pick the
shards, check them before training starts, and present each sample as the (seq_len + 1,) token
tensor the trainer and `RankBatches` (per-rank sharding, per-epoch reshuffle, resume state) expect.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.preprocess import MANIFEST_DIR, REPORT_FILE, TOKENIZER_FILE, set_slug
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer

SPLITS = ("train", "validation", "test")  # megatron's Split order: train, valid, test


@dataclass(frozen=True)
class Shard:
    """One verified .bin/.idx pair and what its manifest says it holds."""

    input: str
    split: str
    set: str
    prefix: str  # absolute path without extension, as megatron-core wants it
    tokens: int
    sequences: int


@dataclass(frozen=True)
class BlendEntry:
    """`"0.7 pile/Github+PythonDocs"`: a weight and the sets it covers (all of the input's sets when none)."""

    weight: float
    input: str
    sets: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> BlendEntry:
        weight, _, selector = text.strip().partition(" ")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        selector = selector.strip()
        if w <= 0 or not selector:
            raise DataError(
                f"data.blend entry '{text}' must look like 'WEIGHT INPUT[/SET+SET...]' with WEIGHT > 0, "
                "e.g. '0.7 pile/Github+PythonDocs' or '0.3 pg19'"
            )
        name, _, sets = selector.partition("/")
        return cls(w, name.strip(), tuple(set_slug(s.strip()) for s in sets.split("+") if s.strip()))

    def matches(self, shard: Shard) -> bool:
        return shard.input == self.input and (not self.sets or shard.set in self.sets)


def verify_shards(root: str | Path) -> tuple[Tokenizer, list[Shard]]:
    """Every shard under `root` checked against its manifest; DataError naming the first bad one.

    Checks, cheapest first: tokenizer hash, .bin/.idx present with the recorded byte sizes, the .idx
    parses and its sequence lengths add up to the .bin size. A .bin without a manifest is the trace of
    an interrupted preprocessing run.
    """
    root = Path(root)
    if not (root / TOKENIZER_FILE).is_file():
        raise DataError(f"data.indexed '{root}' has no {TOKENIZER_FILE}; expected a folder written by "
                        "launcher/preprocess_data.py")
    tokenizer = Tokenizer(root / TOKENIZER_FILE)
    manifests = sorted(root.glob(f"*/{MANIFEST_DIR}/*.json"))
    if not manifests:
        raise DataError(f"data.indexed '{root}' holds no shard manifests; run launcher/preprocess_data.py first")
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # optional: megatron-core only for indexed shards

    shards: list[Shard] = []
    known: set[Path] = set()
    for path in manifests:
        try:
            manifest = json.loads(path.read_text())
            outputs = manifest["outputs"]
            sha = manifest["tokenizer_sha256"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"shard manifest '{path}' is unreadable ({e}); rerun launcher/preprocess_data.py") from e
        if sha != tokenizer.sha256:
            raise DataError(f"shard manifest '{path}' was built with tokenizer {sha[:12]}, but "
                            f"'{root / TOKENIZER_FILE}' is {tokenizer.sha256[:12]}; expected one tokenizer for all")
        for out in outputs:
            prefix = root / out["prefix"]
            for ext, key in ((".bin", "bin_bytes"), (".idx", "idx_bytes")):
                file = Path(f"{prefix}{ext}")
                if not file.is_file():
                    raise DataError(f"shard '{file}' listed in '{path}' is missing; rerun launcher/preprocess_data.py")
                if file.stat().st_size != out[key]:
                    raise DataError(f"shard '{file}' is {file.stat().st_size} bytes but its manifest says {out[key]}; "
                                    "it is truncated or was modified: rerun launcher/preprocess_data.py")
            try:
                index = IndexedDataset(str(prefix))
                lengths = index.sequence_lengths
                itemsize = index.index.dtype_size
            except Exception as e:  # megatron asserts on a malformed .idx; any failure means the same thing
                raise DataError(f"shard '{prefix}.idx' is not a valid IndexedDataset index ({type(e).__name__}: "
                                f"{e}); rerun launcher/preprocess_data.py") from e
            if int(lengths.sum()) != out["tokens"] or int(lengths.sum()) * itemsize != out["bin_bytes"]:
                raise DataError(f"shard '{prefix}.idx' does not match its .bin ({int(lengths.sum())} tokens indexed, "
                                f"{out['bin_bytes']} bytes of data); rerun launcher/preprocess_data.py")
            known.add(Path(f"{prefix}.bin"))
            shards.append(Shard(manifest["unit"]["input"], out["split"], out["set"], str(prefix),
                                out["tokens"], out["sequences"]))
    stray = sorted(set(root.glob("*/*/*/*.bin")) - known)
    if stray:
        raise DataError(f"shard '{stray[0]}' has no manifest (an interrupted preprocessing run?); rerun "
                        "launcher/preprocess_data.py to finish it")
    return tokenizer, shards


def resolve_blend(blend: list[str], shards: list[Shard]) -> dict[str, tuple[list[str], list[float]]]:
    """Per split: shard prefixes and weights. An entry's weight is shared by its shards in proportion to
    their tokens; entries without shards in validation/test drop out there (weights renormalised)."""
    entries = [BlendEntry.parse(e) for e in blend] or [  # no blend: each input in proportion to its tokens
        BlendEntry(float(sum(s.tokens for s in shards if s.input == name and s.split == "train")), name)
        for name in sorted({s.input for s in shards})
    ]
    out: dict[str, tuple[list[str], list[float]]] = {}
    for split in SPLITS:
        prefixes: list[str] = []
        weights: list[float] = []
        for entry in entries:
            mine = [s for s in shards if s.split == split and entry.matches(s) and s.tokens > 0]
            if not mine and split == "train":
                available = sorted({f"{s.input}/{s.set}" for s in shards if s.split == "train"})
                raise DataError(f"data.blend entry '{entry.weight} {entry.input}{'/' if entry.sets else ''}"
                                f"{'+'.join(entry.sets)}' matches no training shard; available: {', '.join(available)}")
            total = sum(s.tokens for s in mine)
            for s in mine:
                prefixes.append(s.prefix)
                weights.append(entry.weight * s.tokens / total)
        if prefixes:
            norm = sum(weights)
            out[split] = (prefixes, [w / norm for w in weights])
    return out


class _MegatronTokenizer:
    """The few tokenizer attributes megatron-core's GPTDataset reads (ids and a cache identity)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.eod = tokenizer.eos_id
        self.eos = tokenizer.eos_id
        self.bos = tokenizer.bos_id
        self.pad = tokenizer.pad_id
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = {"class": "SentencePiece", "sha256": tokenizer.sha256}


class BlendedSequences(Dataset):
    """Sample `i` of a megatron-core GPT/Blended dataset as one (seq_len + 1,) int64 tensor.

    GPTDataset draws seq_len + 1 tokens per sample (consecutive samples share a boundary token) and
    returns them as tokens/labels; we rejoin them so the trainer sees the same layout as
    PackedSequences.
    """

    def __init__(self, dataset: Dataset, seq_len: int) -> None:
        self.dataset = dataset
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} sequences")
        item = self.dataset[int(i)]
        return torch.cat([item["tokens"], item["labels"][-1:]]).to(torch.int64)


def ensure_process_group() -> bool:
    """Start a 1-rank gloo group if none exists (megatron-core's dataset builders call torch.distributed).

    Returns True when it started one, so the caller can destroy it again.
    """
    if torch.distributed.is_initialized():
        return False
    store = Path(tempfile.mkdtemp(prefix="pg-")) / "store"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return True


@dataclass
class IndexedData:
    """What the trainer needs, built from preprocessed shards: tokenizer and train/validation/test sets."""

    root: Path
    tokenizer: Tokenizer
    train: BlendedSequences
    val: BlendedSequences
    test: BlendedSequences | None
    blend: dict[str, tuple[list[str], list[float]]] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def describe(self) -> str:
        """Per-set share of the training blend, e.g. 'pile/Github 0.35, pg19/pg19 0.30'."""
        shares: dict[str, float] = {}
        for prefix, w in zip(*self.blend["train"]):
            rel = Path(prefix).relative_to(self.root).parts
            key = f"{rel[0]}/{rel[2]}"
            shares[key] = shares.get(key, 0.0) + w
        return ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items()))

    @classmethod
    def open(
        cls,
        root: str | Path,
        seq_len: int,
        seed: int,
        blend: list[str] = (),
        train_samples: int = 0,
        cache_dir: str | Path | None = None,
        log: Callable[[str], None] = print,
    ) -> IndexedData:
        """Verify the shards under `root` and build the blended splits (call on every rank, collectively).

        `train_samples` 0 means one pass over the blend's training tokens; `RankBatches` then reshuffles
        it every epoch. Validation and test hold every token of their shards once.
        """
        # optional: megatron-core only for indexed shards
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

        # optional: megatron-core only for indexed shards
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        root = Path(root).resolve()
        tokenizer, shards = verify_shards(root)
        per_split = resolve_blend(list(blend), shards)
        if "validation" not in per_split:
            raise DataError(f"data.indexed '{root}' has no validation shards for the blend; preprocess with "
                            "--val-fraction > 0 or a source with a validation split")
        tokens = {split: sum(s.tokens for s in shards if s.prefix in per_split.get(split, ([], []))[0])
                  for split in SPLITS}
        sizes = [train_samples or tokens["train"] // seq_len, tokens["validation"] // seq_len,
                 tokens["test"] // seq_len if "test" in per_split else None]
        for split, n in zip(SPLITS[:2], sizes):
            if not n:
                raise DataError(f"the {split} shards hold {tokens[split]} tokens, fewer than one sequence of "
                                f"data.seq_len={seq_len}; add data or lower data.seq_len")
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_len,
            blend_per_split=[per_split.get(s) for s in SPLITS],
            tokenizer=_MegatronTokenizer(tokenizer),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            path_to_cache=str(cache_dir or root / "cache"),  # megatron's default is beside each shard
            mid_level_dataset_surplus=0.05,  # small sets in a weighted blend need more headroom than 0.5 %
        )
        os.environ.setdefault("MEGATRON_LOG_LEVEL", "WARNING")
        started = ensure_process_group()
        try:
            train, val, test = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        finally:
            if started:
                torch.distributed.destroy_process_group()
        report_path = root / REPORT_FILE
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        data = cls(root, tokenizer, BlendedSequences(train, seq_len), BlendedSequences(val, seq_len),
                   BlendedSequences(test, seq_len) if test is not None else None, per_split, report)
        log(f"data: {len(shards)} shards in {root}; blend {data.describe()}; {len(data.train)} train, "
            f"{len(data.val)} validation sequences of {seq_len} tokens")
        return data
