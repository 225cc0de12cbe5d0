"""MoE routing by hand-computed cases, the aux/z-loss formulas, the layer against a per-token reference, and config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.ffn.moe import MoE
from hybrid_pretrain.models.ffn.router import GLaMRouter, SwitchRouter
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.memory import expert_parameters


def _router(cls, num_experts: int, **kw):
    return cls(d_model=4, num_experts=num_experts, **kw)


def test_switch_fills_slots_in_token_order_and_drops_overflow() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    first, index, slot, gate = _router(SwitchRouter, 2)._assign(probs, capacity=2)
    assert first.tolist() == [[True, False], [True, False], [True, False], [False, True]]
    assert index.tolist() == [[0], [0], [0], [1]]
    assert slot.tolist() == [[0], [1], [-1], [0]]  # token 2: expert 0 is full
    torch.testing.assert_close(gate, probs.max(dim=1, keepdim=True).values)


def test_glam_second_choices_queue_behind_first_choices() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.7, 0.1]])
    first, index, slot, gate = _router(GLaMRouter, 3)._assign(probs, capacity=2)
    assert first.float().argmax(dim=1).tolist() == [0, 0, 1]
    assert index.tolist() == [[0, 1], [0, 2], [1, 0]]
    # Token 0's second choice (e1) queues behind token 2's first; token 2's second (e0) finds e0 full.
    assert slot.tolist() == [[0, 1], [1, 0], [0, -1]]
    expected = torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.9, 0.3 / 0.9], [0.7 / 0.9, 0.2 / 0.9]])
    torch.testing.assert_close(gate, expected)


def test_dense_dispatch_and_combine_of_a_routing_result() -> None:
    r = _router(GLaMRouter, 3, capacity_factor=2 / 3, min_capacity=1)  # capacity ceil(2/3 * 2 * 3 / 3) = 2
    with torch.no_grad():
        r.weight.copy_(torch.eye(3, 4))
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.7, 0.1]])
    out = r(torch.nn.functional.pad(probs.log(), (0, 1)))  # logits log(p): softmax gives p back
    expected = torch.zeros(3, 3, 2)
    expected[0, 0, 0], expected[0, 1, 1] = 0.5 / 0.8, 0.3 / 0.8
    expected[1, 0, 1], expected[1, 2, 0] = 0.6 / 0.9, 0.3 / 0.9
    expected[2, 1, 0] = 0.7 / 0.9  # the dropped second choice contributes nothing; the first gate stays 0.7/0.9
    torch.testing.assert_close(out.combine_weights, expected)
    assert torch.equal(out.dispatch_mask, expected > 0)
    assert out.dropped_fraction.item() == pytest.approx(1 / 6)


def test_capacity_factor_min_capacity_and_eval_factor() -> None:
    r = _router(SwitchRouter, 4, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=1)
    assert r.capacity(10) == 4  # ceil(1.25 * 10 / 4)
    assert r.eval().capacity(10) == 5
    assert _router(GLaMRouter, 4, capacity_factor=1.0, min_capacity=1).capacity(10) == 5  # ceil(2 * 10 / 4)
    assert _router(SwitchRouter, 4, min_capacity=6).capacity(10) == 6
    assert _router(SwitchRouter, 4, min_capacity=6).capacity(3) == 3  # never more slots than tokens


def test_aux_and_z_loss_formulas() -> None:
    r = _router(SwitchRouter, 2, capacity_factor=2.0, aux_loss_coef=0.01, z_loss_coef=1e-3)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[2.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 3.0, 0, 0]])
    out = r(x)
    logits = x[:, :2]
    probs = torch.softmax(logits, dim=-1)
    f = torch.tensor([2 / 3, 1 / 3])  # first choices: e0, e0, e1
    torch.testing.assert_close(out.aux_loss, 0.01 * 2 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(out.z_loss, 1e-3 * torch.logsumexp(logits, -1).square().mean())
    assert out.tokens_per_expert.tolist() == [2.0, 1.0] and out.dropped_fraction.item() == 0.0
    # Uniform routing is the balanced optimum: the loss is exactly alpha, the z-loss (log E)^2.
    zero = _router(SwitchRouter, 4)
    with torch.no_grad():
        zero.weight.zero_()
    flat = zero(torch.randn(8, 4))
    torch.testing.assert_close(flat.aux_loss, torch.tensor(0.01))
    torch.testing.assert_close(flat.z_loss, torch.tensor(1e-3 * math.log(4) ** 2))


def test_dropped_fraction_counts_assignments_past_capacity() -> None:
    r = _router(GLaMRouter, 2, min_capacity=1, capacity_factor=0.5)  # capacity ceil(0.5 * 2 * 4 / 2) = 2
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    out = r(torch.ones(4, 4))  # every token: e0 first, e1 second; 2 of 4 fit each expert
    assert out.capacity == 2 and out.dropped_fraction.item() == 0.5
    assert out.tokens_per_expert.tolist() == [4.0, 4.0]


def test_router_math_is_fp32_and_jitter_only_in_training() -> None:
    r = _router(SwitchRouter, 4, jitter=0.5)
    x = torch.randn(16, 4).bfloat16()
    assert r.eval()(x).combine_weights.dtype == torch.float32
    torch.testing.assert_close(r(x).combine_weights, r(x).combine_weights)  # eval: no noise
    torch.manual_seed(1)
    a = r.train()(x).combine_weights
    assert not torch.equal(a, r(x).combine_weights)


def _reference_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the sum of kept experts' outputs times their gates; nothing for dropped tokens."""
    routing = layer.router(x)
    combine, mask = routing.combine_weights, routing.dispatch_mask  # (T, E, C)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in range(layer.num_experts):
            if mask[t, e].any():
                out[t] += combine[t, e].sum() * layer.experts.mlps[e](x[t])
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_matches_per_token_reference_and_dropped_tokens_output_zero(make_cfg, top_k: int) -> None:
    cfg = make_cfg(layers="HA", ffn="DE", num_experts=4, top_k=top_k, capacity_factor=0.5, min_capacity=1)
    layer = MoE(cfg, 1).eval()
    layer.router.eval_capacity_factor = 0.5  # force drops
    x = torch.randn(2, 12, cfg.d_model)
    y = layer(x)
    torch.testing.assert_close(y.reshape(-1, cfg.d_model), _reference_moe(layer, x.reshape(-1, cfg.d_model)))
    kept = layer.last.dispatch_mask.flatten(1).any(dim=1)
    assert (~kept).any() and (y.reshape(-1, cfg.d_model)[~kept] == 0).all()


