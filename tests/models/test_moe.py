"""MoE routing by hand-computed cases, the aux/z-loss formulas, the layer against a per-token reference (dropless
and capacity-based), dropless against the capacity path, and config."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.ffn.moe import MoE, combine_sorted, sort_by_expert
from hybrid_pretrain.models.ffn.router import GLaMRouter, SwitchRouter
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.memory import expert_parameters


def _router(cls, num_experts: int, **kw):
    return cls(d_model=4, num_experts=num_experts, **kw)


def test_switch_fills_slots_in_token_order_and_drops_overflow() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    r = _router(SwitchRouter, 2)
    index, gate = r._assign(probs)
    slot = r.slots(index, capacity=2)
    assert index.tolist() == [[0], [0], [0], [1]]
    assert slot.tolist() == [[0], [1], [-1], [0]]  # token 2: expert 0 is full
    torch.testing.assert_close(gate, probs.max(dim=1, keepdim=True).values)


def test_glam_second_choices_queue_behind_first_choices() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.7, 0.1]])
    r = _router(GLaMRouter, 3)
    index, gate = r._assign(probs)
    slot = r.slots(index, capacity=2)
    assert index.tolist() == [[0, 1], [0, 2], [1, 0]]
    # Token 0's second choice (e1) queues behind token 2's first; token 2's second (e0) finds e0 full.
    assert slot.tolist() == [[0, 1], [1, 0], [0, -1]]
    expected = torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.9, 0.3 / 0.9], [0.7 / 0.9, 0.2 / 0.9]])
    torch.testing.assert_close(gate, expected)


def test_dense_dispatch_and_combine_of_a_routing_result() -> None:
    # capacity ceil(2/3 * 2 * 3 / 3) = 2
    r = _router(GLaMRouter, 3, capacity_factor=2 / 3, min_capacity=1, dropless=False)
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
    with torch.no_grad():
        dropless = _router(GLaMRouter, 3)
        dropless.weight.copy_(r.weight)
    every = dropless(torch.nn.functional.pad(probs.log(), (0, 1)))
    assert every.dropless and every.kept.all() and every.dropped_fraction.item() == 0.0
    assert torch.equal(every.expert_index, out.expert_index)
    torch.testing.assert_close(every.gate[2], torch.tensor([0.7 / 0.9, 0.2 / 0.9]))  # the second choice is kept
    with pytest.raises(ValueError, match="dropless routing has no slots"):
        _ = every.combine_weights


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
    # capacity ceil(0.5 * 2 * 4 / 2) = 2
    r = _router(GLaMRouter, 2, min_capacity=1, capacity_factor=0.5, dropless=False)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    out = r(torch.ones(4, 4))  # every token: e0 first, e1 second; 2 of 4 fit each expert
    assert out.capacity == 2 and out.dropped_fraction.item() == 0.5
    assert out.tokens_per_expert.tolist() == [4.0, 4.0]


@pytest.mark.parametrize("dropless", [True, False])
def test_router_math_is_fp32_and_jitter_only_in_training(dropless: bool) -> None:
    r = _router(SwitchRouter, 4, jitter=0.5, dropless=dropless)
    x = torch.randn(16, 4).bfloat16()
    assert r.eval()(x).gate.dtype == torch.float32 and r(x).aux_loss.dtype == torch.float32
    torch.testing.assert_close(r(x).gate, r(x).gate)  # eval: no noise
    torch.manual_seed(1)
    a = r.train()(x).gate
    assert not torch.equal(a, r(x).gate)


def _reference_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the sum of its kept experts' outputs times their gates; nothing for dropped assignments."""
    routing = layer.router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, gate, kept in zip(routing.expert_index[t], routing.gate[t], routing.kept[t]):
            if kept:
                out[t] += gate * layer.experts.mlps[int(e)](x[t])
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_matches_per_token_reference_and_dropped_tokens_output_zero(make_cfg, top_k: int) -> None:
    cfg = make_cfg(layers="HA", ffn="DE", num_experts=4, top_k=top_k, capacity_factor=0.5, min_capacity=1,
                   moe_dropless=False)
    layer = MoE(cfg, 1).eval()
    layer.router.eval_capacity_factor = 0.5  # force drops
    x = torch.randn(2, 12, cfg.d_model)
    y = layer(x)
    torch.testing.assert_close(y.reshape(-1, cfg.d_model), _reference_moe(layer, x.reshape(-1, cfg.d_model)))
    kept = layer.last.dispatch_mask.flatten(1).any(dim=1)
    assert (~kept).any() and (y.reshape(-1, cfg.d_model)[~kept] == 0).all()


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_layer_matches_per_token_reference_with_an_empty_expert(make_cfg, top_k: int) -> None:
    cfg = make_cfg(layers="HA", ffn="DE", num_experts=5, top_k=top_k)
    layer = MoE(cfg, 1)
    with torch.no_grad():
        layer.router.weight[4] = -10.0 * layer.router.weight[:4].abs().sum(dim=0)  # expert 4 loses to every other
    x = torch.randn(3, 7, cfg.d_model).abs()  # odd token count; positive inputs so expert 4's logit is lowest
    y = layer(x)
    assert layer.last.tokens_per_expert[4] == 0 and layer.last.tokens_per_expert.sum() == 21 * top_k
    assert layer.last.imbalance > 1  # uneven: capacity factor 1.0 would have dropped tokens
    torch.testing.assert_close(y.reshape(-1, cfg.d_model), _reference_moe(layer, x.reshape(-1, cfg.d_model)))
    y.square().sum().backward()
    for e, expert in enumerate(layer.experts.mlps):  # an expert without tokens gets zero gradients, not None
        assert all((p.grad.abs().sum() > 0) == (layer.last.tokens_per_expert[e] > 0) for p in expert.parameters())


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_equals_capacity_path_when_nothing_is_dropped_forward_and_backward(make_cfg, top_k: int) -> None:
    """Same weights; the capacity layer gets slots for every token (factor E / k), so both compute every assignment."""
    dropless = MoE(make_cfg(layers="HA", ffn="DE", num_experts=4, top_k=top_k), 1)
    padded = MoE(make_cfg(layers="HA", ffn="DE", num_experts=4, top_k=top_k, moe_dropless=False,
                          capacity_factor=4 / top_k), 1)
    padded.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 16, 32, requires_grad=True)
    target = torch.randn(2, 16, 32)
    grads = []
    for layer in (dropless, padded):
        y = layer(x)
        loss = ((y - target) ** 2).sum() + layer.last.aux_loss + layer.last.z_loss
        grads.append((y, loss, *torch.autograd.grad(loss, [x, *layer.parameters()])))
    assert padded.last.dropped_fraction.item() == 0.0 and padded.last.capacity == 32
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_dispatch_experts_combine_gradcheck_fp64(make_cfg, top_k: int) -> None:
    """Finite differences through the sort, both gathers, the grouped matmuls and the gated combine. The routing
    is fixed (the router computes in fp32 by design, too coarse for finite differences in fp64)."""
    torch.manual_seed(3)
    layer = MoE(make_cfg(layers="HA", ffn="DE", num_experts=4, top_k=top_k, d_model=8, n_heads=2, d_ffn=12), 1).double()
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        routing = layer.router(x)
    assert routing.dropless and (routing.tokens_per_expert > 0).sum() >= 3
    expert = layer.experts.mlps[int(routing.expert_index[0, 0])]
    assert torch.autograd.gradcheck(lambda x, *w: layer.experts(x, routing), (x, expert.w_in, expert.b_out))


