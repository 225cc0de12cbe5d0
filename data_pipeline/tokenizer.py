"""SentencePiece tokenizer: trained deterministically on the corpus, loaded through one small wrapper.

Settings favour exact round trips on code and books (identity normalisation, no whitespace folding,
byte fallback so no character is ever `<unk>`), because a tokenizer that silently rewrites text makes
every downstream metric subtly wrong.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.pieces import join_lines

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MARKERS = ("<retrieved>", "</retrieved>", "<query>", "<passage>")  # retrieval-augmented models splice text with these
TRAIN_SEED = 1234
TRAIN_THREADS = 4  # fixed, not os.cpu_count(): SentencePiece's BPE result depends on the thread count
CHUNK_CHARS = 4096  # SentencePiece trains on "sentences"; whole books would exceed its length limit
MAX_ENCODE_THREADS = 16


def _chunks(doc: str) -> Iterator[str]:
    """Split a document at line ends into pieces of about CHUNK_CHARS, newlines kept so they are learned."""
    return join_lines(doc.splitlines(keepends=True), CHUNK_CHARS)


def tokenizer_sample(documents: Iterable[str], sample_bytes: int) -> list[str]:
    """The first `sample_bytes` (UTF-8) of the document stream, as training chunks.

    Taking a prefix rather than a random sample keeps the tokenizer a pure function of the corpus
    order, which is already deterministic.
    """
    chunks: list[str] = []
    total = 0
    for doc in documents:
        for chunk in _chunks(doc):
            chunks.append(chunk)
            total += len(chunk.encode("utf-8"))
            if total >= sample_bytes:
                return chunks
    return chunks


def _train_model(chunks: list[str], vocab_size: int, model_type: str) -> bytes:
    model = io.BytesIO()  # receives the model so nothing touches disk until we rename it into place
    spm.set_random_generator_seed(TRAIN_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=list(MARKERS),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,  # indentation runs become single tokens
        split_digits=True,
        character_coverage=0.9995,
        max_sentence_length=4 * CHUNK_CHARS,
        input_sentence_size=0,  # the sample is already bounded by sample_bytes
        num_threads=TRAIN_THREADS,
        minloglevel=2,
    )
    return model.getvalue()


def train_tokenizer(
    documents: Iterable[str],
    out_prefix: str | Path,
    vocab_size: int,
    sample_bytes: int,
    model_type: str = "bpe",
    log: Callable[[str], None] = print,
) -> Path:
    """Train a SentencePiece model on the first `sample_bytes` of `documents`; write `<out_prefix>.model`.

    Special ids are pad=0, unk=1, bos=2, eos=3, followed by the retrieval MARKERS. A corpus too small
    for `vocab_size` gets the largest vocabulary it supports (with a warning through `log`) rather
    than a SentencePiece crash; a `vocab_size` below the byte pieces plus characters is a DataError.
    The file is written under a temporary name and renamed, so a crash never leaves a partial model.
    """
    chunks = tokenizer_sample(documents, sample_bytes)
    if not chunks:
        raise DataError("tokenizer: the corpus gave no text to train on; expected at least one non-empty document")
    try:
        model = _train_model(chunks, vocab_size, model_type)
    except RuntimeError as e:
        too_high = re.search(r"Vocabulary size too high.*value <= (\d+)", str(e))
        too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if too_high:
            clamped = int(too_high.group(1))
            log(f"warning: data.vocab_size={vocab_size} is too large for this corpus; using {clamped}")
            model = _train_model(chunks, clamped, model_type)
        elif too_low:
            raise DataError(
                f"data.vocab_size={vocab_size} is too small: this corpus needs at least {too_low.group(1)} "
                f"pieces (256 byte pieces, {4 + len(MARKERS)} special tokens and its characters)"
            ) from e
        else:
            raise
    out = Path(f"{out_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.write_bytes(model)
    os.replace(tmp, out)
    return out


class Tokenizer:
    """A loaded SentencePiece model with the ids the trainer and packer need.

    `sha256` identifies the exact model file, so checkpoints and prepared data can refuse to be mixed
    with a different tokenizer.
    """

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"data.tokenizer '{model_path}' does not exist; expected a SentencePiece .model file")
        data = self.path.read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise DataError(f"data.tokenizer '{model_path}' is not a SentencePiece .model file: {e}") from e
        self.sha256 = hashlib.sha256(data).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def marker_ids(self) -> dict[str, int]:
        """Id of each retrieval marker (-1 for a model trained without it, e.g. a user-supplied one)."""
        return {m: (i if (i := self.sp.piece_to_id(m)) != self.unk_id else -1) for m in MARKERS}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (packing adds EOS between documents)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """`encode` over many texts on SentencePiece's own threads (the GIL is released).

        `num_threads` 0 uses the machine's cores; worker processes that already split the work pass 1.
        """
        threads = num_threads or min(os.cpu_count() or 1, MAX_ENCODE_THREADS)
        return self.sp.encode(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer('{self.path}', vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
