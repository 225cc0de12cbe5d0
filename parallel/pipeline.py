"""Pipeline parallelism: the LanguageModel's layers cut into stages, run by DeepSpeed's pipeline engine.

Why DeepSpeed's ``PipelineModule``/``PipelineEngine`` and not megatron-core's schedules: megatron's
schedules are CUDA-bound (streams, ``torch.cuda`` calls; see /work/shared/CPU_NOTES.md) while
DeepSpeed's engine runs its 1F1B schedule, ZeRO-1, activation checkpointing and checkpoints on CPU
over gloo unpatched, and is the same engine the non-pipelined runs use. Micro-batches per step are
``train.grad_accum``.

The stack is ``[embedding, block 0 .. block n-1, final norm, head]``. Stage cuts come from ``|`` in
``model.layers`` (``HH|AH``: blocks 0-1 on stage 0, 2-3 on stage 1) or, without cuts, an even split
of the blocks; the embedding always sits on the first stage, the norm and head on the last. A tied
head is DeepSpeed's ``TiedLayerSpec``: both end stages hold the embedding matrix and the engine
all-reduces its gradient between them. Tensor parallelism composes: layers are built with
``parallel.linear``/``parallel.vocab`` and the topology lays ranks out as megatron-core does
(tensor fastest, then data, then pipeline).
"""

from __future__ import annotations

import functools
import re
import warnings

import torch
from torch import nn

from models.config import ConfigError, ModelConfig
from models.pattern import parse_pattern
from parallel import vocab

PIPE_NAME = re.compile(r"^(\d+)\.(.*)$")
TIED_EMBEDDING = "tied_modules.embed."


def check_model(model_cfg: ModelConfig, pp: int, zero_stage: int, grad_clip: float = 0.0) -> None:
    """Raise ConfigError for a model or optimizer setting the pipeline cannot run."""
    if pp == 1:
        return
    plan = parse_pattern(model_cfg.layers, model_cfg.ffn)
    if model_cfg.arch != "lm":
        raise ConfigError(f"parallel.pipeline={pp} supports model.arch 'lm' only, got '{model_cfg.arch}'")
    if plan.stage_cuts and plan.num_stages != pp:
        raise ConfigError(f"model.layers '{model_cfg.layers}' has {plan.num_stages} stages ('|' cuts) but "
                          f"parallel.pipeline is {pp}; expected {pp - 1} '|' or none (even split)")
    if len(plan.layers) < pp:
        raise ConfigError(f"model.layers has {len(plan.layers)} layers, fewer than parallel.pipeline ({pp}) stages")
    if any(layer.ffn == "moe" for layer in plan.layers):
        # The MoE aux and z losses live on every stage's layers but the loss only on the last stage.
        raise ConfigError(f"parallel.pipeline={pp} with MoE layers (model.ffn '{model_cfg.ffn}') is not supported "
                          "yet (tracked in issue 6); expected parallel.pipeline=1")
    if zero_stage >= 2:
        raise ConfigError(f"train.zero_stage={zero_stage} with parallel.pipeline={pp}: DeepSpeed's pipeline engine "
                          "supports ZeRO-0 and ZeRO-1 only (ZeRO-2/3 shard gradients it accumulates across "
                          "micro-batches); expected train.zero_stage <= 1")
    if zero_stage == 0 and grad_clip > 0:
        # Without ZeRO, DeepSpeed's clip_grad_norm_ counts replicated parameters on model-parallel rank 0
        # only, i.e. on the first stage: later stages' norms and biases drop out of the norm (measured).
        raise ConfigError(f"train.zero_stage=0 with parallel.pipeline={pp} would clip by a wrong gradient norm "
                          "(DeepSpeed leaves later stages' replicated parameters out); expected "
                          "train.zero_stage=1 or train.grad_clip=0")


def block_bounds(model_cfg: ModelConfig, pp: int) -> list[int]:
    """Block index where each stage starts, plus the number of blocks: ``pp + 1`` increasing numbers."""
    plan = parse_pattern(model_cfg.layers, model_cfg.ffn)
    n = len(plan.layers)
    if plan.stage_cuts:
        return [0, *plan.stage_cuts, n]
    from deepspeed.runtime.utils import partition_uniform

    return list(partition_uniform(num_items=n, num_parts=pp))