def test_dropless_output_does_not_depend_on_capacity_settings(make_cfg) -> None:
    x = torch.randn(2, 16, 32)
    outs = []
    for factor in (0.25, 1.0, 4.0):
        torch.manual_seed(0)
        layer = MoE(make_cfg(layers="HA", ffn="DE", num_experts=4, top_k=2, capacity_factor=factor,
                             eval_capacity_factor=factor), 1)
        outs += [layer(x), layer.eval()(x)]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_imbalance_is_the_capacity_factor_that_drops_nothing(make_cfg) -> None:
    torch.manual_seed(0)
    layer = MoE(make_cfg(layers="HA", ffn="DE", num_experts=4, top_k=1), 1)
    x = torch.randn(64, 32)
    layer(x)
    imbalance = layer.last.imbalance.item()
    assert imbalance > 1
    capacity = MoE(make_cfg(layers="HA", ffn="DE", num_experts=4, top_k=1, moe_dropless=False, min_capacity=1), 1)
    capacity.load_state_dict(layer.state_dict())
    for factor, drops in ((imbalance, False), (imbalance - 1.5 / 16, True)):  # 16 slots per unit of factor
        capacity.router.capacity_factor = factor
        capacity(x)
        assert (capacity.last.dropped_fraction.item() > 0) == drops, factor


