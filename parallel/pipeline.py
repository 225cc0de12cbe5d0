"""Pipeline parallelism: the LanguageModel's layers cut into stages, run by DeepSpeed's pipeline engine.

Why DeepSpeed's ``PipelineModule``/``PipelineEngine`` and not megatron-core's schedules: megatron's
schedules are CUDA-bound (streams, ``torch.cuda`` calls; see /work/shared/CPU_NOTES.md) while
DeepSpeed's engine runs its 1F1B schedule, ZeRO-1, activation checkpointing and checkpoints on CPU
over gloo unpatched, and is the same engine the non-pipelined runs use. Micro-batches per step are
``train.grad_accum``. The pipeline engine refuses ZeRO-2, so under ZeRO-2 the same stages run our
own 1F1B schedule over DeepSpeed's ordinary engine instead (``parallel.one_f_one_b``).

The stack is ``[embedding, block 0 .. block n-1, final norm, head]``. Stage cuts come from ``|`` in
``model.layers`` (``HH|AH``: blocks 0-1 on stage 0, 2-3 on stage 1) or, without cuts, an even split
of the blocks; the embedding always sits on the first stage, the norm and head on the last. A tied
head is DeepSpeed's ``TiedLayerSpec``: both end stages hold the embedding matrix and the engine
all-reduces its gradient between them. Tensor parallelism composes: layers are built with
``parallel.linear``/``parallel.vocab`` and the topology lays ranks out as megatron-core does
(tensor fastest, then data, then pipeline).

Mixture-of-experts layers make their load-balancing and z losses on whatever stage holds them, but the
loss lives on the last stage. So a model with MoE layers passes ``(h, aux)`` between stages: every block
adds its MoE losses to the running ``aux`` (1,) and the last stage's loss is ``cross-entropy + aux``,
exactly the LanguageModel's loss. DeepSpeed scales that loss by 1/micro-batches and sends ``aux``'s
gradient back through the pipe like any activation's, so each stage's routers get the gradient they get
at PP=1 (megatron-core's ``MoEAuxLossAutoScaler`` instead keeps a process-global scale that must be set
to the engine's micro-batch count, which the stages do not know).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.moe import MoE
from hybrid_pretrain.models.lm import make_block
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.parallel import sequence, vocab
from hybrid_pretrain.parallel.expert import pipeline_moe_metrics
from hybrid_pretrain.parallel.linear import column_linear

PIPE_NAME = re.compile(r"^(\d+)\.(.*)$")
TIED_EMBEDDING = "tied_modules.embed."
ENGINE_PREFIX = "pipe."  # parallel.one_f_one_b's engine module holds the stage under this name


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
    if zero_stage >= 3:
        raise ConfigError(f"train.zero_stage={zero_stage} with parallel.pipeline={pp}: ZeRO-3 would gather every "
                          "stage's weights for each micro-batch's forward and backward; expected "
                          "train.zero_stage <= 2 (or parallel.pipeline=1)")
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
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.runtime.utils import partition_uniform

    return list(partition_uniform(num_items=n, num_parts=pp))


def has_moe(cfg: ModelConfig) -> bool:
    """Whether the stages pass ``(h, aux)`` (MoE layers somewhere in the stack) rather than ``h``."""
    return any(layer.ffn == "moe" for layer in parse_pattern(cfg.layers, cfg.ffn).layers)


def deepspeed_config(cfg: ModelConfig) -> dict:
    """What the DeepSpeed JSON needs for this model's pipeline: merge into the engine's config.

    Under tensor x pipeline parallelism DeepSpeed splits each stage's output across the tensor ranks
    before sending it and all-gathers it on arrival ("pipe_partitioned"/"grad_partitioned"). That needs
    one gradient-carrying tensor that is identical on every tensor rank: a model with MoE layers also
    sends ``aux``, and under sequence parallelism each tensor rank holds its own positions, so there the
    whole activations travel instead.
    """
    if has_moe(cfg) or sequence.is_enabled():
        return {"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}
    return {}


def one_norm_all_reduce(zero_optimizer) -> None:
    """Make a ZeRO-1/2 optimizer sum its clipping norm over the stages with one all-reduce.

    DeepSpeed all-reduces each parameter group's norm over the model-parallel group (all stages and
    tensor ranks), one collective per group. Stages hold different groups (an attention-only stage has
    no SSM group with its own LR), so the counts differ and the stages deadlock. Here each rank takes
    its own norm over all groups (still reduced over its data-parallel group) and the squares are
    summed over the model-parallel group once: the same global norm.
    """
    local_norm, group = zero_optimizer.scaled_global_norm, zero_optimizer.model_parallel_group

    def global_norm(norm_type: int = 2) -> torch.Tensor:
        zero_optimizer.model_parallel_group = None  # DeepSpeed then skips its per-group model-parallel all-reduce
        try:
            norm = local_norm(norm_type)
        finally:
            zero_optimizer.model_parallel_group = group
        squares = torch.where(norm >= 0, norm.float() ** 2, torch.full_like(norm.float(), float("inf")))  # -1: inf/nan
        torch.distributed.all_reduce(squares, group=group)
        total = squares.sqrt()
        return torch.where(torch.isfinite(total), total, torch.full_like(total, -1.0))  # DeepSpeed's inf/nan mark

    zero_optimizer.scaled_global_norm = global_norm


def embed_with_aux(stage: EmbeddingStage, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, L) -> (h (B, L, D), aux (1,) zero): the first stage of a model with MoE layers."""
    h = stage(input_ids)
    # A leaf that requires grad: DeepSpeed runs backward on every floating-point output of a stage.
    return h, torch.zeros(1, device=h.device).requires_grad_()


