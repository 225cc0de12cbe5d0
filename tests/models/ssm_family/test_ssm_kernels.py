"""SSM-family kernels against their definitions: HiPPO NPLR, S4's Cauchy kernel, DSS-softmax, bidirectional conv."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.models.ssm import reference
from hybrid_pretrain.models.ssm.bidirectional import ssm_convolve
from hybrid_pretrain.models.ssm.cauchy import bilinear, dplr_dense, dplr_kernel
from hybrid_pretrain.models.ssm.dss_kernel import dss_recurrence, dss_softmax_kernel
from hybrid_pretrain.models.ssm.hippo import hippo_legs, nplr_legs, s4d_legs, s4d_lin


def test_nplr_legs_is_hippo_normal_part() -> None:
    A, _ = hippo_legs(8)
    P = torch.sqrt(torch.arange(8, dtype=torch.float64) + 0.5)
    eig = torch.linalg.eigvals(A + P.unsqueeze(1) * P.unsqueeze(0))  # the normal part's spectrum
    lam, Pv, Bv = nplr_legs(8)
    upper = eig[eig.imag > 0]
    torch.testing.assert_close(lam, upper[torch.argsort(upper.imag)])
    assert Pv.shape == Bv.shape == (4,)
    # The full (unhalved) DPLR form reproduces A: V (Lambda - P~ P~^*) V^* with P~ = V^* P.
    skew = A + P.unsqueeze(1) * P.unsqueeze(0) + 0.5 * torch.eye(8, dtype=torch.float64)
    freq, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    Pt = V.conj().T @ P.to(torch.complex128)
    rebuilt = V @ dplr_dense(torch.complex(torch.full_like(freq, -0.5), freq)[None], Pt[None])[0] @ V.conj().T
    torch.testing.assert_close(rebuilt, A.to(torch.complex128))
    assert torch.equal(s4d_legs(4)[0], lam)
    assert s4d_lin(3)[2] == complex(-0.5, 2 * torch.pi)


@pytest.mark.parametrize("length", [1, 16, 17])
def test_cauchy_kernel_equals_powers_of_dense_bilinear(length: int) -> None:
    H, n = 3, 4
    lam, P, B = (t.expand(H, -1).clone() for t in nplr_legs(2 * n))
    lam = lam + torch.complex(-torch.rand(H, n, dtype=torch.float64), torch.randn(H, n, dtype=torch.float64))
    P = P * torch.randn(H, n, dtype=torch.complex128)
    C = torch.randn(H, n, dtype=torch.complex128)
    dt = torch.tensor([1e-3, 0.1, 0.7], dtype=torch.float64)
    dA, dB = reference.discretize_bilinear(dplr_dense(lam, P), B, dt)
    torch.testing.assert_close(dplr_kernel(lam, P, B, C, dt, length), reference.kernel_by_powers(dA, dB, C, length))
    fast_dA, fast_dB = bilinear(lam, P, B, dt)
    torch.testing.assert_close(fast_dA, dA)
    torch.testing.assert_close(fast_dB, dB)


def test_dss_softmax_kernel_matches_definition_and_recurrence() -> None:
    H, n, L = 3, 5, 20
    lam = torch.complex(torch.randn(H, n, dtype=torch.float64), 3 * torch.randn(H, n, dtype=torch.float64))
    assert (lam.real > 0).any() and (lam.real < 0).any()  # both branches of the stable softmax
    W = torch.randn(H, n, dtype=torch.complex128)
    dt = torch.tensor([1e-2, 0.1, 0.5], dtype=torch.float64)
    P = (dt.unsqueeze(-1) * lam).unsqueeze(-1) * torch.arange(L, dtype=torch.float64)  # (H, n, L)
    softmax = P.exp() / P.exp().sum(-1, keepdim=True)
    expected = torch.einsum("hn,hnl->hl", W * torch.expm1(dt.unsqueeze(-1) * lam) / lam, softmax).real
    torch.testing.assert_close(dss_softmax_kernel(lam, W, dt, L), expected)
    torch.testing.assert_close(dss_softmax_kernel(lam, W, dt, L, keep=7), expected[:, :7])
    z, c = dss_recurrence(lam, W, dt, L)
    dA, dB = torch.diag_embed(z), torch.ones_like(z)
    torch.testing.assert_close(reference.kernel_by_powers(dA, dB, c, L).real, expected)


def test_dss_kernel_finite_for_growing_modes() -> None:
    lam = torch.tensor([[5.0 + 1j, -5.0 + 2j]])
    k = dss_softmax_kernel(lam, torch.ones(1, 2, dtype=torch.complex64), torch.tensor([1.0]), 4096)
    assert torch.isfinite(k).all()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_convolution_equals_double_sum(bidirectional: bool) -> None:
    u = torch.randn(2, 3, 11, dtype=torch.float64)
    k = torch.randn(2, 3, 11, dtype=torch.float64)
    D = torch.randn(3, dtype=torch.float64)
    got = ssm_convolve(u, k if bidirectional else k[0], D, bidirectional)
    torch.testing.assert_close(got, reference.convolve(u, k[0], D, k[1] if bidirectional else None))