def test_expert_init_is_switch_scale_and_survives_lm_init(make_cfg) -> None:
    cfg = make_cfg(d_model=64, layers="HA", ffn="DE", num_experts=8)
    model = LanguageModel(cfg)
    moe = model.blocks[1].ffn
    w = torch.cat([e.w_in.flatten() for e in moe.experts.mlps])
    expected = math.sqrt(0.1 / 64) * 0.88  # a normal truncated at 2 sigma keeps 88% of its std
    assert abs(w.std().item() - expected) < 0.1 * expected
    assert w.abs().max().item() <= 2 * math.sqrt(0.1 / 64) + 1e-6


def test_lm_loss_adds_aux_and_z_losses_and_reports_metrics(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="HAHA", ffn="EDED", num_experts=4, top_k=2))
    assert model.moe_metrics() == {}
    ids = torch.randint(0, 64, (2, 16))
    loss = model(ids, labels=ids)
    ce = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    extra = sum(m.last.aux_loss + m.last.z_loss for m in model.moe_layers)
    torch.testing.assert_close(loss, ce + extra)
    metrics = model.moe_metrics()
    assert sum(metrics[f"moe_tokens_expert_{e}"] for e in range(4)) == 2 * 2 * 32  # layers x top-2 x tokens
    assert {"moe_aux_loss", "moe_z_loss", "moe_dropped_fraction", "moe_load_max", "moe_load_min"} <= metrics.keys()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@torch.no_grad()
def test_step_equals_forward_when_nothing_is_dropped(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="HA", ffn="EE", num_experts=4, top_k=2, eval_capacity_factor=4.0)).eval()
    ids = torch.randint(0, 64, (2, 12))
    logits = model(ids)
    state = model.allocate_state(2, max_len=12)
    stepped = torch.stack([model.step(ids[:, t], state) for t in range(12)], dim=1)
    torch.testing.assert_close(stepped, logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())


def test_dense_model_has_no_moe_metrics(make_cfg) -> None:
    model = LanguageModel(make_cfg())
    model(torch.randint(0, 64, (1, 8)))
    assert model.moe_metrics() == {}


def test_moe_learns_a_token_map(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="AA", ffn="EE", num_experts=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 16))
    first = None
    for _ in range(30):
        loss = model(ids, labels=(ids * 7 + 3) % 64)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_pattern_and_config_validation(make_cfg) -> None:
    assert [layer.ffn for layer in parse_pattern("HAH", "DED").layers] == ["mlp", "moe", "mlp"]
    with pytest.raises(ConfigError, match="model.top_k"):
        make_cfg(ffn="DED", top_k=3)
    with pytest.raises(ConfigError, match="model.capacity_factor"):
        make_cfg(capacity_factor=0)
    with pytest.raises(ConfigError, match=r"model.num_experts \(6\) must be divisible by parallel.expert \(4\)"):
        load_config(None, ["model.ffn=DEDE", "model.num_experts=6", "parallel.expert=4"])
    cfg = load_config(None, ["model.ffn=DEDE", "parallel.expert=4"])
    with pytest.raises(ConfigError, match=r"parallel.expert \(4\) must divide the data-parallel size 2"):
        cfg.parallel.check_world(2)
    assert cfg.parallel.check_world(8) == 8
    with pytest.raises(ConfigError, match="zero_stage >= 1 or train.grad_clip=0"):
        load_config(None, ["model.ffn=DEDE", "parallel.expert=2", "train.zero_stage=0"])


@pytest.mark.parametrize("name", ["debug_switch", "debug_glam", "switch_base", "glam_1.7b_64e"])
def test_flavors_validate_and_count_experts(name: str) -> None:
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"))
    assert "E" in cfg.model.ffn and cfg.model.num_experts % cfg.parallel.expert == 0
    experts, active = expert_parameters(cfg.model)
    n_moe = cfg.model.ffn.count("E")
    per_expert = 2 * cfg.model.d_model * cfg.model.ffn_dim + cfg.model.ffn_dim + cfg.model.d_model
    assert experts == n_moe * cfg.model.num_experts * per_expert and active == n_moe * cfg.model.top_k * per_expert


def test_expert_parameter_count_matches_the_model(make_cfg) -> None:
    cfg = make_cfg(layers="HAHA", ffn="EDED", num_experts=4)
    model = LanguageModel(cfg)
    counted = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert expert_parameters(cfg)[0] == counted
