"""The MoE debug flavors train under `deepspeed launcher/pretrain.py` on 2 CPU ranks with EP=2 (dropless) and log
routing."""

from __future__ import annotations

import json

import pytest

from hybrid_pretrain.tests.procs import REPO, SMALL_DATA, launch, run_python

SMALL = [*SMALL_DATA,
         "train.steps=16", "train.warmup_steps=3", "train.eval_every=0", "train.save_every=0"]


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["debug_switch", "debug_glam"])
def test_moe_flavor_trains_on_two_ranks_with_expert_parallelism(tmp_path, flavor):
    run_dir = tmp_path / flavor
    proc = launch(["--config", str(REPO / "configs" / f"{flavor}.yaml"), f"run_dir={run_dir}", *SMALL])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))
    for r in records:  # routing is visible every step
        tokens = [r[f"moe_tokens_expert_{e}"] for e in range(4)]
        top_k = 2 if flavor == "debug_glam" else 1
        assert sum(tokens) == pytest.approx(2 * top_k * 8 * 128)  # MoE layers x k x tokens per rank
        assert r["moe_imbalance"] >= 1 and r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0
        assert "moe_dropped_fraction" not in r  # dropless: imbalance is reported instead
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last10_mean_loss"] < 0.85 * summary["first_loss"], summary
    experts = {p.name for p in (run_dir / "checkpoints" / "step00000016").glob("layer_*_expert_*")}
    assert len(experts) == 2 * 4  # one file per global expert of each MoE layer, written by its owner


@pytest.mark.slow
def test_paper_flavors_dry_run_total_and_active_parameters():
    for flavor, total, active in (("switch_base", "3,710,310,912", "111,817,728"),
                                  ("glam_1.7b_64e", "26,696,779,776", "1,724,663,808")):
        proc = run_python(["--config", str(REPO / "configs" / f"{flavor}.yaml"), "--dry-run", "--world-size", "64"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"parameters: {total}" in proc.stdout and f"active per token: {active}" in proc.stdout, proc.stdout
        assert "EP=16" in proc.stdout
