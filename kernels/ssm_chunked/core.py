"""The chunked SSM given its tables: three batched matmuls and the scan between them, with a hand-written backward.

Per channel, with rows (B C, J) of input chunks and the tables E (J, N), T (J, J), R (J, N) of
``tables.ChunkTables`` (complex numbers as (re, im) pairs):

    s = rows E,   X = scan(s),   y = rows T + X R^T

Backward: dR = dy^T X, dT = rows^T dy, dE = rows^T ds and d rows = dy T^T + ds E^T, with ds from the scan's
adjoint (``scan.py``). That adjoint runs on conj(G) here, whose recurrence multiplies by zJ itself: dy times
conj(R)'s pairs gives conj(dX), and both d(zJ) = conj(sum_c conj(G_c) X_(c-1)) and ds's products
(conj(G) against conj(E)'s pairs) then need no conjugate of an L-sized tensor, only of the small tables.
Autograd through the same ops had split's backward concatenate ds and dy into one (H, B C, N + J) gradient,
handed R's gradient transposed and conjugated the states for d(zJ) (each a pass over the size of the input or
more). The states are kept chunk-major (``scan.py``) and read by the matmuls as rows with a leading dimension.
"""

from __future__ import annotations

import torch

from hybrid_pretrain.kernels.ssm_chunked.scan import scan_states
from hybrid_pretrain.kernels.ssm_chunked.tables import backward_tables


def _rows(states: torch.Tensor) -> torch.Tensor:
    """Chunk-major states (B, C, H, N/2) complex -> (H, B C, N) real matmul rows, a view."""
    B, C, H, half = states.shape
    return torch.view_as_real(states).view(B * C, H, 2 * half).transpose(0, 1)


def _conj_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """(..., N) real pairs -> the pairs of their conjugates, a new tensor."""
    return torch.view_as_real(torch.view_as_complex(pairs.unflatten(-1, (-1, 2))).conj_physical()).flatten(-2)


class ChunkProducts(torch.autograd.Function):
    """rows (H, B C, J), E (H, J, N), T (H, J, J), R (H, J, N) real, zJ (H, N/2) complex, B, factors -> y (H, B C, J).

    factors: None, or (w, coarse, fine, band) of ``ChunkTables`` (w detached), from which backward rebuilds the
    tables (``tables.backward_tables``) instead of keeping E, T and R (at d_model 2048, L 2K, batch 1 one H3
    layer kept 215.0 MiB for backward with them, 175.5 MiB without: bench/h3_layer.py --saved).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, E: torch.Tensor, T: torch.Tensor, R: torch.Tensor, zJ: torch.Tensor,
                B: int, factors: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        H, BC, J = rows.shape
        N, C = E.shape[-1], BC // B
        s = torch.bmm(rows, E).view(H, B, C, N // 2, 2)  # each chunk's own contribution to its end state
        X = torch.empty(B, C, H, N // 2, dtype=zJ.dtype, device=rows.device)  # chunk-major: [0, s_0, .., s_(C-2)]
        X[:, 0] = 0
        torch.view_as_real(X)[:, 1:] = s[:, :, :-1].permute(1, 2, 0, 3, 4)
        scan_states(X, zJ)
        y = torch.bmm(rows, T).baddbmm_(_rows(X), R.transpose(1, 2))  # (H, B C, J)
        ctx.rebuild = factors is not None
        ctx.save_for_backward(rows, zJ, X, *(factors if ctx.rebuild else (E, T, R)))
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        rows, zJ, X, *tables = ctx.saved_tensors
        if ctx.rebuild:
            conj_E, T, conj_R = backward_tables(*tables)
        else:
            E, T, R = tables
            conj_E, conj_R = _conj_pairs(E), _conj_pairs(R)
        B, C, H, half = X.shape
        dy = dy.contiguous()
        dR = torch.bmm(dy.transpose(1, 2), _rows(X))  # (H, J, N)
        dX_conj = torch.bmm(dy, conj_R).view(H, B, C, half, 2)  # conj(dX) as pairs
        # conj(ds), chunk-major: conj(ds_c) = conj(G_(c+1)) = conj(dX_(c+1)) + zJ conj(G_(c+2)), conj(ds_(C-1)) = 0
        ds_conj = torch.empty_like(X)
        ds_conj[:, C - 1] = 0
        torch.view_as_real(ds_conj)[:, :-1] = dX_conj[:, :, 1:].permute(1, 2, 0, 3, 4)
        # with d zJ = sum_c G_c conj(X_(c-1)) = conj(sum_c conj(ds_c) X_c) over c = 1 .. C - 2 summed on the way,
        # while conj(ds_c) is in cache (a product and a sum over all chunks afterwards took 1.5x as long)
        acc = torch.zeros(B, H, half, dtype=X.dtype, device=X.device)
        for c in range(C - 2, -1, -1):
            if c < C - 2:
                ds_conj[:, c].addcmul_(zJ, ds_conj[:, c + 1])
            if c > 0:
                acc.addcmul_(ds_conj[:, c], X[:, c])
        dzJ = acc.sum(0).conj()  # (H, N/2)
        ds_rows = _rows(ds_conj)  # conj(ds) as (H, B C, N) pairs
        drows = None
        if ctx.needs_input_grad[0]:  # ds E^T = conj(ds) conj(E)^T in pairs
            drows = torch.bmm(dy, T.transpose(1, 2)).baddbmm_(ds_rows, conj_E.transpose(1, 2))
        dE = _conj_pairs(torch.bmm(rows.transpose(1, 2), ds_rows))  # rows^T ds
        dT = torch.bmm(rows.transpose(1, 2), dy)
        return drows, dE, dT, dR, dzJ, None, None