def test_sort_by_expert_groups_assignments_stably() -> None:
    r = _router(GLaMRouter, 3)
    routing = r(torch.randn(5, 4))
    order, inverse, counts = sort_by_expert(routing)
    experts = routing.expert_index.flatten()[order]
    assert torch.equal(experts, experts.sort().values)
    assert counts.tolist() == torch.bincount(experts, minlength=3).tolist()
    for e in range(3):  # token order within an expert
        ids = order[experts == e]
        assert torch.equal(ids, ids.sort().values)
    assert torch.equal(order[inverse], torch.arange(10))


@pytest.mark.parametrize("top_k", [1, 2])
def test_combine_sorted_matches_gather_and_gate_and_gradchecks(top_k: int) -> None:
    """The fused combine against its definition, out[t] = sum_j gate[t, j] * rows[inverse[t * k + j]], forward and
    both gradients (rows and gates), in fp64."""
    torch.manual_seed(4)
    routing = _router(GLaMRouter if top_k == 2 else SwitchRouter, 3)(torch.randn(7, 4))
    order, inverse, _ = sort_by_expert(routing)
    rows = torch.randn(7 * top_k, 5, dtype=torch.float64, requires_grad=True)
    gate = routing.gate.detach().double().requires_grad_()

    def fused(rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return combine_sorted(rows, order, inverse, dataclasses.replace(routing, gate=gate))

    def definition(rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (rows[inverse].view(7, top_k, 5) * gate[..., None]).sum(dim=1)

    dy = torch.randn(7, 5, dtype=torch.float64)
    ours, ref = fused(rows, gate), definition(rows, gate)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (rows, gate), dy), torch.autograd.grad(ref, (rows, gate), dy)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(fused, (rows, gate))


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
    assert {"moe_aux_loss", "moe_z_loss", "moe_imbalance", "moe_load_max", "moe_load_min"} <= metrics.keys()
    assert "moe_dropped_fraction" not in metrics  # dropless: nothing to drop, imbalance instead
    assert metrics["moe_imbalance"] == pytest.approx(sum(m.last.imbalance.item() for m in model.moe_layers) / 2)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    capacity = LanguageModel(make_cfg(layers="HAHA", ffn="EDED", num_experts=4, top_k=2, moe_dropless=False))
    capacity(ids)
    assert {"moe_dropped_fraction", "moe_imbalance"} <= capacity.moe_metrics().keys()


@torch.no_grad()
@pytest.mark.parametrize("dropless", [True, False])
def test_step_equals_forward_when_nothing_is_dropped(make_cfg, dropless: bool) -> None:
    model = LanguageModel(make_cfg(layers="HA", ffn="EE", num_experts=4, top_k=2, eval_capacity_factor=4.0,
                                   moe_dropless=dropless)).eval()
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
