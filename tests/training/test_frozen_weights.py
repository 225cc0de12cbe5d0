"""Consolidated ZeRO-1/2 weights keep frozen parameters (an Atlas query-side-only run's passage tower).

zero_to_fp32 rebuilds the parameters the optimizer partitioned; at ZeRO-1 DeepSpeed saves no frozen-parameter
fragments, so without the module state's copy `launcher/perplexity.py` could not rebuild such a run's model.
"""

from __future__ import annotations

import deepspeed.utils.zero_to_fp32 as zero_to_fp32
import torch

from hybrid_pretrain.training.weights import consolidated_state_dict


def test_frozen_parameters_come_from_the_module_state(tmp_path, monkeypatch):
    tag = tmp_path / "step00000001"
    tag.mkdir()
    trained, frozen = torch.randn(3, 2), torch.randn(4, dtype=torch.bfloat16)
    module = {"retriever.w": trained.bfloat16(), "frozen_passage_tower.w": frozen}
    torch.save({"module": module, "ds_config": {"zero_optimization": {"stage": 1}}},
               tag / "mp_rank_00_model_states.pt")
    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda ckpt_dir, tag: {"retriever.w": trained})  # the fp32 master copy, trainable only
    state = consolidated_state_dict(tmp_path, tag.name)
    assert torch.equal(state["retriever.w"], trained)  # the fp32 master weights, not the module's bf16 copy
    assert state["frozen_passage_tower.w"].dtype == torch.float32
    assert torch.equal(state["frozen_passage_tower.w"], frozen.float())
