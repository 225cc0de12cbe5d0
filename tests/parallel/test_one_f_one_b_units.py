"""Pieces of the ZeRO-2 pipeline schedule that need no ranks (the schedule itself: test_tensor_pipeline.py,
test_expert_composition.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybrid_pretrain.parallel.one_f_one_b import _empty_from_header, _header, _Stage
from hybrid_pretrain.parallel.pipeline import ENGINE_PREFIX, lm_name


def test_activation_header_round_trips_shapes_and_dtypes():
    # A model with MoE layers sends (h, aux); bf16 training sends bf16 h with an fp32 aux.
    sent = (torch.randn(2, 12, 32).bfloat16(), torch.zeros(1))
    received = _empty_from_header(_header(sent), torch.device("cpu"))
    assert [(t.shape, t.dtype) for t in received] == [(t.shape, t.dtype) for t in sent]


def test_header_refuses_what_it_cannot_describe():
    with pytest.raises(ValueError, match="at most 4 dimensions"):
        _header((torch.zeros(1, 1, 1, 1, 1),))
    with pytest.raises(ValueError, match="int64"):
        _header((torch.zeros(2, dtype=torch.int64),))
    with pytest.raises(ValueError, match="at most 2 tensors"):
        _header((torch.zeros(1),) * 3)


def test_the_engine_module_names_its_stage_as_consolidation_expects():
    # Checkpoint keys of a ZeRO-2 pipeline carry the wrapper's prefix; lm_name strips exactly that.
    stage = nn.ModuleDict({"1": nn.Linear(2, 2)})
    keys = list(_Stage(stage).state_dict())
    assert keys and all(k.startswith(ENGINE_PREFIX) for k in keys)
    assert lm_name(keys[0], 4) == "blocks.0.weight"
