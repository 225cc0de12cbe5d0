"""Hugging Face `datasets` as a document source: local files offline, or a hub dataset when reachable.

Specs: `hf:<file or glob>` (builder from the extension: .jsonl/.jsonl.zst/.json -> json, .txt -> text,
.parquet -> parquet) or `hf:hub:<name>[:<config>]`. Always streamed, so a corpus larger than memory
or disk cache never materialises; records keep the Pile's `meta.pile_set_name` when present.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

from hybrid_pretrain.data_pipeline.documents import Document, Source, text_problem
from hybrid_pretrain.data_pipeline.errors import DataError

BUILDERS = {".jsonl.zst": "json", ".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
HUB_SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def _builder(path: str) -> str:
    for suffix, builder in BUILDERS.items():
        if path.endswith(suffix):
            return builder
    raise DataError(f"data.path '{path}': hf: cannot tell the format; expected one of {', '.join(BUILDERS)}")


class HFSource(Source):
    """Documents from `datasets.load_dataset(..., streaming=True)`; local files form a single "train" split."""

    kind = "hf"

    def __init__(self, spec: str, text_field: str = "text") -> None:
        body = spec[len("hf:") :]
        self.text_field = text_field
        self.sets: frozenset[str] | None = None
        if body.startswith("hub:"):
            name, _, config = body[len("hub:") :].partition(":")
            if not name:
                raise DataError(f"data.path '{spec}': expected hf:hub:<name>[:<config>]")
            self.hub = (name, config or None)
            self.paths: list[Path] = []
            super().__init__(spec, ("train", "validation", "test"))  # checked lazily: the hub may be offline
            return
        self.hub = None
        pattern = os.path.expandvars(os.path.expanduser(body))
        self.paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
        if not self.paths:
            raise DataError(f"data.path '{spec}' matched no files; expected hf:<local file or glob>")
        self.builder = _builder(str(self.paths[0]))
        if any(_builder(str(p)) != self.builder for p in self.paths):
            raise DataError(f"data.path '{spec}' mixes file formats; expected files of one kind per hf: spec")
        super().__init__(spec)

    def files(self, split: str | None = None) -> list[Path]:
        return list(self.paths)

    def fingerprint(self) -> list:
        return [list(self.hub)] if self.hub else super().fingerprint()

    def _stream(self, split: str, files: list[Path]):  # noqa: ANN202 - an IterableDataset, imported lazily
        import datasets  # optional: `datasets` (pyarrow) only for hf: specs

        datasets.logging.disable_progress_bar()
        try:
            if self.hub:
                name, config = self.hub
                return datasets.load_dataset(name, config, split=HUB_SPLITS[split], streaming=True)
            return datasets.load_dataset(
                self.builder, data_files=[str(p) for p in files], split="train", streaming=True
            )
        except Exception as e:  # datasets raises many unrelated types for "not found / offline"
            raise DataError(f"data.path '{self.spec}': datasets could not open it ({type(e).__name__}: {e})") from e

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        # One file at a time, so skips and reads are counted per file like the native readers do.
        groups = [[p] for p in files] if not self.hub else [[Path(self.spec)]]
        for group in groups:
            label = group[0]
            rows = iter(self._stream(split, group))
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    break
                except Exception as e:  # a bad line or truncated file inside the datasets reader ends this file
                    self.skips.count_read(label)
                    self.skips.add(label, f"unreadable ({type(e).__name__})")
                    break
                self.skips.count_read(label)
                text = row.get(self.text_field)
                meta = row.get("meta")
                set_name = meta.get("pile_set_name") if isinstance(meta, dict) else None
                problem = "missing_text" if text is None else text_problem(text)
                if problem:
                    self.skips.add(label, problem)
                elif self.sets is not None and set_name not in self.sets:
                    self.skips.add(label, "set_not_selected")
                else:
                    yield Document(text, set_name if isinstance(set_name, str) else None)
