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


def tiny(tmp_path, query_side_only: bool = False, **train) -> FactsRun:
    """The shipped config cut to seconds: few entities, a small tokenizer, a few steps. Both retriever towers
    train unless `query_side_only` (the shipped setting), so the index is re-embedded on schedule."""
    run = build(FactsRun, read_yaml(REPO / "configs" / "debug_atlas_facts.yaml"))
    run.model.options["atlas"]["query_side_only"] = query_side_only
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
    proc = _cli(["--config", "configs/debug_atlas_facts.yaml", "model.options.atlas.match_feature=maybe"])
    assert proc.returncode == 2 and "model.options.atlas.match_feature must be bool" in proc.stderr  # before any work


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


def test_a_rerun_into_the_same_out_dir_starts_from_its_own_initial_index(tmp_path) -> None:
    """Each setting's index is rebuilt from the initial weights, not resumed from the last run's final one."""
    first, again = (run_experiment(tiny(tmp_path), progress=False, log=lambda _: None) for _ in range(2))
    assert [s["history"] for s in again["settings"]] == [s["history"] for s in first["settings"]]
    assert [s["index_version"] for s in again["settings"]] == [s["index_version"] for s in first["settings"]]


def test_query_side_training_never_re_embeds_the_index(tmp_path) -> None:
    """The shipped setting trains the query tower only: the index built at the start stays exact all run, and the
    scheduled refreshes find nothing stale (they would re-embed every passage for nothing)."""
    run = tiny(tmp_path, query_side_only=True)
    run.settings = ["pdist"]
    pdist = run_experiment(run, progress=False, log=lambda _: None)["settings"][0]
    assert pdist["index_version"] == 1  # refresh_every 2 over 6 steps: three refreshes due, none needed


@pytest.mark.slow
def test_pdist_retriever_learns_from_the_reader_alone(tmp_path) -> None:
    """The shipped experiment at a smaller budget (1,000 entities, 500 steps) with the retriever untrained at the
    start: PDist's retriever finds the gold passage far more often than the same retriever frozen, and the
    reader (which flags passage words that occur in the question) answers whenever the gold passage is among
    those it is given, closed book near chance. (Here the generic bi-encoder alone already has gold recall@4
    0.94, which leaves PDist nothing to show.) Measured on the AMD EPYC VM: recall@4 0.97 vs 0.23, exact match
    0.98 vs 0.30, closed book 0.11 / 0.04 (chance 0.05, 100 questions). At 400 steps PDist was still rising there
    (recall@4 0.48 at the end; 0.75 on the Intel VM the test was first written on), too close to the margin."""
    run = build(FactsRun, read_yaml(REPO / "configs" / "debug_atlas_facts.yaml"))
    run.out_dir, run.vocab_size, run.settings = str(tmp_path / "run"), 1024, ["pdist", "random"]
    run.task.entities, run.task.values, run.retriever_init = 1000, 20, "untrained"
    run.model.options["atlas"]["query_side_only"] = False  # an untrained passage tower must learn too
    for k, v in {"steps": 500, "reader_warmup": 250, "retriever_delay": 250, "eval_every": 125,
                 "eval_queries": 100}.items():
        setattr(run.train, k, v)
    pdist, random = (s["history"] for s in run_experiment(run, progress=False, log=lambda _: None)["settings"])
    end, rand = pdist[-1], random[-1]
    assert pdist[0]["recall@4"] == random[0]["recall@4"]  # the same untrained retriever at the start
    assert end["recall@4"] >= rand["recall@4"] + 0.35, (pdist, random)
    assert end["exact_match"] >= rand["exact_match"] + 0.35, (end, rand)
    for h in (end, rand):  # the reader answers from the gold passage when it has it, and only then
        assert h["recall@4"] - 0.1 <= h["exact_match"] <= h["recall@4"] + 0.1, h
        assert h["closed_book"] <= 3 * run.task.chance, h


@pytest.mark.slow  # two runs and an index service start-up
def test_the_index_service_gives_the_same_curves_with_no_failed_query(tmp_path) -> None:
    local = run_experiment(tiny(tmp_path / "local", steps=8, eval_every=2), progress=False, log=lambda _: None)
    served = run_experiment(tiny(tmp_path / "served", steps=8, eval_every=2), through_service=True, progress=False,
                            log=lambda _: None)
    for a, b in zip(local["settings"], served["settings"], strict=True):
        assert [{k: v for k, v in h.items() if k.startswith("recall")} for h in a["history"]] == \
               [{k: v for k, v in h.items() if k.startswith("recall")} for h in b["history"]]
        assert b["service"]["searches"] > 0 and b["service"]["failed"] == 0 and b["service"]["rejected"] == 0
        assert b["index_version"] == a["index_version"]  # the service reloaded after every refresh