def cross_entropy_with_aux(outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The LanguageModel's loss on the last stage: cross-entropy plus every stage's MoE aux and z losses."""
    logits, aux = outputs
    return vocab.cross_entropy(logits, labels) + aux.sum()


class EmbeddingStage(nn.Module):
    """input_ids (B, L) -> h (B, L, D); on the last stage also the tied head (``head_logits``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embedding = vocab.vocab_embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embedding(input_ids))


def head_logits(stage: EmbeddingStage, h):
    """The tied head: h (B, L, D) -> logits (B, L, V / TP) against the embedding matrix; ``(h, aux)`` passes aux on."""
    if isinstance(h, tuple):
        return vocab.tied_logits(h[0], stage.embedding.weight), h[1]
    return vocab.tied_logits(h, stage.embedding.weight)


class NormStage(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = sequence.layer_norm(cfg.d_model, cfg.norm_eps)  # nn.LayerNorm unless sequence-parallel

    def forward(self, h):
        """h (B, L, D) -> (B, L, D); ``(h, aux)`` passes aux on."""
        return (self.norm(h[0]), h[1]) if isinstance(h, tuple) else self.norm(h)


class HeadStage(nn.Module):
    """Untied head: h (B, L, D) -> logits (B, L, V / TP)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

        self.lm_head = column_linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, h):
        return (self.lm_head(h[0]), h[1]) if isinstance(h, tuple) else self.lm_head(h)


def lm_name(pipe_name: str, n_blocks: int) -> str:
    """A pipeline parameter name -> the LanguageModel's name for it (``3.mixer.q_proj.weight`` -> ``blocks.2...``)."""
    pipe_name = pipe_name.removeprefix(ENGINE_PREFIX)  # ZeRO-2 runs hold the stage inside a plain engine
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
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.pipe import LayerSpec, PipelineModule

    class AuxBlock(Block):
        """A block of a model with MoE layers: ``(h, aux) -> (h, aux + this block's MoE aux and z losses)``."""

        def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            h, aux = inputs  # (B, L, D), (1,)
            h = super().forward(h)
            if isinstance(self.ffn, MoE):
                aux = aux + self.ffn.last.aux_loss + self.ffn.last.z_loss
            return h, aux

    class BlockSpec(LayerSpec):
        """Builds block ``layer_idx`` only on the stage that holds it."""

        def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
            super().__init__(Block)
            self.cfg, self.layer_idx = cfg, layer_idx

        def build(self, log: bool = False) -> nn.Module:
            block = make_block(self.cfg, self.layer_idx)
            if not has_moe(self.cfg):
                return block
            return AuxBlock(block.mixer, block.ffn, block.norm1, block.norm2, dropout=self.cfg.dropout)

    class LanguageModelPipe(PipelineModule):
        """PipelineModule whose stage boundaries are ours (``block_bounds``), not DeepSpeed's partitioners."""

        def __init__(self, cfg: ModelConfig, topology, bounds: list[int], checkpoint_activations: bool,
                     materialize: Callable[[nn.Module], object]) -> None:
            # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
            from deepspeed.pipe import TiedLayerSpec

            self.cfg, self.n_blocks = cfg, len(bounds) and bounds[-1]
            self._materialize = materialize
            self._block_bounds = bounds
            moe = has_moe(cfg)
            layers = [TiedLayerSpec("embed", EmbeddingStage, cfg, forward_fn=embed_with_aux if moe else None,
                                    tied_weight_attr="embedding.weight")]
            layers += [BlockSpec(cfg, i) for i in range(self.n_blocks)]
            layers.append(LayerSpec(NormStage, cfg))
            if cfg.tie_embeddings:
                layers.append(TiedLayerSpec("embed", EmbeddingStage, cfg, forward_fn=head_logits,
                                            tied_weight_attr="embedding.weight"))
            else:
                layers.append(LayerSpec(HeadStage, cfg))
            super().__init__(layers=layers, topology=topology,
                             loss_fn=cross_entropy_with_aux if moe else vocab.cross_entropy,
                             activation_checkpoint_interval=1 if checkpoint_activations else 0,
                             checkpointable_layers=["Block", "AuxBlock"])

        def _build(self) -> None:
            """This stage's layers on the meta device, then ``materialize`` gives them their weights: before
            DeepSpeed moves the stage to its device and copies the tied embedding between the end stages."""
            with torch.device("meta"):
                super()._build()
            self._materialize(self)
            self._materialize = None  # it holds the meta-device single-rank model, needed no more

        def _partition_layers(self, method: str = "uniform") -> None:
            stage_id = self._topo.get_coord(self.global_rank).pipe
            # Layer 0 is the embedding: block b is layer b + 1; the norm and head close the last stage.
            self.parts = [0, *(b + 1 for b in self._block_bounds[1:-1]), len(self._layer_specs)]
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

        def lm_name(self, name: str) -> str:
            return lm_name(name, self.n_blocks)

        def step_metrics(self) -> dict[str, float]:
            """MoE routing statistics of the last micro-batch, over every stage's layers (a pipeline collective)."""
            if not has_moe(self.cfg):
                return {}

            return pipeline_moe_metrics(self, self.cfg.num_experts, self.cfg.moe_dropless,
                                        self._grid.get_pipe_parallel_group())

    return LanguageModelPipe


def build_pipeline(model_cfg: ModelConfig, pp: int, tp: int, dp: int, checkpoint_activations: bool,
                   materialize: Callable[[nn.Module], object]):
    """This rank's stage of the LanguageModel as a DeepSpeed PipelineModule.

    The stage's layers are built on the meta device and ``materialize(stage)`` gives them their weights
    (``parallel.build``: the single-rank model's, experts cut to this rank first).
    """
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    # DeepSpeed's gloo send/recv is a broadcast into the activation buffer that autograd then sees; the
    # gradients are right (tests/parallel/test_tensor_pipeline.py), the once-per-step warning is noise.
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    return _pipeline_class()(model_cfg, topology, block_bounds(model_cfg, pp), checkpoint_activations, materialize)
