"""Issue 8's round trip across model-parallel layouts on 2 real ranks over gloo.

Save at TP=2 x PP=1, convert to one consolidated folder, then start a PP=2 x TP=1 run from it with
``pretrain.py --init-from``: its first logged loss is the consolidated (single-rank) model's loss on
the same micro-batches, so the weights crossed both layouts intact.
"""

from __future__ import annotations

import json

import pytest
import torch

from hybrid_pretrain.tests.procs import SMALL_DATA, launch
from hybrid_pretrain.training import weights
from hybrid_pretrain.training.config import load_config

SHAPE = ["model.layers=HAHA", "model.d_model=32", "model.n_heads=2", "model.h3_d_state=8", "data.seq_len=32",
         "train.eval_every=0", "train.warmup_steps=0", "train.zero_stage=1"]


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _seed_init(cfg) -> dict:
    from hybrid_pretrain.models.architectures import build_arch

    torch.manual_seed(cfg.seed)
    return build_arch(cfg.model).state_dict()


def _first_two(data, seed: int) -> list:
    from hybrid_pretrain.data_pipeline.sampler import RankBatches

    batches = RankBatches(data.train, 2, 0, 1, seed)
    return [next(batches), next(batches)]


@pytest.mark.slow
def test_tp2_checkpoint_converts_and_continues_at_pp2_from_the_same_weights(tmp_path) -> None:
    from hybrid_pretrain.data_pipeline.packing import PreparedData
    from hybrid_pretrain.launcher.convert_checkpoint import convert

    source = tmp_path / "tp2"
    # A large learning rate moves the weights far from the seed's initialisation, which the PP run would
    # otherwise start from too: only loaded weights give the consolidated model's loss.
    _ok(launch([f"run_dir={source}", *SHAPE, *SMALL_DATA, "parallel.tensor=2", "train.steps=3", "train.lr=1e-2",
                "train.micro_batch_size=2"]))
    assert json.loads((source / "checkpoints" / "step00000003" / "parallel_layout.json").read_text())
    ckpt = convert(source, tmp_path / "ckpt")
    loaded = weights.load_consolidated(ckpt)
    model = weights.build_model(loaded).train()

    target = tmp_path / "pp2"
    _ok(launch(["--init-from", str(ckpt), f"run_dir={target}", *SHAPE, *SMALL_DATA, "parallel.pipeline=2",
                "train.steps=1", "train.micro_batch_size=2", "train.grad_accum=2"]))
    logged = json.loads((target / "metrics.jsonl").read_text().splitlines()[0])
    data = PreparedData.load(target / "data")
    seed = load_config(str(target / "config.yaml"), []).seed
    with torch.no_grad():  # DP=1: both stages read the same two micro-batches
        losses = [float(model(b[:, :-1], labels=b[:, 1:])) for b in _first_two(data, seed)]
    assert logged["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-5, abs=1e-5)
    initial = weights.build_model(weights.RunWeights(loaded.config, _seed_init(loaded.config), None, "seed")).train()
    with torch.no_grad():
        fresh = sum(float(initial(b[:, :-1], labels=b[:, 1:])) for b in _first_two(data, seed)) / 2
    assert abs(fresh - logged["train_loss"]) > 1e-3  # the check above could not pass by starting from the seed
    assert (target / "checkpoints" / "step00000001" / "parallel_layout.json").is_file()
