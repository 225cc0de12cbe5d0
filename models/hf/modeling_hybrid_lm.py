"""Hugging Face ``AutoModelForCausalLM`` for the project's hybrid H3/attention/MoE LM.

Choice: this file imports the project's ``models.lm.LanguageModel`` and its decoding core
(``models.generation.DecodingState``) instead of duplicating them, so the package must be installed
where the checkpoint is loaded (``pip install -e '.[hf]'`` of this repository, or the wheel). One
implementation means the HF model cannot drift from the trained one, and ``generate`` here gives the
same greedy tokens as ``launcher/generate.py``.

Generation carries the recurrent state (H3's shift and diagonal SSM states, attention's KV cache, ...)
from one forward to the next in a ``HybridLMCache``, a transformers ``Cache``, as transformers' own
Mamba and MiniMax models carry theirs: the first forward prefills the prompts, every later one reads one
new token per row, so an H3 layer does O(1) work per token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.generation import DecodingState
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.roles import IGNORE_INDEX

from .configuration_hybrid_lm import HybridLMConfig

# transformers 5.24 renamed generate's cache argument and output field `past_key_values` to `cache`; this
# model passes its cache under the name of the installed version, so all of transformers 5 can run it.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def model_config(config: HybridLMConfig) -> ModelConfig:
    """The project's ModelConfig from the HF config's attributes of the same names."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{name: getattr(config, name) for name in fields if hasattr(config, name)})


def prompt_lengths(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Each row's prompt length (B,) from a left-padding `attention_mask` (B, L); None means no padding.

    Raises ValueError for any other mask (right padding, holes, an empty row): padding must not enter a state.
    """
    B, L = input_ids.shape
    if attention_mask is None:
        return torch.full((B,), L, device=input_ids.device)
    lengths = attention_mask.sum(-1)  # (B,)
    left_padded = torch.arange(L, device=attention_mask.device) >= L - lengths.unsqueeze(1)  # (B, L)
    if attention_mask.shape != (B, L) or not torch.equal(attention_mask.bool(), left_padded) or lengths.min() < 1:
        raise ValueError(
            "HybridLMForCausalLM generates from left-padded prompts: each attention_mask row must be zeros, then "
            f"at least one 1 up to the end (tokenizer padding_side='left'); got {attention_mask.tolist()}"
        )
    return lengths


class HybridLMCacheLayer:
    """One block's recurrent states, one per group of equal-length rows (a view of the DecodingState's)."""

    is_compileable = False  # python-int positions and a per-length grouping of the batch
    is_croppable = False  # a recurrent state cannot be rolled back by dropping positions
    supports_early_init = False

    def __init__(self) -> None:
        self.states: list[dict] = []


class HybridLMCache(Cache):
    """The batch's decoding state in transformers' ``Cache`` interface, handed from one forward to the next.

    It holds the shared ``DecodingState`` (rows grouped by prompt length, each group with per-block states);
    ``layers[i].states`` shows block i's. `max_len` is the positions each row may reach (prompt and new
    tokens): attention KV caches are allocated once at that size. ``get_seq_length`` counts the positions
    of the left-padded batch read so far, which is what transformers expects of it.
    """

    def __init__(self, num_layers: int, max_len: int) -> None:
        super().__init__(layers=[HybridLMCacheLayer() for _ in range(num_layers)])
        self.max_len = max_len
        self.decoding: DecodingState | None = None
        self.seen = 0

    def start(self, decoding: DecodingState) -> None:
        """Hold this batch's decoding state; the layers show its per-group states."""
        self.decoding = decoding
        for i, layer in enumerate(self.layers):
            layer.states = [group.state[i] for group in decoding.groups]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    """Wraps LanguageModel as ``self.model``; weights are stored as ``model.<LanguageModel key>``."""

    config_class = HybridLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: HybridLMConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(model_config(config))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; a fresh model keeps LanguageModel's own GPT-2 init."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: HybridLMCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, L) -> logits.

        Without `cache`: one full forward, logits (B, L, V); `labels` follow HF (unshifted, -100 ignored), so
        shifted here. Only right padding is meaningful there (the model is causal, so padding after the
        tokens does not change the logits before it); a left-padded mask is refused.

        With a HybridLMCache (what ``generate`` passes, as `cache` or, before transformers 5.24,
        `past_key_values`): the first call prefills the left-padded prompts (`attention_mask` marks the
        padding), later calls read the next token(s) of every row from the cache's state. The logits are
        then the last position's only, (B, 1, V).
        """
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is None:
            if attention_mask is not None and (attention_mask.diff(dim=-1) > 0).any():
                raise ValueError("a left-padded attention_mask needs the cached path (generate or a HybridLMCache)")
            logits = self.model(input_ids)  # (B, L, V)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

        if not isinstance(cache, HybridLMCache):
            raise TypeError(f"HybridLMForCausalLM decodes with a HybridLMCache, got {type(cache).__name__}")
        if labels is not None:
            raise ValueError("labels need a forward without cache")
        if cache.decoding is None:
            lengths = prompt_lengths(attention_mask, input_ids)
            L = input_ids.shape[1]
            shift = (torch.arange(L, device=input_ids.device) + (L - lengths).unsqueeze(1)) % L  # (B, L)
            right_padded = input_ids.gather(1, shift)  # (B, L): row b's prompt first, its padding after
            cache.start(DecodingState(self.model, lengths, cache.max_len))
            logits = cache.decoding.prefill(right_padded)  # (B, V)
        else:
            for t in range(input_ids.shape[1]):
                logits = cache.decoding.step(input_ids[:, t])  # (B, V)
        cache.seen += input_ids.shape[1]
        return CausalLMOutputWithPast(logits=logits.unsqueeze(1), **{CACHE_NAME: cache})  # logits (B, 1, V)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode: GenerationMode, *args, **kwargs
    ) -> None:
        """Give ``generate`` a HybridLMCache instead of transformers' DynamicCache (a KV cache per layer).

        The hook transformers' own models with a cache of their own override (T5Gemma, Voxtral realtime);
        its signature is the same from transformers 5.0 to 5.25.

        Sized for ``generation_config.max_length`` positions: every row's prompt and new tokens, plus one
        spare, since transformers may run one forward past the stop. Greedy search and sampling only: the
        other modes reorder or crop the cache, which a recurrent state grouped by prompt length does not offer.
        """
        if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(f"HybridLMForCausalLM generates by greedy search or sampling, not {generation_mode}")
        if model_kwargs.get(CACHE_NAME) is not None or not generation_config.use_cache:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args, **kwargs)
            return
        model_kwargs[CACHE_NAME] = HybridLMCache(len(self.model.blocks), max_len=generation_config.max_length)
