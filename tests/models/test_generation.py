"""Generation: prefill == stepping, greedy == argmax of full forwards, batching, and sampling filters."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.models.generation import (
    GREEDY,
    DecodingState,
    Sampling,
    filter_logits,
    generate,
    prefill,
    sample_next,
)
from hybrid_pretrain.models.lm import LanguageModel

PATTERNS = ["HAH", "SAS", "AA", "HH"]


@pytest.mark.parametrize("layers", PATTERNS)
@pytest.mark.parametrize("overrides", [{}, {"h3_head_dim": 2, "rotary_dim": 4}])
@torch.no_grad()
def test_prefill_matches_forward_and_leaves_the_stepped_state(make_cfg, layers: str, overrides: dict) -> None:
    model = LanguageModel(make_cfg(layers=layers, **overrides)).eval()
    ids = torch.randint(0, 64, (2, 20))
    full = model(ids)  # (B, L, V)
    state = model.allocate_state(2, max_len=24)
    last = prefill(model, ids[:, :12], state)
    scale = full.abs().max().item()
    torch.testing.assert_close(last, full[:, 11], rtol=1e-4, atol=1e-4 * scale)
    # Continuing with step from the prefilled state must reproduce the forward's later positions.
    for t in range(12, 20):
        torch.testing.assert_close(model.step(ids[:, t], state), full[:, t], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("layers", ["HAH", "SAS"])
def test_greedy_equals_argmax_of_recomputed_forward(make_cfg, layers: str) -> None:
    model = LanguageModel(make_cfg(layers=layers)).eval()
    prompt = torch.randint(0, 64, (3, 7))
    out = generate(model, prompt, max_new_tokens=12, sampling=GREEDY)
    assert out.shape == (3, 19) and torch.equal(out[:, :7], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_batched_equals_unbatched_with_ragged_prompts(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="HAH", h3_head_dim=2)).eval()
    lengths = [5, 9, 3]
    prompts = [torch.randint(0, 64, (n,)) for n in lengths]
    padded = torch.zeros(3, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    out = generate(model, padded, max_new_tokens=6, prompt_lengths=torch.tensor(lengths), pad_id=-1)
    assert out.shape == (3, 15)
    for b, p in enumerate(prompts):
        alone = generate(model, p.unsqueeze(0), max_new_tokens=6)[0]
        assert torch.equal(out[b, : len(p) + 6], alone)
        assert (out[b, len(p) + 6 :] == -1).all()


def test_rows_are_grouped_by_prompt_length_and_padding_never_matters(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="HAH", init_std=0.2)).eval()
    lengths = torch.tensor([4, 7, 4, 2])
    decoding = DecodingState(model, lengths, max_len=12)
    assert [(g.length, g.rows.tolist()) for g in decoding.groups] == [(2, [3]), (4, [0, 2]), (7, [1])]
    assert len(DecodingState(model, torch.tensor([5, 5, 5]), max_len=8).groups) == 1  # equal lengths: one batch
    prompt = torch.randint(0, 64, (4, 7))
    garbage = torch.where(torch.arange(7) < lengths.unsqueeze(1), prompt, torch.randint(0, 64, (4, 7)))
    a = generate(model, prompt, 5, prompt_lengths=lengths, pad_id=-1)
    assert torch.equal(generate(model, garbage, 5, prompt_lengths=lengths, pad_id=-1), a)
    assert all((a[b, n + 5 :] == -1).all() for b, n in enumerate(lengths.tolist()))


def test_sampling_is_reproducible_and_stops_at_eos(make_cfg) -> None:
    model = LanguageModel(make_cfg()).eval()
    prompt = torch.randint(0, 64, (4, 5))
    sampling = Sampling(temperature=1.5, top_k=10, top_p=0.9)
    a = generate(model, prompt, 10, sampling, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 10, sampling, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    eos = int(a[0, 7])
    c = generate(model, prompt, 10, sampling, eos_id=eos, pad_id=-1, generator=torch.Generator().manual_seed(3))
    stop = next(i for i in range(5, 15) if c[0, i] == eos)
    assert (c[0, stop + 1 :] == -1).all() and torch.equal(c[0, : stop + 1], a[0, : stop + 1])


def test_training_mode_and_ssm_discretization_are_restored(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="HS")).train()
    generate(model, torch.randint(0, 64, (1, 4)), 2)
    assert model.training
    ssm = model.blocks[0].mixer.diag_ssm
    assert "_inference" not in vars(ssm)  # train() dropped the inference cache: training sees fresh weights
    with torch.no_grad():
        before = ssm.discretized()[0].clone()
        ssm.log_dt.add_(0.5)  # an in-place update, as an optimizer step: the cached discretisation is stale
        assert not torch.equal(ssm.discretized()[0], before)
        torch.testing.assert_close(ssm.discretized()[0], ssm.discretize()[0], rtol=0, atol=0)


def test_top_k_restricts_support() -> None:
    logits = torch.randn(4, 50)
    allowed = torch.topk(logits, 5, dim=-1).indices
    draws = torch.stack([sample_next(logits, Sampling(top_k=5)) for _ in range(200)], dim=1)  # (4, 200)
    for b in range(4):
        assert set(draws[b].tolist()) <= set(allowed[b].tolist())
    assert len(set(draws[0].tolist())) > 1  # it still samples, not argmax
    kept = torch.isfinite(filter_logits(logits, top_k=5))
    assert torch.equal(kept.sum(-1), torch.full((4,), 5))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, False, True, False], [True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.81))
    assert kept[0].tolist() == [True, False, True, True]
    torch.manual_seed(0)
    draws = {int(sample_next(logits, Sampling(top_p=0.8))[0]) for _ in range(300)}
    assert draws == {0, 2}


def test_temperature_zero_is_argmax_and_bad_settings_fail() -> None:
    logits = torch.randn(3, 20)
    assert torch.equal(sample_next(logits, GREEDY), logits.argmax(-1))
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
