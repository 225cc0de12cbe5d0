"""The two ranks of test_sequence_parallel_units' collective test (spawned, so importable by name)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hybrid_pretrain.parallel import sequence


def two_rank_worker(rank: int, port: int) -> None:
    """Each collective and the norm on 2 ranks against the same computation on the whole sequence."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        group, size = dist.group.WORLD, 2
        for dim in (1, 0):
            torch.manual_seed(0)  # the same full tensors on both ranks
            full = torch.randn(4, 6, 3)
            weights = [torch.randn(4, 6, 3) for _ in range(size)]  # each rank's upstream gradient
            x = full.chunk(size, dim)[rank].clone().requires_grad_()
            y = sequence.gather(x, dim=dim, group=group)
            assert torch.equal(y, full)
            y.backward(weights[rank])
            torch.testing.assert_close(x.grad, sum(weights).chunk(size, dim)[rank], rtol=1e-6, atol=1e-6)

            partials = [torch.randn(4, 6, 3) for _ in range(size)]  # each rank's partial sums, all positions
            upstream = [torch.randn(4, 6, 3).chunk(size, dim)[r] for r in range(size)]
            z = partials[rank].clone().requires_grad_()
            out = sequence.reduce_scatter(z, dim=dim, group=group)
            torch.testing.assert_close(out, sum(partials).chunk(size, dim)[rank], rtol=1e-6, atol=1e-6)
            out.backward(upstream[rank])
            assert torch.equal(z.grad, torch.cat(upstream, dim))

        # The gathered linear (backward re-gathers its input) equals F.linear of the gathered sequence.
        torch.manual_seed(2)
        full, weight, bias = torch.randn(4, 6, 3), torch.randn(5, 3), torch.randn(5)
        upstream = torch.randn(size, 4, 6, 5)[rank]  # each rank's own upstream gradient, all positions
        leaves = [t.clone().requires_grad_() for t in (full.chunk(size, 1)[rank], weight, bias)]
        refs = [t.clone().requires_grad_() for t in (full.chunk(size, 1)[rank], weight, bias)]
        y = sequence.gathered_linear(*leaves, group=group)
        y_ref = nn.functional.linear(sequence.gather(refs[0], group=group), refs[1], refs[2])
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        y.backward(upstream)
        y_ref.backward(upstream)
        for got, want in zip(leaves, refs):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)

        torch.manual_seed(1)
        ref = nn.LayerNorm(3)
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
        full, g = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
        ref(full).backward(g)
        sp = sequence.SequenceParallelLayerNorm(3)
        sp.load_state_dict(ref.state_dict())
        sequence.tensor_parallel_group = lambda: group  # the norm's group: the whole world of 2 here
        sp(full.chunk(size, 1)[rank]).backward(g.chunk(size, 1)[rank])
        # Each rank saw half the positions; the summed gradient is the full-sequence one, on both ranks.
        torch.testing.assert_close(sp.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sp.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
