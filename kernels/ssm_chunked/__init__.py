"""A diagonal SSM over a long sequence by chunks: matmuls within chunks, a scan of states between them.

Public op: ``ssm_conv_chunked(u, dtA, dB, C, D)``, the same contract as ``kernels.fftconv.ssm_conv`` (which picks
it on CPU for long sequences under autograd, ``kernels.fftconv.ssm_conv_path``). Cut u into chunks of J steps;
with z = exp(dtA) and w = C dB per mode n, output step j of chunk c is

    y[cJ + j] = sum_(i <= j) K[j - i] u_c[i]  +  2 Re sum_n w_n z_n^j X_c[n]  (+ D u_c[j])

the first term a (J, J) Toeplitz matmul with the kernel's first J taps K[l] = 2 Re sum_n w_n z_n^l (D on its
diagonal), the second the state X_c entering the chunk read out through a (N, J) table. The states come from
each chunk's own contribution s_c[n] = sum_i z_n^(J - i) u_c[i] (a (J, N) matmul) by the scan
X_c = z^J X_(c-1) + s_(c-1) (``scan.py``). Every table has J rows, so nothing of length L exists but u and y:
no kernel of length L (no Vandermonde product over L), no FFT and no complex spectra. Work is linear in L,
about L (J + 2N) multiply-adds per channel forward, as batched matmuls. Two autograd Functions with
hand-written backwards: ``tables.ChunkTables`` (dtA, w, D -> the tables) and ``core.ChunkProducts`` (the
matmuls and the scan). ``kernels.fftconv.ssm_conv_ref`` is the reference. README.md has the measurements
behind the choice of J and of where this path is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_pretrain.kernels.ssm_chunked.core import ChunkProducts
from hybrid_pretrain.kernels.ssm_chunked.tables import ChunkTables

__all__ = ["chunk_length", "ssm_conv_chunked"]


def chunk_length(length: int) -> int:
    """J: 64 steps per chunk from 8K steps, 32 below (the whole sequence when shorter).

    The Toeplitz matmul costs L J per channel and the scan C = L / J sequential steps: 32 was fastest from 1K
    to 4K, 64 at 8K (d_model 256 and 1024, one thread, the 2-core VM; README.md).
    """
    return min(length, 64 if length >= 8192 else 32)


def ssm_conv_chunked(u: torch.Tensor, dtA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor | None = None) -> torch.Tensor:
    """u (B, H, L), dtA, dB, C complex (H, N/2), D (H,) or None -> y (B, H, L) in u's dtype, computed in fp32
    (fp64 for fp64 inputs): ``x_t = exp(dtA) x_(t-1) + dB u_t, y_t = 2 Re(C x_t) + D u_t``. Differentiable in all.

    Autocast is off inside: under bf16 autocast its matmuls would round the states and the kernel's taps to bf16
    (kernels/README.md, "Precision under bf16"), which the FFT path it stands in for does not either.
    """
    with torch.autocast(u.device.type, enabled=False):
        return _ssm_conv_chunked(u, dtA, dB, C, D)


def _ssm_conv_chunked(u: torch.Tensor, dtA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None) -> torch.Tensor:
    B, H, L = u.shape
    real = torch.float64 if torch.float64 in (u.dtype, dtA.real.dtype) else torch.float32
    cdtype = torch.complex128 if real == torch.float64 else torch.complex64
    J = chunk_length(L)
    chunks = -(-L // J)
    # E (H, J, N): z^(J - i) as (re, im) pairs, T (H, J, J): the within-chunk matrix (D on its diagonal),
    # R (H, J, N): 2 conj(w z^j) as pairs, so that 2 Re(w z^j X) is X's pairs times R's; zJ (H, N/2) = z^J
    w = (C * dB).to(cdtype)
    E, T, R, zJ, *factors = ChunkTables.apply(dtA.to(cdtype), w, None if D is None else D.to(real), J)
    rows = u.transpose(0, 1).to(real)  # (H, B, L): contiguous for channel-major u (kernels/channel_major.py)
    if chunks * J != L:
        rows = F.pad(rows, (0, chunks * J - L))
    rows = rows.reshape(H, B * chunks, J)  # (H, B C, J)
    y = ChunkProducts.apply(rows, E, T, R, zJ, B, (w.detach(), *factors))  # (H, B C, J); E, T, R not kept
    return y.view(H, B, chunks * J)[..., :L].transpose(0, 1).to(u.dtype)  # (B, H, L)
