"""One CPU rank trains a small hybrid model two steps in DeepSpeed bf16 and reports the dtypes it holds.

``python -m hybrid_pretrain.tests.training.bf16_worker STAGE`` prints one JSON line: the model's weight dtypes,
the fp32 master copy (dtype, element count, whether it holds values bf16 cannot represent), the Adam state
dtypes and the loss dtype. Used by tests/training/test_bf16.py.
"""

from __future__ import annotations

import json
import sys

import torch

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.parallel import engine as ds_engine
from hybrid_pretrain.parallel import groups
from hybrid_pretrain.training.config import ParallelConfig, TrainConfig
from hybrid_pretrain.training.optimizer import param_groups


def master_copy(optimizer) -> list[torch.Tensor]:  # noqa: ANN001
    """The optimizer's fp32 master weights: ZeRO-1/2 and ZeRO-3 keep them as flat partitions."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return list(optimizer.single_partition_of_fp32_groups)
    return list(optimizer.fp32_partitioned_groups_flat)


def main(stage: int) -> dict:
    torch.manual_seed(0)
    ctx = groups.initialize(ParallelConfig())
    cfg = ModelConfig(vocab_size=128, d_model=64, n_heads=2, layers="HA", h3_d_state=16)
    model = LanguageModel(cfg)
    train = TrainConfig(micro_batch_size=2, lr=1e-3, warmup_steps=0, zero_stage=stage, precision="bf16")
    engine = ds_engine.initialize(model, param_groups(model, train.lr, train.weight_decay),
                                  ds_engine.deepspeed_config(train, ctx.dp_size), lambda step: 1.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    for _ in range(2):
        loss = engine(ids, labels=ids)
        engine.backward(loss)
        engine.step()
    master = master_copy(engine.optimizer)
    states = [v for s in engine.optimizer.optimizer.state.values() for k, v in s.items() if k.startswith("exp_avg")]
    report = {
        "weights": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "master": sorted({str(m.dtype) for m in master}),
        "master_numel": sum(m.numel() for m in master),
        "params_numel": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
        "master_finer_than_bf16": any(bool((m != m.bfloat16().float()).any()) for m in master),
        "adam_states": sorted({str(s.dtype) for s in states}),
        "adam_numel": sum(s.numel() for s in states),  # exp_avg and exp_avg_sq: twice the master's
        "loss": str(loss.dtype),
    }
    groups.destroy()
    return report


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
