"""One CPU rank trains a small model under train.precision=bf16_autocast: H3, S4D, S4, DSS and attention layers.

``python -m hybrid_pretrain.tests.training.bf16_autocast_worker STAGE RUN_DIR`` prints one JSON line: the dtypes
the engine's module holds (all, and the SSM parameters with an optimizer hint: log_dt, A, Lambda, P, B), the
training losses, the dtypes of the matmul outputs autocast computes, whether a resumed engine repeats the next
step's loss bitwise, and the dtypes ``training.weights.consolidated_state_dict`` returns from the checkpoint.
Used by tests/training/test_bf16.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.parallel import engine as ds_engine
from hybrid_pretrain.parallel import groups
from hybrid_pretrain.training.config import ParallelConfig, TrainConfig
from hybrid_pretrain.training.optimizer import param_groups
from hybrid_pretrain.training.weights import consolidated_state_dict

CFG = ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers="HS4dA", h3_d_state=16, max_seq_len=32)


def build(stage: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LanguageModel(CFG)
    train = TrainConfig(micro_batch_size=2, lr=3e-3, warmup_steps=0, zero_stage=stage, precision="bf16_autocast")
    return ds_engine.initialize(model, param_groups(model, train.lr, train.weight_decay),
                                ds_engine.deepspeed_config(train, 1), lambda step: 1.0)


def step(engine, ids: torch.Tensor) -> float:  # noqa: ANN001
    loss = engine(ids, labels=ids)
    engine.backward(loss)
    engine.step()
    return loss.item()


def main(stage: int, run_dir: Path) -> dict:
    groups.initialize(ParallelConfig())
    engine = build(stage)
    matmul_dtypes = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: matmul_dtypes.add(str(out.dtype)))
             for m in engine.module.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = [step(engine, ids) for _ in range(6)]
    for h in hooks:
        h.remove()
    engine.save_checkpoint(str(run_dir), tag="t6")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        trained = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    next_loss = step(engine, ids)
    resumed = build(stage)
    resumed.load_checkpoint(str(run_dir), tag="t6")
    resumed_loss = step(resumed, ids)
    hinted = {n: str(p.dtype) for n, p in engine.module.named_parameters() if hasattr(p, "_optim")}
    consolidated = consolidated_state_dict(run_dir, "t6")
    report = {
        "weights": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "ssm_params": hinted,
        "losses": losses,
        "matmul_outputs": sorted(matmul_dtypes),
        "resumed_equal": resumed_loss == next_loss,
        "consolidated": sorted({str(t.dtype) for t in consolidated.values()}),
        "consolidated_ssm": {n: str(consolidated[n].dtype) for n in hinted},
        "consolidated_exact": all(torch.equal(consolidated[n], t) for n, t in trained.items()),
    }
    groups.destroy()
    return report


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), Path(sys.argv[2]))))
