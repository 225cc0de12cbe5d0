"""HiPPO-LegS (Gu et al. 2020) and the state-matrix initialisations built from it.

HiPPO-LegS is not diagonalisable stably, but it is *normal plus low rank* (S4, Gu et al. 2022, Thm. 1):
``A = S - P P^T`` with ``S = -1/2 I + (skew-symmetric)``, so ``A = V (Lambda - (V^* P)(V^* P)^*) V^*`` with V
unitary. In the V basis the state matrix is diagonal plus rank one (DPLR), which is what S4 trains; its
diagonal part alone is S4D-LegS / DSS's init. Eigenvalues come in conjugate pairs; like the reference
code we keep the N/2 with positive imaginary part and read outputs as 2 Re(C x).
"""

from __future__ import annotations

import math

import torch

CPU = torch.device("cpu")  # always built on CPU, also under `with torch.device("meta")` (dry runs), then copied



def hippo_legs(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The HiPPO-LegS matrices: A (n, n) and B (n,).

    A[i, k] = -sqrt(2i+1) sqrt(2k+1) for i > k, -(i+1) for i = k, 0 for i < k; B[i] = sqrt(2i+1).
    """
    q = torch.sqrt(2 * torch.arange(n, dtype=dtype, device=CPU) + 1)  # (n,)
    diag = torch.diag(torch.arange(n, dtype=dtype, device=CPU) + 1)
    A = -torch.tril(q.unsqueeze(1) * q.unsqueeze(0), diagonal=-1) - diag
    return A, q.clone()


def nplr_legs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPLR form of HiPPO-LegS with conjugate pairs halved: (Lambda, P, B), each complex128 (n/2,).

    ``A = V (diag(Lambda_full) - P_full P_full^*) V^*``; the returned entries are those of the n/2 modes
    with Im(Lambda) > 0, in increasing order of frequency.
    """
    if n < 2 or n % 2:
        raise ValueError(f"HiPPO-LegS NPLR needs an even state size >= 2, got {n}")
    A, B = hippo_legs(n)
    P = torch.sqrt(torch.arange(n, dtype=torch.float64, device=CPU) + 0.5)  # (n,): A + P P^T = S is normal
    S = A + P.unsqueeze(1) * P.unsqueeze(0)  # (n, n) = -1/2 I + skew
    skew = S + 0.5 * torch.eye(n, dtype=torch.float64, device=CPU)
    # -i * skew is Hermitian: eigh gives real frequencies and a unitary V, stable where eig on A is not.
    freq, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # (n,), (n, n)
    keep = freq > 0
    lam = torch.complex(torch.full_like(freq[keep], -0.5), freq[keep])  # (n/2,)
    Vh = V[:, keep].conj().T  # (n/2, n)
    return lam, Vh @ P.to(torch.complex128), Vh @ B.to(torch.complex128)


def s4d_lin(n_modes: int) -> torch.Tensor:
    """S4D-Lin: Lambda_n = -1/2 + i pi n, complex128 (n_modes,)."""
    n = torch.arange(n_modes, dtype=torch.float64, device=CPU)
    return torch.complex(torch.full_like(n, -0.5), math.pi * n)


def s4d_legs(n_modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S4D-LegS: the diagonal of HiPPO-LegS's DPLR form. Returns (Lambda, B), complex128 (n_modes,)."""
    lam, _, B = nplr_legs(2 * n_modes)
    return lam, B
