"""The chunked diagonal SSM (matmuls within chunks, a scan of states between them) against the reference.

Forward and every gradient (u, the complex dtA, dB, C, and D) in fp64 at lengths that leave a partial last
chunk, fp64 gradcheck, fp32 at 8K against the exact answer (no worse than the fp32 FFT reference), the scan
against the recurrence it stands for, the tables against their definitions, fp64 gradchecks of the tables' and
the products' own backwards (odd J, J = 1, one chunk, batch 2), and which path ``ssm_conv`` takes.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.kernels.fftconv import CPU_CHUNKED_FROM, ssm_conv, ssm_conv_path, ssm_conv_ref
from hybrid_pretrain.kernels.ssm_chunked import chunk_length, ssm_conv_chunked
from hybrid_pretrain.kernels.ssm_chunked.core import ChunkProducts, _conj_pairs
from hybrid_pretrain.kernels.ssm_chunked.scan import ChunkStates
from hybrid_pretrain.kernels.ssm_chunked.tables import ChunkTables, backward_tables
from hybrid_pretrain.tests.kernels.device import DEVICE
from hybrid_pretrain.tests.kernels.ssm_params import ssm_params
from hybrid_pretrain.tests.kernels.tolerance import assert_close_to_exact


@pytest.mark.parametrize("L", [1, 5, 32, 33, 100, 4099])
@pytest.mark.parametrize("skip", [True, False])
def test_forward_and_gradients_equal_reference_fp64(L: int, skip: bool) -> None:
    params = ssm_params(3, 16, seed=L, grad=True)
    if not skip:
        params[3] = None
    u = torch.randn(2, 3, L, dtype=torch.float64, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 3, L, dtype=torch.float64, device=DEVICE)
    leaves = [u, *(p for p in params if p is not None)]
    y, y_ref = ssm_conv_chunked(u, *params), ssm_conv_ref(u, *params)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((y * dy).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), leaves)
    for name, g, g_ref in zip(("du", "d dtA", "d dB", "d C", "dD"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"{name} at L={L}")


def test_channel_major_input_gives_the_same_answer() -> None:
    """H3 hands the SSM (B, H, L) views of (H, B, L) storage; the result must not depend on the layout."""
    params = ssm_params(4, 8, seed=1, grad=True)
    storage = torch.randn(4, 3, 70, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(ssm_conv_chunked(storage.transpose(0, 1), *params),
                               ssm_conv_chunked(storage.transpose(0, 1).contiguous(), *params), rtol=0, atol=0)


def test_gradcheck_fp64() -> None:
    """Three chunks of 32 (the last partial): the scan's and the power table's own backwards, every input."""
    dtA, dB, C, D = ssm_params(2, 4, seed=2, grad=True)
    u = torch.randn(2, 2, 70, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(ssm_conv_chunked, (u, dtA, dB, C, D))


def test_long_sequence_fp32_as_close_as_the_fft_reference() -> None:
    L = 8192 + 3
    params64 = ssm_params(2, 16, seed=3, grad=True)
    u = torch.randn(1, 2, L, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(1, 2, L, dtype=torch.float64, device=DEVICE)

    def run(fn, real):
        cdtype = torch.complex128 if real == torch.float64 else torch.complex64
        leaves = [u.to(real).requires_grad_()] + [p.detach().to(cdtype if p.is_complex() else real).requires_grad_()
                                                  for p in params64]
        y = fn(*leaves)
        return (y, *torch.autograd.grad((y * dy.to(real)).sum(), leaves))

    ours, ref32, exact = run(ssm_conv_chunked, torch.float32), run(ssm_conv_ref, torch.float32), run(ssm_conv_ref,
                                                                                                        torch.float64)
    assert ours[0].dtype == torch.float32
    for name, o, t, e in zip(("y", "du", "d dtA", "d dB", "d C", "dD"), ours, ref32, exact):
        assert_close_to_exact(o, t, e, what=name)


def test_chunk_states_are_the_recurrence() -> None:
    torch.manual_seed(4)
    s = torch.randn(3, 2, 6, 4, dtype=torch.complex128, device=DEVICE)
    zJ = 0.9 * torch.exp(1j * torch.rand(3, 1, 4, dtype=torch.float64, device=DEVICE))
    X = torch.zeros_like(s)
    for c in range(1, 6):
        X[:, :, c] = zJ * X[:, :, c - 1] + s[:, :, c - 1]
    torch.testing.assert_close(ChunkStates.apply(s, zJ), X)
    assert torch.autograd.gradcheck(ChunkStates.apply, (s.requires_grad_(), zJ.requires_grad_()))


def _modes(H: int, half: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dtA (decaying, any phase), w, D in fp64 with gradients."""
    g = torch.Generator().manual_seed(seed)
    dtA = torch.complex(-0.05 - 0.3 * torch.rand(H, half, generator=g, dtype=torch.float64),
                        3 * torch.randn(H, half, generator=g, dtype=torch.float64))
    w = torch.randn(H, half, generator=g, dtype=torch.complex128)
    D = torch.randn(H, generator=g, dtype=torch.float64)
    return dtA.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_(), D.to(DEVICE).requires_grad_()


