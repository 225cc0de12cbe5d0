"""Checkpoints across expert-parallel layouts, both ways, on 2 real ranks over gloo.

EP=2 -> consolidated: an MoE model trained with its experts split over 2 ranks converts into one
folder whose EP=1 project model gives the EP=2 engine's logits. Consolidated -> EP=2 (ZeRO-2):
``pretrain.py --init-from`` starts from the folder's weights, so the first logged loss is the
consolidated model's loss on the run's first batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_pretrain.tests.procs import REPO, SMALL_DATA, _free_port, launch
from hybrid_pretrain.training import weights
from hybrid_pretrain.training.config import load_config, save_resolved
from hybrid_pretrain.training.expert_checkpoint import moe_state_dict

EP_WORKER = REPO / "tests" / "parallel" / "moe_ep_worker.py"
# tests/parallel/moe_ep_worker.py's model_config(top_k=2), as config overrides.
WORKER_MODEL = ["model.vocab_size=96", "data.vocab_size=96", "model.d_model=32", "model.n_heads=4", "model.layers=HAHA",
                "model.ffn=EDED", "model.h3_d_state=8", "model.max_seq_len=64", "model.num_experts=4", "model.top_k=2",
                "model.capacity_factor=1.0", "model.min_capacity=2", "parallel.expert=2", "train.zero_stage=1"]


def _run_worker(*args: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(EP_WORKER), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_ep2_checkpoint_converts_to_an_ep1_model_with_the_same_logits(tmp_path) -> None:
    from hybrid_pretrain.launcher.convert_checkpoint import convert

    run_dir = tmp_path / "run"
    save_resolved(load_config(None, [f"run_dir={run_dir}", *WORKER_MODEL]), run_dir)
    # GLaM (top-2) at EP=2, ZeRO-1: trains 4 steps, saves, and records its eval-mode logits on a fixed input.
    _run_worker("--mode", "train", "--ep", "2", "--top-k", "2", "--ckpt", str(run_dir / "checkpoints"),
                "--out", str(tmp_path / "ep2.pt"))
    ep2 = torch.load(tmp_path / "ep2.pt", weights_only=False)
    out = convert(run_dir, tmp_path / "ckpt")
    loaded = weights.load_consolidated(out)
    assert sorted(k for k in loaded.state_dict if ".experts.mlps." in k and k.endswith("w_in")) == [
        f"blocks.{b}.ffn.experts.mlps.{e}.w_in" for b in (0, 2) for e in range(4)]
    model = weights.build_model(loaded)  # the plain single-rank LanguageModel, all experts local
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(7))  # the worker's probe input
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ep2["logits"], rtol=1e-5, atol=1e-5)


def _tiny_moe_checkpoint(root: Path) -> tuple[Path, list[str]]:
    """A consolidated MoE checkpoint with a real tokenizer, written by convert_checkpoint's writer."""
    from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer
    from hybrid_pretrain.models.lm import LanguageModel
    from hybrid_pretrain.training.weights import RunWeights, save_consolidated

    text = ["def main(argv):\n    return sum(int(a) for a in argv)\n", "class A:\n    x = [1, 2, 3]\n"] * 50
    tok = Tokenizer(train_tokenizer(text, root / "tok", vocab_size=320, sample_bytes=1 << 20, log=lambda m: None))
    shape = ["model.layers=HA", "model.ffn=DE", "model.d_model=32", "model.n_heads=2", "model.h3_d_state=8",
             "model.num_experts=4", "model.top_k=1", "model.min_capacity=2", "data.seq_len=32"]
    cfg = load_config(None, [f"run_dir={root / 'source'}", *shape, f"data.vocab_size={tok.vocab_size}"])
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(5)
    model = LanguageModel(cfg.model)
    return save_consolidated(RunWeights(cfg, model.state_dict(), tok, "init"), root / "ckpt"), shape


@pytest.mark.slow
def test_init_from_a_consolidated_checkpoint_at_ep2_zero2_starts_from_its_weights(tmp_path) -> None:
    from hybrid_pretrain.data_pipeline.packing import PreparedData
    from hybrid_pretrain.data_pipeline.sampler import RankBatches

    ckpt, shape = _tiny_moe_checkpoint(tmp_path)
    run_dir = tmp_path / "run"
    proc = launch(["--init-from", str(ckpt), f"run_dir={run_dir}", *shape, *SMALL_DATA, "parallel.expert=2",
                   "train.zero_stage=2", "train.micro_batch_size=2", "train.steps=1", "train.eval_every=0",
                   "train.warmup_steps=0"])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1

    # The consolidated model (EP=1, all experts local) on each rank's first micro-batch, in training mode.
    loaded = weights.load_consolidated(ckpt)
    model = weights.build_model(loaded).train()
    data = PreparedData.load(run_dir / "data")
    assert data.tokenizer.sha256 == loaded.tokenizer.sha256  # the run adopted the checkpoint's tokenizer
    seed = load_config(str(run_dir / "config.yaml"), []).seed
    losses = []
    with torch.no_grad():
        for rank in (0, 1):
            batch = next(RankBatches(data.train, 2, rank, 2, seed))
            losses.append(float(model(batch[:, :-1], labels=batch[:, 1:])))
    assert logged["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-5, abs=1e-5)

    # The run saved at its own layout (ZeRO-2 partitions, one file per global expert), readable again.
    tag_dir = run_dir / "checkpoints" / "step00000001"
    assert len(list(tag_dir.glob("layer_0_expert_*_model_states.pt"))) == 4
    assert set(moe_state_dict(tag_dir)) == set(loaded.state_dict)


@pytest.mark.slow
def test_init_from_refuses_a_different_model_shape_naming_the_field(tmp_path) -> None:
    from hybrid_pretrain.tests.procs import run_python

    ckpt, shape = _tiny_moe_checkpoint(tmp_path)
    proc = run_python(["--init-from", str(ckpt), f"run_dir={tmp_path / 'run'}", *shape, "model.d_model=64",
                       *SMALL_DATA])
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: --init-from") and "model.d_model is 32 in the checkpoint but 64" in err[-1]
    assert not (tmp_path / "run" / "data").exists()  # refused before any data work
