"""Index builders take the folder's lock: a second builder is refused, a crashed one's leftovers are cleared."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_pretrain.retrieval.build import build_from_vectors, build_full
from hybrid_pretrain.retrieval.build_lock import BuildLock
from hybrid_pretrain.retrieval.errors import RetrievalIndexError
from hybrid_pretrain.retrieval.index import IndexSpec, current_version, load_index, publish, staging_dir, version_dir
from hybrid_pretrain.tests.retrieval.vectors import clustered, ids_for


def test_second_builder_is_refused_and_current_stays_intact(tmp_path):
    x, ids = clustered(50, 8), ids_for(50)
    build_from_vectors(tmp_path, IndexSpec("flat"), x, ids)
    with BuildLock(tmp_path), pytest.raises(RetrievalIndexError, match="being built by another process"):
        build_from_vectors(tmp_path, IndexSpec("flat"), x, ids)
    with BuildLock(tmp_path), pytest.raises(RetrievalIndexError, match="being built by another process"):
        build_full(None, None, tmp_path, IndexSpec("flat"), progress=False)  # refused before touching anything
    assert current_version(tmp_path) == 1
    index, _ = load_index(tmp_path, use_gpu=False)
    assert index.ntotal == 50
    assert build_from_vectors(tmp_path, IndexSpec("flat"), x, ids)["version"] == 2  # the lock was released


def test_crashed_builders_leftovers_are_cleared_and_versions_never_replaced(tmp_path):
    x, ids = clustered(50, 8), ids_for(50)
    build_from_vectors(tmp_path, IndexSpec("flat"), x, ids)
    staging_dir(tmp_path, 2).mkdir()  # a builder died mid-build ...
    (staging_dir(tmp_path, 2) / "shard_00000.faiss").write_bytes(b"half")
    version_dir(tmp_path, 3).mkdir()  # ... and another after its rename, before moving CURRENT
    assert build_from_vectors(tmp_path, IndexSpec("flat"), x, ids)["version"] == 2
    assert not staging_dir(tmp_path, 2).exists() and not version_dir(tmp_path, 3).exists()
    staging_dir(tmp_path, 2).mkdir()
    with pytest.raises(RetrievalIndexError, match="already exists"):
        publish(tmp_path, 2, {"spec": {}, "shards": []})
    assert load_index(tmp_path, use_gpu=False)[0].ntotal == len(np.unique(ids))
