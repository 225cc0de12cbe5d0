"""Atlas's retriever losses against small cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_pretrain.models.atlas import losses

SIG1 = 1 / (1 + math.exp(-1))  # softmax([1, 0])[0]


def _scores(values, grad=True):
    return torch.tensor([values], dtype=torch.float64, requires_grad=grad)


def test_perplexity_distillation_hand_case():
    # p_retr = softmax([1, 0]) = (s, 1-s); target = softmax([-2, -1]) = (1-s, s); KL = (2s - 1) * ln(s / (1-s)) = 2s - 1
    scores = _scores([1.0, 0.0])
    loss = losses.perplexity_distillation(torch.tensor([[-2.0, -1.0]]), scores, temperature=1.0)
    assert loss.item() == pytest.approx(2 * SIG1 - 1, rel=1e-6)
    loss.backward()
    # d KL / d scores = p_retr - target
    expected = torch.tensor([[SIG1 - (1 - SIG1), (1 - SIG1) - SIG1]], dtype=torch.float64)
    torch.testing.assert_close(scores.grad, expected)


def test_perplexity_distillation_is_zero_when_retriever_agrees():
    loss = losses.perplexity_distillation(torch.tensor([[-1.0, -2.0]]), _scores([2.0, 1.0]), temperature=1.0)
    assert abs(loss.item()) < 1e-6


def test_emdr2_hand_case():
    scores = _scores([1.0, 0.0])
    loss = losses.emdr2(torch.tensor([[-2.0, -1.0]]), scores, temperature=1.0)
    expected = -math.log(SIG1 * math.exp(-2) + (1 - SIG1) * math.exp(-1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # gradient: p_retr - posterior, posterior_k ∝ p_retr_k p_LM_k
    post = torch.tensor([SIG1 * math.exp(-2), (1 - SIG1) * math.exp(-1)], dtype=torch.float64)
    post = post / post.sum()
    torch.testing.assert_close(scores.grad[0], torch.tensor([SIG1, 1 - SIG1], dtype=torch.float64) - post)


def test_leave_one_out_weights_the_passage_whose_removal_hurts():
    # Removing passage 0 leaves log p = -3 (it mattered), removing passage 1 leaves -1: target = softmax([3, 1]).
    scores = _scores([0.0, 0.0])
    loss = losses.leave_one_out_distillation(torch.tensor([[-3.0, -1.0]]), scores, temperature=1.0)
    t0 = 1 / (1 + math.exp(-2))
    expected = t0 * math.log(t0 / 0.5) + (1 - t0) * math.log((1 - t0) / 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # descent raises passage 0's score


def test_attention_distillation_hand_case_with_temperature():
    scores = _scores([0.5, 0.0])
    loss = losses.attention_distillation(torch.tensor([[3.0, 1.0]]), scores, temperature=0.5)
    t0 = 1 / (1 + math.exp(-2))  # softmax([3, 1])[0]
    expected = t0 * math.log(t0 / SIG1) + (1 - t0) * math.log((1 - t0) / (1 - SIG1))  # retriever: softmax([1, 0])
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # the target is computed in float32


def test_targets_carry_no_gradient():
    target = torch.tensor([[-2.0, -1.0]], requires_grad=True)
    for fn in (losses.perplexity_distillation, losses.emdr2, losses.leave_one_out_distillation,
               losses.attention_distillation):
        fn(target, _scores([1.0, 0.0]), 1.0).backward()
    assert target.grad is None


@pytest.mark.parametrize("fn,sign", [(losses.perplexity_distillation, 1.0), (losses.leave_one_out_distillation, -1.0),
                                     (losses.attention_distillation, 1.0)])
def test_target_temperature_sharpens_the_reader_target(fn, sign):
    # target = softmax(sign * [-1, -1.5] / 0.25) = softmax(sign * [-4, -6]); retriever softmax([0, 0]) = (1/2, 1/2)
    target = torch.tensor([[-1.0, -1.5]])
    loss = fn(target, _scores([0.0, 0.0]), temperature=1.0, target_temperature=0.25)
    t = torch.softmax(sign * torch.tensor([-4.0, -6.0], dtype=torch.float64), 0)
    expected = float((t * torch.log(t / 0.5)).sum())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() > fn(target, _scores([0.0, 0.0]), temperature=1.0).item()  # sharper target, further away
