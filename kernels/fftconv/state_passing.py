"""State passing (H3, Sec. 4.2): a diagonal SSM over a sequence longer than one fused FFT convolution holds.

The sequence is split into chunks of T. Within a chunk the output is an ordinary length-T FFT
convolution (the fused kernel's job); what came before the chunk is summarised by the SSM state
entering it, an (N/2)-vector per channel, which adds ``2 Re(C dA^(t+1) x_in)`` to the chunk's outputs
and is carried to the next chunk as ``x_out = dA^T x_in + sum_s dA^(T-1-s) dB u_s``. Only N/2 numbers
per channel cross chunk boundaries, so the convolution never needs the full-length kernel or FFT.
The math is in README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_pretrain.kernels.fftconv.reference import fftconv_ref
from hybrid_pretrain.kernels.ssm_chunked.scan import ChunkStates
from hybrid_pretrain.kernels.vandermonde import vandermonde, vandermonde_transpose


def ssm_conv_state_passing(
    u: torch.Tensor,
    dtA: torch.Tensor,
    dB: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    chunk: int = 8192,
    conv=None,
) -> torch.Tensor:
    """Diagonal SSM ``x_t = exp(dtA) x_{t-1} + dB u_t, y_t = 2 Re(C x_t) + D u_t`` by chunks of `chunk` steps.

    Args:
        u: (B, H, L) input, any float dtype; L need not be a multiple of `chunk`.
        dtA, dB, C: complex (H, N/2) discretised SSM (dtA = dt * A is the log of the state decay dA).
        D: (H,) skip weight or None.
        chunk: steps per chunk, convolved with a length-`chunk` kernel.
        conv: the within-chunk convolution ``(u (B', H, T), k (H, T), D) -> (B', H, T)``; default the
            reference ``fftconv_ref`` (the public ``ssm_conv`` passes the dispatching ``fftconv``, the fused
            Triton kernel on GPU).

    Returns:
        y: (B, H, L) in u's dtype, equal to ``ssm_conv_ref`` up to rounding. Differentiable in u, dtA, dB, C, D.
    """
    conv = conv or fftconv_ref
    B, H, L = u.shape
    T = min(chunk, L)
    n_chunks = -(-L // T)
    # Zeros after the end change no earlier output (causality); they are cut off again below.
    u_chunks = F.pad(u, (0, n_chunks * T - L)).view(B, H, n_chunks, T).transpose(1, 2)  # (B, c, H, T)
    y = conv(u_chunks.reshape(B * n_chunks, H, T), vandermonde(C * dB, dtA, T), D)
    y = y.view(B, n_chunks, H, T).to(dtA.real.dtype)  # (B, c, H, T), in the SSM's precision for the sum below

    # Each chunk's own contribution to the state at its end: dB sum_s dA^(T-1-s) u_s, the inputs read backwards.
    local = dB * vandermonde_transpose(u_chunks.flip(-1), dtA)  # (B, c, H, N/2)
    decay_chunk = torch.exp(dtA * T).unsqueeze(1)  # (H, 1, N/2): dA^T
    # the state entering each chunk, x_c = dA^T x_(c-1) + local_(c-1) from zero: the chunked SSM's scan
    x_in = ChunkStates.apply(local.permute(2, 0, 1, 3), decay_chunk).permute(1, 2, 0, 3)  # (B, c, H, N/2)
    carried = vandermonde(C * x_in * torch.exp(dtA), dtA, T)  # (B, c, H, T): 2 Re(C dA^(t+1) x_in)
    y = (y + carried.to(y.dtype)).transpose(1, 2).reshape(B, H, n_chunks * T)[..., :L]  # (B, H, L)
    return y.to(u.dtype)
