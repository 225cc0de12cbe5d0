"""The states a diagonal SSM carries into each chunk: an exclusive scan over chunks, in place, with its adjoint.

    X_0 = 0,   X_c = zJ X_(c-1) + s_(c-1)

per channel and mode, where s_c is chunk c's own contribution to the state at its end and zJ = exp(dtA J)
the decay over one chunk. A loop over the C chunks of in-place multiply-adds (C is L / J, 128 at L 8K);
a matmul form would need a (C, C) matrix per channel and mode. The states live chunk-major, (B, C, H, N/2),
so each step works on B contiguous (H, N/2) blocks: on (H, B, N/2) slices of a channel-major buffer (H
runs of N/2 numbers) the loop took 2.5x as long at 1024 channels (2-core VM, one thread).

Backward, in PyTorch's convention for complex gradients: with G_c the whole gradient reaching X_c,
G_(C-1) = dX_(C-1), G_c = dX_c + conj(zJ) G_(c+1); then ds_(c-1) = G_c (ds_(C-1) = 0) and
dzJ = sum_c G_c conj(X_(c-1)). The loop runs on ds itself (ds_c = G_(c+1)), so nothing is shifted afterwards.
"""

from __future__ import annotations

import torch


def scan_states(X: torch.Tensor, decay: torch.Tensor) -> None:
    """In place: X (B, C, H, N/2) holds [0, s_0, .., s_(C-2)] and becomes the states; decay (H, N/2) is zJ."""
    for c in range(2, X.shape[1]):  # X_c = s_(c-1) + zJ X_(c-1)
        X[:, c].addcmul_(decay, X[:, c - 1])


def scan_adjoint(ds: torch.Tensor, X: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """In place: ds (B, C, H, N/2) holds [dX_1, .., dX_(C-1), 0] and becomes ds; returns dzJ (H, N/2)."""
    for c in range(ds.shape[1] - 3, -1, -1):  # G_(c+1) = dX_(c+1) + conj(zJ) G_(c+2)
        ds[:, c].addcmul_(decay.conj(), ds[:, c + 1])
    # vecdot(a, b) = sum conj(a) b over the chunks: X_1 .. X_(C-2) against G_2 .. G_(C-1)
    return torch.linalg.vecdot(X[:, 1:-1], ds[:, 1:-1], dim=1).sum(0)


class ChunkStates(torch.autograd.Function):
    """s (H, B, C, N/2) complex, zJ (H, 1, N/2) or (H, N/2) complex -> X (H, B, C, N/2): the state entering each
    chunk, a view of a chunk-major (B, C, H, N/2) buffer."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, zJ: torch.Tensor) -> torch.Tensor:
        H, B, C, half = s.shape
        X = s.new_empty(B, C, H, half)
        X[:, 0] = 0
        X[:, 1:] = s[:, :, :-1].permute(1, 2, 0, 3)
        scan_states(X, zJ.reshape(H, half))
        ctx.save_for_backward(X, zJ)
        return X.permute(2, 0, 1, 3)

    @staticmethod
    def backward(ctx, dX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        X, zJ = ctx.saved_tensors
        B, C, H, half = X.shape
        ds = X.new_empty(B, C, H, half)
        ds[:, C - 1] = 0
        ds[:, :-1] = dX[:, :, 1:].permute(1, 2, 0, 3)
        dzJ = scan_adjoint(ds, X, zJ.reshape(H, half))
        return ds.permute(2, 0, 1, 3), dzJ.view_as(zJ)
