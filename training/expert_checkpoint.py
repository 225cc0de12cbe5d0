"""Consolidate a DeepSpeed checkpoint of an MoE model (any expert-parallel size) into single-rank names.

DeepSpeed writes an MoE model's experts apart from the rest: one ``layer_<i>_expert_<e>_mp_rank_00_model_states.pt``
per global expert, written by the rank that owns it, with the expert's global id already in the key
(``...experts.deepspeed_moe.experts.deepspeed_experts.<e>.w_in``), while ``mp_rank_00_model_states.pt``
holds every other weight. DeepSpeed's ``zero_to_fp32`` cannot read such a folder (it takes the expert
files for model-state files and stops), so the module weights are read here instead: exact for fp32
training, which keeps no separate master copy; a bf16 run yields its bf16 weights cast to fp32.
The experts are renamed to ``LanguageModel``'s ``...experts.mlps.<e>...``, so the result loads at EP=1.

Composed with tensor or pipeline parallelism (a ``parallel_layout.json`` beside the files), DeepSpeed
numbers both kinds of file by its model-parallel rank: the tensor rank, or ``stage x TP + tensor rank``
under a pipeline (whose MoE checkpoints hold each stage's whole module in ``mp_rank_XX`` files instead of
per-layer files, and number MoE layers per stage). Experts are whole on every tensor rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hybrid_pretrain.parallel.expert import EXPERT_KEY, single_rank_expert_name
from hybrid_pretrain.parallel.pipeline import lm_name
from hybrid_pretrain.training.checkpoint import LAYOUT, CheckpointError
from hybrid_pretrain.training.safe_load import load_pt
from hybrid_pretrain.training.shards import join_tensor_ranks

EXPERT_FILES = "layer_*_expert_*_model_states.pt"
MAIN_FILE = "mp_rank_00_model_states.pt"


def is_moe_checkpoint(tag_dir: Path) -> bool:
    return any(Path(tag_dir).glob(EXPERT_FILES))


def moe_state_dict(tag_dir: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 state dict, in single-rank LanguageModel names, of the MoE checkpoint folder `tag_dir`."""
    tag_dir = Path(tag_dir)
    main = tag_dir / MAIN_FILE
    if not main.is_file():
        raise CheckpointError(f"{main} is missing; expected the non-expert weights of an MoE checkpoint (ZeRO stage "
                              "0-2: DeepSpeed MoE does not run under ZeRO-3)")
    states = load_pt(main, trust)
    if (states.get("ds_config") or {}).get("bf16", {}).get("enabled"):
        print(f"warning: {tag_dir} is a bf16 MoE checkpoint; taking its bf16 weights (the fp32 master copies live "
              "in the ZeRO optimizer partitions)", file=sys.stderr)
    out = {k: _fp32(v) for k, v in states["module"].items()}
    for path in sorted(tag_dir.glob(EXPERT_FILES)):
        for key, value in load_pt(path, trust).items():
            if not EXPERT_KEY.match(key):
                raise CheckpointError(f"{path} holds '{key}'; expected DeepSpeed expert keys "
                                      "'...experts.deepspeed_moe.experts.deepspeed_experts.<id>...'")
            out[single_rank_expert_name(key)] = _fp32(value)
    return out


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def moe_model_parallel_state_dict(tag_dir: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 state dict, in single-rank names, of an MoE checkpoint written under tensor and/or pipeline
    parallelism (any expert-parallel size); module weights as trained (exact for fp32 runs)."""

    tag_dir = Path(tag_dir)
    layout = json.loads((tag_dir / LAYOUT).read_text())
    tp, pp, sharded = layout["tensor"], layout["pipeline"], layout["sharded"]

    def single_rank_name(key: str) -> str:
        return single_rank_expert_name(lm_name(key, layout["n_blocks"]) if pp > 1 else key)

    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for mp_rank in range(tp * pp):
        tensor_rank = mp_rank % tp
        main = tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"
        if not main.is_file():
            raise CheckpointError(f"{main} is missing; expected one model-states file per tensor rank and pipeline "
                                  f"stage ({tp * pp} for parallel.tensor={tp}, parallel.pipeline={pp})")
        states = dict(load_pt(main, trust)["module"])
        for path in sorted(tag_dir.glob(f"layer_*_expert_*_mp_rank_{mp_rank:02d}_model_states.pt")):
            states.update(load_pt(path, trust))
        for key, value in states.items():
            if torch.is_tensor(value):
                pieces.setdefault(single_rank_name(key), {})[tensor_rank] = value
    return join_tensor_ranks(pieces, sharded, tp, tag_dir)
