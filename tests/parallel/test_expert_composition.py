"""Expert parallelism composed with tensor and with pipeline parallelism equals the single-rank run.

One 4-rank launch of tests/parallel/ep_composition_worker.py trains the hybrid H3/attention + MoE model
(``HAHA``, ffn ``DEDE``, 4 experts, Switch top-1 and GLaM top-2) under EP=2 x TP=2 and EP=2 x PP=2 (DP=2
each, ZeRO-1, and ZeRO-2 with the 1F1B schedule of parallel/one_f_one_b.py; clipping below the gradient
norm) and compares with the single-rank reference routing the same groups: every step's loss
(cross-entropy + aux + z), gradient norm and full gradients, the final weights and the MoE metrics.
Dropless layouts exchange exactly each rank's rows; the ``_capacity`` layouts use capacity factor 1.0,
which drops tokens (~30-60 % of assignments), identically.

Tolerances as tests/parallel/test_tensor_pipeline.py (relative L2 error per tensor; fp32 sums reordered,
then amplified by AdamW's ~lr-sized steps), except that gradients after step 1 are compared by their
error relative to the whole model's gradient norm: tensors with tiny gradients (H3's q projection bias,
~1e-3 of the norm) reached a relative error of 7e-4 of their own under EP x TP at step 3, yet every
tensor's error is at most 1.4e-5 of the gradient norm (measured); the bound 1e-4 leaves ~7x margin.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.tests.parallel.layout_runs import assert_resumes_and_consolidates, rel_error, run_worker
from hybrid_pretrain.tests.procs import REPO

WORKER = REPO / "tests" / "parallel" / "ep_composition_worker.py"
LAYOUTS = ("ep2_tp2_top2", "ep2_pp2_top1", "ep2_tp2_top1_capacity", "ep2_pp2_top2_capacity", "ep2_pp2_zero2_top2")
# name: (tensor, pipeline, micro-batches, top-k, dropless), as in the worker
SHAPES = {"ep2_tp2_top2": (2, 1, 1, 2, True), "ep2_pp2_top1": (1, 2, 2, 1, True),
          "ep2_tp2_top1_capacity": (2, 1, 1, 1, False), "ep2_pp2_top2_capacity": (1, 2, 2, 2, False),
          "ep2_pp2_zero2_top2": (1, 2, 2, 2, True)}
CLIP = 0.05


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_worker(WORKER, LAYOUTS, tmp_path_factory.mktemp("ep_compose"))


def _reference(results: dict, layout: str) -> dict:
    tp, pp, micro, top_k, dropless = SHAPES[layout]
    return results["reference"][(top_k, 4 // (tp * pp) * micro, dropless)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_rank(results, layout):
    ref, got = _reference(results, layout), results[layout]
    # Each rank materialised only its slice, stage and experts (parallel/materialize.py): together, bit for bit
    # the single-rank model built from the same seed.
    assert got["initial"].keys() == ref["initial"].keys()
    for name, w in ref["initial"].items():
        assert torch.equal(got["initial"][name], w), f"initial {name}"
    assert min(ref["norms"]) > CLIP  # clipping acts at every step, so a wrong norm would change every update
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=1e-4, atol=0)
    assert len(got["grads"]) == len(ref["grads"]) == 3
    for step, (grads, ref_grads) in enumerate(zip(got["grads"], ref["grads"])):
        assert grads.keys() == ref_grads.keys(), f"step {step}: parameters differ"
        assert sum(".experts.mlps." in k for k in grads) == 2 * 4 * 4  # 2 MoE layers x 4 experts x 4 tensors
        if step == 0:
            worst = max(ref_grads, key=lambda k: rel_error(grads[k], ref_grads[k]))
            assert rel_error(grads[worst], ref_grads[worst]) < 1e-5, f"step 0: gradient of {worst}"
        else:
            norm = ref["norms"][step]
            worst = max(ref_grads, key=lambda k: (grads[k] - ref_grads[k]).norm().item())
            assert (grads[worst] - ref_grads[worst]).norm().item() / norm < 1e-4, f"step {step}: gradient of {worst}"
    assert got["weights"].keys() == ref["weights"].keys()
    for name, w in ref["weights"].items():
        assert rel_error(got["weights"][name], w) < 2e-4, name


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_moe_metrics_match_the_reference_groups(results, layout):
    """The logged aux and z losses, imbalance (and dropped fraction) and tokens per expert (last micro-batch, DP
    mean)."""
    tp, pp, micro, _, dropless = SHAPES[layout]
    dp = 4 // (tp * pp)
    ref, got = _reference(results, layout), results[layout]
    for step in range(3):
        groups = [ref["group_metrics"][step][d * micro + micro - 1] for d in range(dp)]
        expected = {k: sum(g[k] for g in groups) / dp for k in groups[0]}
        assert got["metrics"][step].keys() == expected.keys()
        assert expected["moe_imbalance"] > 1
        if dropless:
            assert "moe_dropped_fraction" not in expected
        else:
            assert expected["moe_dropped_fraction"] > 0  # capacity 1.0 drops tokens, identically on both sides
        for key, value in expected.items():
            assert got["metrics"][step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"step {step}: {key}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ("ep2_tp2_top2", "ep2_pp2_top1", "ep2_pp2_zero2_top2"))
def test_checkpoint_resumes_exactly_and_consolidates_to_single_rank(results, layout):
    got = results[layout]
    # Experts from every expert-parallel rank come back under their single-rank names.
    merged = assert_resumes_and_consolidates(got, results["ckpt"] / layout)
    ref_step2 = _reference(results, layout)["weights_after"][1]
    assert merged.keys() == ref_step2.keys()
    for name, w in ref_step2.items():
        assert rel_error(merged[name], w) < 2e-4, name


@pytest.mark.parametrize("overrides,world,dp", [
    (["parallel.tensor=2", "parallel.expert=2"], 4, 2),
    (["parallel.pipeline=2", "parallel.expert=2"], 4, 2),
    (["parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=2", "model.layers=HH|AH"], 8, 2),
    (["parallel.tensor=2", "parallel.expert=1"], 2, 1),
    (["parallel.pipeline=2", "parallel.expert=2", "train.zero_stage=2"], 4, 2),
])
def test_config_accepts_expert_parallelism_with_tensor_and_pipeline(overrides, world, dp):
    from hybrid_pretrain.training.config import load_config

    cfg = load_config("configs/debug_glam.yaml", overrides)
    assert cfg.parallel.check_world(world) == dp


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.pipeline=2", "train.zero_stage=3"], 4, "ZeRO-3 would gather every stage's weights"),
    (["parallel.tensor=2", "model.jitter=0.1"], 4, "model.jitter=0.1 with parallel.tensor=2"),
    (["parallel.tensor=2", "train.zero_stage=0"], 4, "would clip by a wrong gradient norm"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], 4, "parallel.sequence_parallel with MoE layers"),
    (["parallel.tensor=2"], 2, "parallel.expert (2) must divide the data-parallel size 1"),
])
def test_config_still_refuses_what_cannot_run(overrides, world, message):
    from hybrid_pretrain.base.errors import ConfigError
    from hybrid_pretrain.training.config import load_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/debug_glam.yaml", overrides).parallel.check_world(world)


def test_expert_groups_join_data_parallel_ranks_of_one_tensor_rank_and_stage():
    # The rank arithmetic parallel.groups hands to DeepSpeed: ranks are tensor-fastest, then data, then pipeline.
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    assert _get_expert_parallel_ranks(4, 2, 2, 1) == ([[0, 2], [1, 3]], [[0], [2], [1], [3]])  # TP=2, DP=2
    assert _get_expert_parallel_ranks(4, 1, 2, 2) == ([[0, 1], [2, 3]], [[0], [1], [2], [3]])  # PP=2, DP=2
    ep, edp = _get_expert_parallel_ranks(8, 2, 1, 2)  # EP=1: expert grads reduce over the whole DP group
    assert edp == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_expert_names_map_to_single_rank_names():
    from hybrid_pretrain.parallel.expert import single_rank_expert_name

    local = "blocks.1.ffn.experts.deepspeed_moe.experts.deepspeed_experts.1.w_in"
    assert single_rank_expert_name(local, ep_rank=1, n_local=2) == "blocks.1.ffn.experts.mlps.3.w_in"
    assert single_rank_expert_name(local, ep_rank=0, n_local=2) == "blocks.1.ffn.experts.mlps.1.w_in"
    assert single_rank_expert_name("blocks.1.ffn.router.weight", 1, 2) == "blocks.1.ffn.router.weight"
