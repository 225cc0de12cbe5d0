"""The Atlas fact-lookup experiment: its command, what it records, and (slow) that the retriever learns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hybrid_pretrain.base.typed_config import build, read_yaml
from hybrid_pretrain.synthetic.atlas_facts import FactsRun, run_experiment
from hybrid_pretrain.tests.procs import REPO


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launcher" / "atlas_facts.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def tiny(tmp_path, **train) -> FactsRun:
    """The shipped config cut to seconds: few entities, a small tokenizer, a few steps."""
    run = build(FactsRun, read_yaml(REPO / "configs" / "debug_atlas_facts.yaml"))
    run.out_dir, run.vocab_size, run.settings = str(tmp_path / "run"), 700, ["pdist", "random"]
    run.task.entities, run.task.values = 60, 8
    run.contrastive.steps, run.contrastive.batch_size = 3, 16
    run.retrieval.refresh_every = 2
    for k, v in {"steps": 6, "eval_every": 3, "eval_queries": 12, "reader_warmup": 2, "retriever_delay": 2,
                 "batch_size": 4, **train}.items():
        setattr(run.train, k, v)
    return run


def test_cli_help_and_config_errors() -> None:
    proc = _cli(["--help"])
    assert proc.returncode == 0 and "recall" in proc.stdout
    proc = _cli(["--config", "configs/debug_atlas_facts.yaml", "train.stepz=3"])
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "train.stepz" in proc.stderr
    proc = _cli(["--config", "configs/debug_atlas_facts.yaml", "settings=[pdist,fixd]"])
    assert proc.returncode == 2 and "fixd" in proc.stderr


def test_every_setting_records_recall_and_exact_match_curves(tmp_path) -> None:
    run = tiny(tmp_path)
    results = run_experiment(run, progress=False, log=lambda _: None)
    assert results == json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["chance"] == pytest.approx(1 / 8)
    for s in results["settings"]:
        assert [h["step"] for h in s["history"]] == [0, 3, 6]
        for h in s["history"]:
            assert 0 <= h["recall@1"] <= h["recall@4"] <= 1 and 0 <= h["exact_match"] <= 1
    pdist, random = results["settings"]
    assert pdist["index_version"] > random["index_version"]  # refreshed on schedule; a frozen index never is
    # the frozen random retriever retrieves the same passages all run
    assert len({(h["recall@1"], h["recall@4"]) for h in random["history"]}) == 1