@pytest.mark.parametrize("J", [1, 5, 6, 7, 8])
def test_tables_are_the_powers_they_stand_for(J: int) -> None:
    """E[i] = z^(J-i), R[j] = conj(2 w z^j) (as pairs), T[i, j] = K[j - i] (+ D on the diagonal), zJ = z^J."""
    dtA, w, D = (t.detach() for t in _modes(3, 4, seed=J))
    E, T, R, zJ, *factors = ChunkTables.apply(dtA, w, D, J)
    conj_E, T_again, conj_R = backward_tables(w, *factors)  # what ChunkProducts' backward rebuilds
    torch.testing.assert_close(conj_E, _conj_pairs(E))
    torch.testing.assert_close(conj_R, _conj_pairs(R))
    torch.testing.assert_close(T_again, T)
    k = torch.arange(J + 1, device=DEVICE, dtype=torch.float64).view(J + 1, 1)
    z = torch.exp(dtA.unsqueeze(1) * k)  # (H, J + 1, N/2): z^k
    pairs = lambda t: torch.view_as_real(t.resolve_conj()).flatten(-2)  # noqa: E731
    torch.testing.assert_close(E, pairs(z[:, 1:].flip(1)))
    torch.testing.assert_close(R, pairs((2 * w.unsqueeze(1) * z[:, :J]).conj()))
    torch.testing.assert_close(zJ, z[:, J])
    taps = 2 * (w.unsqueeze(1) * z[:, :J]).sum(-1).real  # (H, J)
    lag = torch.arange(J, device=DEVICE) - torch.arange(J, device=DEVICE).unsqueeze(1)  # (i, j): j - i
    expected = torch.where(lag >= 0, taps[:, lag.clamp_min(0)], 0) + torch.diag_embed(D.unsqueeze(-1).expand(-1, J))
    torch.testing.assert_close(T, expected)


@pytest.mark.parametrize("J", [1, 5, 6, 7, 8])
def test_tables_gradcheck_fp64(J: int) -> None:
    """The tables' own backward (diagonal sums, sums over the power factors) in every input, fp64."""
    assert torch.autograd.gradcheck(lambda *a: ChunkTables.apply(*a, J)[:4], _modes(2, 3, seed=J))


@pytest.mark.parametrize("B, C", [(1, 1), (1, 2), (2, 5)])
def test_products_gradcheck_fp64(B: int, C: int) -> None:
    """The matmuls and the scan with their hand-written backward (the adjoint on conj(G)) in every input, fp64."""
    g = torch.Generator().manual_seed(B * 10 + C)
    H, J, half = 2, 3, 2
    rows, E, T, R = (torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
                     for shape in ((H, B * C, J), (H, J, 2 * half), (H, J, J), (H, J, 2 * half)))
    zJ = (0.9 * torch.exp(1j * torch.rand(H, half, generator=g, dtype=torch.float64))).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ChunkProducts.apply(*a, B), (rows, E, T, R, zJ))


@pytest.mark.parametrize("B, C, J", [(1, 2, 3), (2, 5, 4)])
def test_products_rebuilding_the_tables_gradcheck_fp64(B: int, C: int, J: int) -> None:
    """The same with the tables rebuilt in backward from ChunkTables' factors (what ssm_conv_chunked runs)."""
    g = torch.Generator().manual_seed(B * 10 + C)
    dtA, w, D = (t.detach() for t in _modes(2, 2, seed=J))
    E, T, R, zJ, *factors = ChunkTables.apply(dtA, w, D, J)
    rows = torch.randn(2, B * C, J, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    tables = [t.detach().requires_grad_() for t in (E, T, R, zJ)]
    assert torch.autograd.gradcheck(lambda *a: ChunkProducts.apply(*a, B, (w, *factors)), (rows, *tables))


def test_autocast_keeps_the_convolution_in_fp32() -> None:
    """Under bf16 autocast (train.precision=bf16_autocast) the result is the fp32 one, in u's dtype."""
    params = ssm_params(2, 8, seed=6, real=torch.float32)
    u = torch.randn(1, 2, 100, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = ssm_conv_chunked(u, *params)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ssm_conv_chunked(u, *params), rtol=0, atol=0)


def test_chunk_length() -> None:
    assert [chunk_length(L) for L in (1, 31, 1024, 8191, 8192, 65536)] == [1, 31, 32, 32, 64, 64]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU dispatch")
def test_ssm_conv_takes_the_chunked_path_for_long_training_sequences() -> None:
    u = torch.zeros(1, 1, CPU_CHUNKED_FROM)
    assert ssm_conv_path(u) == "chunked" and ssm_conv_path(u[..., :-1]) == "fftconv"
    with torch.no_grad():  # prefill and evaluation keep the FFT with the SSM's cached kernel
        assert ssm_conv_path(u) == "fftconv"
    params = ssm_params(2, 8, seed=5, grad=True)
    x = torch.randn(1, 2, CPU_CHUNKED_FROM, dtype=torch.float64)
    torch.testing.assert_close(ssm_conv(x, *params), ssm_conv_ref(x, *params), rtol=1e-10, atol=1e-10)
