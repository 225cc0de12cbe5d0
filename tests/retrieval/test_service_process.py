"""ServiceProcess: the real service as a child process, on the port it bound itself."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hybrid_pretrain.retrieval.auth import TOKEN_ENV
from hybrid_pretrain.retrieval.build import build_from_vectors
from hybrid_pretrain.retrieval.client import IndexClient
from hybrid_pretrain.retrieval.index import IndexSpec
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.service_process import ServiceProcess


def test_child_service_answers_like_in_process_search(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    ids = np.arange(1000, 1500, dtype=np.int64)
    build_from_vectors(tmp_path / "index", IndexSpec("flat"), x, ids)
    queries = x[:7] + 0.01
    expected_scores, expected_ids = LiveIndex(tmp_path / "index", use_gpu=False).search(queries, 5)
    env = dict(os.environ, **{TOKEN_ENV: "s3cret"})
    service = ServiceProcess(tmp_path / "index", env=env, extra_args=["--max-wait-ms", "1"])
    with pytest.raises(RuntimeError, match="known once it has started"):
        _ = service.url  # port 0: the service picks it
    with service:
        assert service.url.startswith("http://127.0.0.1:") and not service.url.endswith(":0")
        client = IndexClient(service.url, token="s3cret")
        try:
            scores, found = client.search(queries, 5)
        finally:
            client.close()
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
    assert service.proc is None  # stopped on exit


def test_a_service_that_cannot_start_reports_its_own_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with 2:.*error:"):
        with ServiceProcess(tmp_path / "no-such-index", startup_timeout=60):
            pass