class EmbeddingStage(nn.Module):
    """input_ids (B, L) -> h (B, L, D); on the last stage also the tied head (``head_logits``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embedding = vocab.vocab_embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embedding(input_ids))


def head_logits(stage: EmbeddingStage, h: torch.Tensor) -> torch.Tensor:
    """The tied head: h (B, L, D) -> logits (B, L, V / TP) against the embedding matrix."""
    return vocab.tied_logits(h, stage.embedding.weight)


class NormStage(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class HeadStage(nn.Module):
    """Untied head: h (B, L, D) -> logits (B, L, V / TP)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from parallel.linear import column_linear

        self.lm_head = column_linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)


def lm_name(pipe_name: str, n_blocks: int) -> str:
    """A pipeline parameter name -> the LanguageModel's name for it (``3.mixer.q_proj.weight`` -> ``blocks.2...``)."""
    if pipe_name.startswith(TIED_EMBEDDING):
        return pipe_name[len(TIED_EMBEDDING):].removeprefix("drop.")
    m = PIPE_NAME.match(pipe_name)
    if not m:
        raise KeyError(f"unexpected pipeline parameter name '{pipe_name}'")
    idx, rest = int(m.group(1)), m.group(2)
    if 1 <= idx <= n_blocks:
        return f"blocks.{idx - 1}.{rest}"
    return rest  # norm.* (layer n + 1) or lm_head.* (layer n + 2)


@functools.cache
def _pipeline_class() -> type[nn.Module]:
    """Defined on first use so importing this module does not import DeepSpeed."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    from models.block import Block
    from models.lm import make_block

    class BlockSpec(LayerSpec):
        """Builds block ``layer_idx`` only on the stage that holds it."""

        def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
            super().__init__(Block)
            self.cfg, self.layer_idx = cfg, layer_idx

        def build(self, log: bool = False) -> nn.Module:
            return make_block(self.cfg, self.layer_idx)

    class LanguageModelPipe(PipelineModule):
        """PipelineModule whose stage boundaries are ours (``block_bounds``), not DeepSpeed's partitioners."""

        def __init__(self, cfg: ModelConfig, topology, bounds: list[int], checkpoint_activations: bool) -> None:
            from deepspeed.pipe import TiedLayerSpec

            self.cfg, self.n_blocks = cfg, len(bounds) and bounds[-1]
            self._block_bounds = bounds
            layers = [TiedLayerSpec("embed", EmbeddingStage, cfg, tied_weight_attr="embedding.weight")]
            layers += [BlockSpec(cfg, i) for i in range(self.n_blocks)]
            layers.append(LayerSpec(NormStage, cfg))
            if cfg.tie_embeddings:
                layers.append(TiedLayerSpec("embed", EmbeddingStage, cfg, forward_fn=head_logits,
                                            tied_weight_attr="embedding.weight"))
            else:
                layers.append(LayerSpec(HeadStage, cfg))
            super().__init__(layers=layers, topology=topology, loss_fn=vocab.cross_entropy,
                             activation_checkpoint_interval=1 if checkpoint_activations else 0,
                             checkpointable_layers=["Block"])

        def _partition_layers(self, method: str = "uniform") -> None:
            stage_id = self._topo.get_coord(self.global_rank).pipe
            # Layer 0 is the embedding: block b is layer b + 1; the norm and head close the last stage.
            self.parts = [0, *(b + 1 for b in self._block_bounds[1:-1]), len(self._layer_specs)]
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

        def lm_name(self, name: str) -> str:
            return lm_name(name, self.n_blocks)

    return LanguageModelPipe


def build_pipeline(model_cfg: ModelConfig, pp: int, tp: int, dp: int, checkpoint_activations: bool = False):
    """This rank's stage of the LanguageModel as a DeepSpeed PipelineModule (weights: see ``load_full_state``)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    # DeepSpeed's gloo send/recv is a broadcast into the activation buffer that autograd then sees; the
    # gradients are right (tests/parallel/test_tensor_pipeline.py), the once-per-step warning is noise.
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    return _pipeline_class()(model_cfg, topology, block_bounds(model_cfg, pp), checkpoint_activations)
