"""launcher/build_index.py: build, refresh, errors, and a 2-rank sharded build equal to a 1-rank one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybrid_pretrain.data_pipeline.tokenizer import train_tokenizer
from hybrid_pretrain.launcher.build_index import main
from hybrid_pretrain.retrieval.index import load_index, read_manifest
from hybrid_pretrain.tests.data_pipeline.corpora import prose
from hybrid_pretrain.tests.procs import REPO, _free_port


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (root / f"d{i}.txt").write_text(prose(i, 260))
    tok = train_tokenizer([prose(i, 400) for i in range(30)], root / "tok", vocab_size=320, sample_bytes=200_000)
    return root, tok


def _args(root: Path, tok: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(root / "*.txt"), "--out", str(out), "--encoder", "random", "--tokenizer", str(tok),
            "--no-progress", *extra]


def test_build_then_refresh(tmp_path, corpus, capsys):
    root, tok = corpus
    assert main(_args(root, tok, tmp_path / "o")) == 0
    m1 = read_manifest(tmp_path / "o" / "index")
    assert m1["version"] == 1 and m1["ntotal"] == m1["passage_store"]["passages"] == 18
    assert m1["choice"]["requested"] == "auto" and m1["choice"]["kind"] == "flat"  # 18 passages: exact search
    (root / "d6.txt").write_text(prose(60, 120))
    try:
        assert main(_args(root, tok, tmp_path / "o", "--refresh")) == 0
    finally:
        (root / "d6.txt").unlink()
    m2 = read_manifest(tmp_path / "o" / "index")
    assert m2["version"] == 2 and m2["changes"] == {"removed": 0, "added": 2} and m2["ntotal"] == 20
    assert "published version 2" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, corpus, capsys):
    root, tok = corpus
    assert main(_args(root, tok, tmp_path / "o", "--refresh")) == 2
    assert "no published index" in capsys.readouterr().err
    assert main(["--data", str(root / "*.txt"), "--out", str(tmp_path / "o"), "--encoder", "random"]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    assert main(_args(root, tok, tmp_path / "o", "--kind", "ivfpq", "--pq-m", "5")) == 2
    assert "pq_m" in capsys.readouterr().err
    assert main(_args(root, tok, tmp_path / "o", "--target-recall", "1.5")) == 2
    assert "target_recall must be in (0, 1]" in capsys.readouterr().err
    assert main(_args(root, tok, tmp_path / "o", "--kind", "ivfpq", "--fast-scan", "--pq-bits", "8")) == 2
    assert "fast_scan needs kind ivfpq with pq_bits 4" in capsys.readouterr().err


def test_fast_scan_flag_builds_four_bit_codes(tmp_path, corpus):
    root, tok = corpus
    assert main(_args(root, tok, tmp_path / "o", "--kind", "ivfpq", "--fast-scan", "--nlist", "1", "--pq-m", "8",
                      "--target-recall", "0")) == 0
    manifest = read_manifest(tmp_path / "o" / "index")
    assert manifest["choice"]["factory"] == "IVF1,PQ8x4fs" and manifest["spec"]["pq_bits"] == 4


@pytest.mark.slow
def test_two_rank_sharded_build_equals_one_rank(tmp_path, corpus):
    root, tok = corpus
    assert main(_args(root, tok, tmp_path / "one")) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(REPO / "launcher" / "build_index.py"), *_args(root, tok, tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, _ = load_index(tmp_path / "one" / "index", use_gpu=False)
    two, manifest = load_index(tmp_path / "two" / "index", use_gpu=False)
    assert len(manifest["shards"]) == 2 and [s["ntotal"] for s in manifest["shards"]] == [9, 9]
    q = np.random.default_rng(0).normal(size=(5, one.d)).astype(np.float32)
    s1, i1 = one.search(q, 6)
    s2, i2 = two.search(q, 6)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
