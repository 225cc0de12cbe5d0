"""configs/debug_atlas.yaml under the DeepSpeed launcher on 2 CPU ranks: index built, refreshed, served, resumed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from hybrid_pretrain.retrieval.client import IndexClient
from hybrid_pretrain.retrieval.index import current_version
from hybrid_pretrain.tests.procs import REPO, SMALL_DATA, _free_port, launch

ATLAS = str(REPO / "configs" / "debug_atlas.yaml")


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_atlas_trains_refreshes_its_index_and_resumes_through_the_service(tmp_path):
    run_dir = tmp_path / "atlas"
    index_dir = run_dir / "retrieval" / "index"
    common = ["--config", ATLAS, f"run_dir={run_dir}", *SMALL_DATA, "retrieval.max_passages=200",
              "retrieval.refresh_every=2", "train.save_every=2", "train.eval_every=2", "train.eval_batches=1",
              "train.warmup_steps=1", "model.d_model=64", "model.rotary_dim=16"]
    first = launch([*common, "train.steps=4"])
    _ok(first)
    assert "retrieval: initial index: 200 passages" in first.stdout
    assert current_version(index_dir) == 3  # initial + refreshes after steps 2 and 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("reader_loss" in r and "retriever_loss" in r for r in records)

    # Resume with the index behind the HTTP service: the trainer searches through the client, and after
    # its refresh at step 6 tells the service to load the new version.
    port = _free_port()
    service = subprocess.Popen([sys.executable, "-m", "hybrid_pretrain.retrieval.service", "--index-dir",
                                str(index_dir), "--port", str(port)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = IndexClient(f"http://127.0.0.1:{port}")
        for _ in range(100):
            try:
                client.health()
                break
            except OSError:
                time.sleep(0.2)
        assert client.health()["version"] == 3
        resumed = launch([*common, "train.steps=6", "--resume", f"retrieval.service=http://127.0.0.1:{port}"])
        _ok(resumed)
        assert "resumed from step 4" in resumed.stdout and "initial index" not in resumed.stdout
        assert current_version(index_dir) == 4 and client.health()["version"] == 4
        assert client.stats()["queries"] > 0
    finally:
        service.terminate()
        service.wait(timeout=30)
