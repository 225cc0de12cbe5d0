"""A run directory laid out as launcher/pretrain.py writes it, with a ZeRO-0 checkpoint written by hand.

Loading, generation and conversion tests need a real checkpoint layout without paying for a training run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.training.checkpoint import write_manifest
from hybrid_pretrain.training.config import load_config, save_resolved


def fake_zero0_run(run_dir: Path, layers: str = "HA", tie: bool = True, overrides: Sequence[str] = ()) -> LanguageModel:
    """Tiny model (vocab 64, no tokenizer) saved as step 1; returns the model whose weights were saved.

    `overrides` are more ``key=value`` config overrides, e.g. ``model.ffn=DE`` for an MoE layer.
    """
    cfg = load_config(None, [f"run_dir={run_dir}", f"model.layers={layers}", "model.d_model=32", "model.n_heads=2",
                             "model.h3_d_state=8", "data.vocab_size=64", f"model.tie_embeddings={str(tie).lower()}",
                             *overrides])
    save_resolved(cfg, run_dir)
    cfg.model.vocab_size = 64
    torch.manual_seed(0)
    model = LanguageModel(cfg.model).eval()
    tag_dir = run_dir / "checkpoints" / "step00000001"
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}},
               tag_dir / "mp_rank_00_model_states.pt")
    write_manifest(tag_dir)
    (run_dir / "checkpoints" / "latest").write_text("step00000001")
    return model
