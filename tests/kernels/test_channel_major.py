"""kernels.channel_major: projections into and out of channel-major storage, against F.linear + transpose."""

import pytest
import torch
import torch.nn.functional as F

from hybrid_pretrain.kernels.channel_major import linear_from_channel_major, linear_to_channel_major, swap_last_two


def _params(*shape, bias=True):
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[0], dtype=torch.float64, requires_grad=True) if bias else None
    return w, b


@pytest.mark.parametrize("batch,bias", [(1, True), (3, True), (2, False)])
def test_to_channel_major_matches_linear_forward_and_backward(batch, bias):
    x = torch.randn(batch, 17, 8, dtype=torch.float64, requires_grad=True)
    params = [_params(5, 8, bias=bias), _params(6, 8, bias=bias), _params(5, 8, bias=bias)]
    ours = linear_to_channel_major(x, [w for w, _ in params], [b for _, b in params])
    ref = [F.linear(x, w, b).transpose(1, 2) for w, b in params]
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and torch.allclose(o, r, atol=1e-12)
        assert o.transpose(0, 1).is_contiguous()  # (D_i, B, L) storage: the channel-major layout promised
    grads = [torch.randn_like(r) for r in ref]
    leaves = [x] + [t for pair in params for t in pair if t is not None]
    g_ours = torch.autograd.grad(ours, leaves, grads)
    g_ref = torch.autograd.grad(ref, leaves, grads)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-12)
    assert g_ours[0].is_contiguous()  # the input's gradient in the input's layout


@pytest.mark.parametrize("batch,bias", [(1, True), (4, False)])
def test_from_channel_major_matches_linear(batch, bias):
    w, b = _params(7, 6, bias=bias)
    storage = torch.randn(6, batch, 11, dtype=torch.float64, requires_grad=True)  # (D, B, L)
    y = storage.transpose(0, 1)  # (B, D, L) view, as the mixers hand it over
    out = linear_from_channel_major(y, w, b)
    ref = F.linear(y.transpose(1, 2), w, b)
    assert out.is_contiguous() and torch.allclose(out, ref, atol=1e-12)
    leaves = [storage, w] + ([b] if bias else [])
    grad = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        assert torch.allclose(a, r, atol=1e-12)
    # a contiguous (B, D, L) input (not channel-major storage) gives the same result through one copy
    contiguous = y.detach().contiguous()
    assert torch.allclose(linear_from_channel_major(contiguous, w, b), ref, atol=1e-12)


def test_autocast_computes_in_the_autocast_dtype_like_linear():
    x = torch.randn(2, 9, 8)
    w, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, requires_grad=True)
    w_out = torch.randn(3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ours,) = linear_to_channel_major(x, [w], [b])
        ref = F.linear(x, w, b).transpose(1, 2)
        out = linear_from_channel_major(ours, w_out, None)
        out_ref = F.linear(ref.transpose(1, 2), w_out)
    assert ours.dtype == ref.dtype == torch.bfloat16 and torch.equal(ours, ref)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_ref)
    out.float().sum().backward()
    assert w.grad.dtype == w_out.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("shape", [(1, 1024, 96), (3, 40, 7)])
def test_swap_last_two(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = swap_last_two(x)
    assert y.is_contiguous() and torch.equal(y, x.transpose(1, 2))
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad.transpose(1, 2))
    # strided and broadcast inputs take the generic copy, same values
    base = torch.randn(2, 30, 20)
    assert torch.equal(swap_last_two(base[:, ::2, 1:]), base[:, ::2, 1:].transpose(1, 2))
    with pytest.raises(ValueError, match=r"\(B, R, C\)"):
        swap_last_two(torch.randn(4, 5))


def test_backward_keeps_only_the_input_and_the_weights_themselves():
    """No stacked copy of the weights lives until backward (48 MiB per H3 layer at d_model 2048)."""
    x = torch.randn(2, 16, 8, requires_grad=True)
    params = [(torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True)) for _ in range(3)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_to_channel_major(x, [w for w, _ in params], [b for _, b in params])
    allowed = {x.data_ptr()} | {w.data_ptr() for w, _ in params}
    assert saved and {t.data_ptr() for t in saved} <= allowed
