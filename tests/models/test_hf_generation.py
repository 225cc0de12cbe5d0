"""Generation through Hugging Face: a converted folder's ``generate`` == the project's generator, with a reused Cache.

These are fast tests, so ``make test-latest`` also runs them against the newest transformers that pyproject
allows (5.25.0 when written, the locked version too). They also pass with transformers 5.0.0 and 5.22.0,
from before the cache argument was renamed from ``past_key_values`` to ``cache`` (checked by hand).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Cache

from hybrid_pretrain.launcher.convert_checkpoint import convert
from hybrid_pretrain.models.generation import generate
from hybrid_pretrain.models.hf.modeling_hybrid_lm import CACHE_NAME
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers.attention import Attention
from hybrid_pretrain.models.mixers.h3 import H3
from hybrid_pretrain.tests.fake_runs import fake_zero0_run

LENGTHS = [5, 9, 3, 9]  # two rows share a length: one group of two, two groups of one
NEW = 10
# Larger weights than GPT-2's init, so greedy decoding wanders over the vocabulary instead of repeating a token.
SHAPE = ["model.init_std=0.2"]
MOE = ["model.ffn=DED", "model.num_experts=4", "model.top_k=2"]


def converted(tmp_path: Path, overrides: list[str]) -> tuple[LanguageModel, torch.nn.Module]:
    """A tied H3 + attention model (plus `overrides`) saved as a run, converted to hf, loaded by transformers."""
    model = fake_zero0_run(tmp_path / "run", "HAH", tie=True, overrides=overrides)
    convert(tmp_path / "run", tmp_path / "hf", fmt="hf")
    return model, AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)


def prompts(lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (n,), generator=g) for n in lengths]


def padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> ids (B, L) padded with token 0 on `side`, and the attention mask (B, L)."""
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        span = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[b, span], mask[b, span] = r, 1
    return ids, mask


def ours(model: LanguageModel, rows: list[torch.Tensor], new: int) -> list[list[int]]:
    """The new tokens of each row from models.generation.generate (what launcher/generate.py runs), right-padded."""
    ids, _ = padded(rows, "right")
    lengths = torch.tensor([len(r) for r in rows])
    out = generate(model, ids, new, prompt_lengths=lengths, pad_id=-1)
    return [out[b, n : n + new].tolist() for b, n in enumerate(lengths.tolist())]


def theirs(hf: torch.nn.Module, rows: list[torch.Tensor], new: int, **kwargs) -> list[list[int]]:
    """The new tokens of each row from transformers' generate on left-padded prompts."""
    ids, mask = padded(rows, "left")
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("overrides", [SHAPE, SHAPE + MOE], ids=["H3+attention", "H3+attention+MoE"])
def test_hf_greedy_generate_equals_the_project_generator(tmp_path, overrides: list[str]) -> None:
    model, hf = converted(tmp_path, overrides)
    rows = prompts(LENGTHS)
    expected = ours(model, rows, NEW)
    # Outputs vary (rows differ, several tokens in all), so equal outputs below are not a constant's.
    assert len({tuple(t) for t in expected}) == len(rows) and len({t for row in expected for t in row}) > 3
    assert theirs(hf, rows[:1], NEW) == expected[:1]  # a single prompt, no padding
    assert theirs(hf, rows, NEW) == expected  # different lengths, left padding
    assert [theirs(hf, [r], NEW)[0] for r in rows] == expected  # each row alone: no row depends on the others


def counting(calls: list, name: str, method: Callable) -> Callable:
    """`method` that first records (name, shape of its first argument) in `calls`."""

    def wrapper(x: torch.Tensor, *args, **kwargs):
        calls.append((name, tuple(x.shape)))
        return method(x, *args, **kwargs)

    return wrapper


