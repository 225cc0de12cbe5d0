"""Pipeline parallelism under ZeRO-2: our own 1F1B schedule over DeepSpeed's ordinary engine.

DeepSpeed's ``PipelineEngine`` refuses ZeRO-2 (it all-reduces whole ``.grad`` tensors of tied weights
after the schedule, and ZeRO-2 has already reduce-scattered and freed them by then), and megatron-core's
schedules are CUDA-bound (/work/shared/CPU_NOTES.md). So a ZeRO-2 pipeline run hands its stage (the
same ``LanguageModelPipe``, same cuts, same checkpointing) to the plain ``DeepSpeedEngine``, which
partitions gradients and optimizer states over the stage's data-parallel group as in any ZeRO-2 run,
and this module runs the schedule: Megatron's non-interleaved 1F1B (``P - stage - 1`` warm-up
forwards, then one forward and one backward in turn, then the remaining backwards), with every
send and receive of one step posted together (``batch_isend_irecv``) so no pair of stages waits on
each other.

- **Loss scaling.** The last stage's ``engine.backward(loss)`` divides by the micro-batch count as
  usual; the gradients it sends back are therefore already scaled, so earlier stages back-propagate
  ``sum(output * received_grad)`` with ``scale_wrt_gas=False``.
- **Tied embedding and head.** The first stage owns the matrix (it is in that stage's optimizer); the
  last stage's copy (``ds_pipe_replicated``) is left out of its optimizer and collects its head
  gradient in ``.grad`` over the micro-batches. Before its final backward the first stage receives
  that gradient and adds it through the same backward (``sum(weight * head_grad)``), so ZeRO-2's
  hooks reduce embedding + head gradient as one, exactly as the single-rank model's tied weight. After
  the optimizer step the owner broadcasts the new matrix to the copy.
- **Clipping and checkpoints.** The engine's ``mpu`` is the pipeline's grid: its data-parallel group
  is the stage's, its model-parallel group spans tensor ranks and stages (so the clipping norm is
  global and every (stage, tensor rank) writes its own ``mp_rank_XX`` files, XX = stage x TP + tensor
  rank), and replicated parameters count once per stage (tensor rank 0). Stages hold different
  parameter groups, so the norm is summed over them in one all-reduce (``pipeline.one_norm_all_reduce``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 16  # int64s: tensor count, then (dtype code, ndim, 4 dims) per tensor


class _Stage(nn.Module):
    """The PipelineModule behind a plain module, so ``deepspeed.initialize`` builds the ordinary engine."""

    def __init__(self, pipe: nn.Module) -> None:
        super().__init__()
        self.pipe = pipe  # so checkpoint keys start with parallel.pipeline.ENGINE_PREFIX

    def forward(self, inputs: Any) -> Any:
        return self.pipe(inputs)


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _header(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if len(tensors) > (_HEADER - 1) // 6:
        raise ValueError(f"a stage sends at most {(_HEADER - 1) // 6} tensors (h, aux), got {len(tensors)}")
    values = [len(tensors)]
    for t in tensors:
        if t.ndim > 4:
            raise ValueError(f"pipeline activations have at most 4 dimensions, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"stages send floating-point activations ({', '.join(map(str, _DTYPES))}), got {t.dtype}")
        values += [_DTYPES.index(t.dtype), t.ndim, *t.shape, *[0] * (4 - t.ndim)]
    return torch.tensor(values + [0] * (_HEADER - len(values)), dtype=torch.int64)


def _empty_from_header(header: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    h = header.tolist()
    out = []
    for i in range(h[0]):
        code, ndim, *dims = h[1 + 6 * i: 7 + 6 * i]
        out.append(torch.empty(dims[:ndim], dtype=_DTYPES[code], device=device))
    return tuple(out)


class OneFOneBEngine:
    """A DeepSpeed engine over one pipeline stage plus the 1F1B schedule: ``train_batch``/``eval_batch``
    as DeepSpeed's PipelineEngine has them, so the training loop and checkpoints treat both alike.
    Everything else (``save_checkpoint``, ``get_lr``, ``get_global_grad_norm``, ...) is the engine's."""

    pipeline_parallelism = True

    def __init__(self, pipe: nn.Module, engine: Any) -> None:
        self.pipe, self.ds_engine = pipe, engine
        grid = pipe.mpu()
        self.grid, self.num_stages, self.stage_id = grid, grid.get_pipe_parallel_world_size(), grid.get_stage_id()
        self.is_first, self.is_last = self.stage_id == 0, self.stage_id == self.num_stages - 1
        self.prev = grid.stage_to_global(self.stage_id - 1) if not self.is_first else None
        self.next = grid.stage_to_global(self.stage_id + 1) if not self.is_last else None
        self.tied = [(pipe._recursive_getattr(comm["module"], attr), comm)
                     for comm in pipe.tied_comms.values() if len(comm["ranks"]) > 1 for attr in comm["weight_attr"]]
        if pipe.activation_checkpoint_interval > 0:
            pipe._precompute_checkpointable_values()  # as PipelineEngine does; forward checkpoints nothing without it

    @property
    def module(self) -> nn.Module:
        """The stage itself (parameter names as in DeepSpeed's pipeline), for metrics and layouts."""
        return self.pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ds_engine, name)

    # --- communication -------------------------------------------------------------------------------
    def _p2p(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def _send_activations(self, outputs: Any, recv_grads: bool = False) -> tuple[torch.Tensor, ...]:
        """Send ``outputs`` to the next stage (header first); with ``recv_grads``, receive their gradients
        from the next stage in the same exchange and return them."""
        tensors = tuple(t.detach() for t in _as_tuple(outputs))
        grads = tuple(torch.empty_like(t) for t in tensors) if recv_grads else ()
        self._p2p([(_header(tensors).to(tensors[0].device), self.next), *[(t, self.next) for t in tensors]],
                  [(g, self.next) for g in grads])
        return grads

    def _recv_activations(self, send_grads: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, ...]:
        """Receive the previous stage's outputs (header, then tensors); ``send_grads`` go back in the same exchange."""
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        self._p2p([(g, self.prev) for g in send_grads], [(header, self.prev)])
        tensors = _empty_from_header(header.cpu(), self.device)
        self._p2p([], [(t, self.prev) for t in tensors])
        return tuple(t.requires_grad_(t.is_floating_point()) for t in tensors)

    def _recv_grads(self, outputs: Any) -> tuple[torch.Tensor, ...]:
        grads = tuple(torch.empty_like(t) for t in _as_tuple(outputs))
        self._p2p([], [(g, self.next) for g in grads])
        return grads

    # --- one micro-batch -----------------------------------------------------------------------------
    def _stage_input(self, inputs: torch.Tensor, received: tuple[torch.Tensor, ...] | None) -> Any:
        if self.is_first:
            return inputs
        return received[0] if len(received) == 1 else received

    def _backward(self, entry: tuple, grads: tuple[torch.Tensor, ...] | None, final: bool) -> tuple[torch.Tensor, ...]:
        """Back-propagate one micro-batch; returns the gradients of its received inputs (none on stage 0)."""
        stage_input, output = entry
        if self.is_last:
            self.ds_engine.backward(output)  # the loss; DeepSpeed divides it by the micro-batch count
        else:
            surrogate = sum((o * g).sum() for o, g in zip(_as_tuple(output), grads) if o.requires_grad)
            if final and self.tied:  # the head's share of each tied matrix, from the last stage
                weights = [weight for weight, _ in self.tied]
                surrogate = surrogate + sum((w * g).sum() for w, g in zip(weights, self._tied_grads()))
            self.ds_engine.backward(surrogate, scale_wrt_gas=False)  # grads arrive already scaled
        if self.is_first:
            return ()
        return tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in _as_tuple(stage_input))

    def _tied_grads(self) -> list[torch.Tensor]:
        """All-reduce over each tied pair: the owner contributes zeros and receives the copy's gradient."""
        out = []
        for weight, comm in self.tied:
            owner = dist.get_rank() == comm["ranks"][0]
            grad = torch.zeros_like(weight) if owner or weight.grad is None else weight.grad.detach().clone()
            dist.all_reduce(grad, group=comm["group"])
            if not owner:
                weight.grad = None
            out.append(grad)
        return out

    def _step(self, final: bool) -> None:
        if final and self.is_last and self.tied:
            self._tied_grads()  # hand the head gradients to the owner, whose final backward waits for them
        self.ds_engine.step()  # the optimizer steps at the last micro-batch only (gradient accumulation)
        if final and self.tied:
            with torch.no_grad():
                self.pipe._synchronize_tied_weights()  # the owner's updated matrix to the copy

    # --- schedules -----------------------------------------------------------------------------------
    def train_batch(self, data_iter: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over the iterator's micro-batches ``(inputs, labels)`` (as many as
        ``gradient_accumulation_steps``); returns the mean loss over micro-batches and data-parallel
        ranks on every stage."""
        micro = list(data_iter)
        m = len(micro)
        if m != self.ds_engine.gradient_accumulation_steps():
            raise ValueError(f"train_batch got {m} micro-batches, expected "
                             f"{self.ds_engine.gradient_accumulation_steps()} (train.grad_accum)")
        self.ds_engine.train()
        warmup = min(self.num_stages - self.stage_id - 1, m)  # forwards in flight before the first backward
        in_flight: deque = deque()  # (received inputs, output or loss) per micro-batch awaiting its backward
        losses: list[torch.Tensor] = []

        def forward(received: tuple[torch.Tensor, ...] | None) -> Any:
            inputs, labels = micro[backwards + len(in_flight)]  # the next micro-batch not yet forwarded
            out = self.ds_engine(self._stage_input(inputs, received))
            if self.is_last:
                out = self.pipe.loss_fn(out, labels)
                losses.append(out.detach())
            in_flight.append((received, out))
            return out

        def backward(grads: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...]:
            nonlocal backwards
            backwards += 1
            return self._backward(in_flight.popleft(), grads, final=backwards == m)

        backwards = 0
        for _ in range(warmup):
            self._send_activations(forward(None if self.is_first else self._recv_activations()))
        received = None if self.is_first or warmup == m else self._recv_activations()
        for i in range(m - warmup):  # steady state: one forward, one backward
            out = forward(received)
            input_grads = backward(None if self.is_last else self._send_activations(out, recv_grads=True))
            if i < m - warmup - 1 and not self.is_first:
                received = self._recv_activations(send_grads=input_grads)
            elif not self.is_first:
                self._p2p([(g, self.prev) for g in input_grads], [])
            self._step(final=backwards == m)
        for _ in range(warmup):  # cool-down: the backwards still in flight
            input_grads = backward(self._recv_grads(in_flight[0][1]))
            if not self.is_first:
                self._p2p([(g, self.prev) for g in input_grads], [])
            self._step(final=backwards == m)
        return self._reported_loss(losses)

    @torch.no_grad()
    def eval_batch(self, data_iter: Iterable[tuple[torch.Tensor, torch.Tensor]], num_micro_batches: int = 1
                   ) -> torch.Tensor:
        """Forward only, stage after stage: the mean loss over the micro-batches and data-parallel ranks."""
        losses = []
        for _, (inputs, labels) in zip(range(num_micro_batches), data_iter):
            received = None if self.is_first else tuple(t.detach() for t in self._recv_activations())
            out = self.ds_engine.module(self._stage_input(inputs, received))
            if self.is_last:
                losses.append(self.pipe.loss_fn(out, labels))
            else:
                self._send_activations(out)
        return self._reported_loss(losses)

    def _reported_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The last stage's mean loss, averaged over data-parallel ranks and broadcast along the pipe."""
        loss = torch.stack(losses).mean().float() if losses else torch.zeros((), device=self.device)
        if self.is_last and self.grid.get_data_parallel_world_size() > 1:
            dist.all_reduce(loss, group=self.grid.get_data_parallel_group())
            loss /= self.grid.get_data_parallel_world_size()
        dist.broadcast(loss, src=self.grid.stage_to_global(self.num_stages - 1),
                       group=self.grid.get_pipe_parallel_group())
        return loss


def plain_engine_args(pipe: nn.Module, param_groups: list[dict]) -> tuple[nn.Module, list[dict], Any]:
    """``deepspeed.initialize``'s model, parameter groups and ``mpu`` for a ZeRO-2 stage: the stage behind a
    plain module, the groups without the last stage's copies of tied weights, and the pipeline's grid."""
    groups = [{**g, "params": [p for p in g["params"] if not getattr(p, "ds_pipe_replicated", False)]}
              for g in param_groups]
    return _Stage(pipe), [g for g in groups if g["params"]], pipe.mpu()