def test_decoding_reuses_one_cache_and_steps_each_h3_layer_one_position_per_token(tmp_path) -> None:
    _, hf = converted(tmp_path, SHAPE)
    model = hf.model
    h3_calls = {i: [] for i, block in enumerate(model.blocks) if isinstance(block.mixer, H3)}
    for i, calls in h3_calls.items():
        mixer = model.blocks[i].mixer
        for name in ("forward", "prefill", "step"):
            setattr(mixer, name, counting(calls, name, getattr(mixer, name)))
    full_forwards = []
    model.register_forward_hook(lambda *args: full_forwards.append(1))
    forwards = []
    hf.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(
        (kwargs[CACHE_NAME], tuple(kwargs["input_ids"].shape))), with_kwargs=True)

    rows = prompts(LENGTHS)
    ids, mask = padded(rows, "left")
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True)

    cache = getattr(out, CACHE_NAME)
    assert isinstance(cache, Cache) and type(cache).__name__ == "HybridLMCache"
    assert [c for c, _ in forwards] == [cache] * NEW  # one object, handed from forward to forward
    assert [shape for _, shape in forwards] == [ids.shape] + [(len(rows), 1)] * (NEW - 1)
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1
    assert not full_forwards  # never a forward over the whole sequence
    D, groups = model.cfg.d_model, sorted(set(LENGTHS))
    sizes = {n: LENGTHS.count(n) for n in groups}
    for calls in h3_calls.values():
        # Each length group's prompt once, then one position per row and new token: O(1) per token.
        assert calls[: len(groups)] == [("prefill", (sizes[n], n, D)) for n in groups]
        assert calls[len(groups) :] == [("step", (sizes[n], D)) for _ in range(NEW - 1) for n in groups]
    # The attention layer's KV cache lives in the same Cache object: prompt + fed tokens, per group.
    attention = next(i for i, block in enumerate(model.blocks) if isinstance(block.mixer, Attention))
    assert [s["pos"] for s in cache.layers[attention].states] == [n + NEW - 1 for n in groups]


def test_equal_length_prompts_decode_as_one_batch(tmp_path) -> None:
    _, hf = converted(tmp_path, SHAPE)
    steps = []
    hf.model.step = counting(steps, "step", hf.model.step)
    ids, _ = padded(prompts([6, 6, 6]), "left")
    out = hf.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, CACHE_NAME)
    assert len(cache.decoding.groups) == 1 and all(len(layer.states) == 1 for layer in cache.layers)
    assert steps == [("step", (3,))] * (NEW - 1)  # one model step for the whole batch per token


def test_config_has_transformers_standard_names(tmp_path) -> None:
    _, hf = converted(tmp_path, SHAPE)
    config = hf.config
    assert config.num_hidden_layers == 3 == len(hf.model.blocks)
    assert (config.hidden_size, config.num_attention_heads, config.vocab_size) == (32, 2, 64)
    assert config.max_position_embeddings == hf.model.cfg.max_seq_len


def test_converted_readme_says_how_to_install_and_generate(tmp_path) -> None:
    converted(tmp_path, SHAPE)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card
    assert "pip install -e '/path/to/hybrid-pretrain[hf]'" in card and "pip install torch==" in card
    assert "trust_remote_code=True" in card and "model.generate(" in card


def test_padding_that_would_enter_a_state_and_unsupported_modes_are_refused(tmp_path) -> None:
    _, hf = converted(tmp_path, SHAPE)
    ids, right_mask = padded(prompts([4, 6]), "right")
    with pytest.raises(ValueError, match="left-padded"):
        hf.generate(ids, attention_mask=right_mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    ids, left_mask = padded(prompts([4, 6]), "left")
    with pytest.raises(ValueError, match="left-padded attention_mask needs the cached path"):
        hf(ids, attention_mask=left_mask)
    with pytest.raises(ValueError, match="greedy search or sampling"):
        hf.generate(ids, attention_mask=left_mask, max_new_tokens=2, num_beams=2, pad_token_id=0)
