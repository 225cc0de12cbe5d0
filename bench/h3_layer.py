"""One H3 layer against one attention layer, side by side: ``python bench/h3_layer.py``.

- default: forward + backward time of the two mixers (same d_model; attention with 64-wide heads, PyTorch
  SDPA's flash kernel on CPU) over cells d_model x L x batch, best of ``--repeats`` with the two
  alternating, for each ``--threads`` setting; prints the H3 / attention ratio (issue 17's targets:
  <= 1.0x at L 1K, <= 0.35x at L 8K). A cell whose estimated activations do not fit the free RAM is skipped.
- ``--saved``: bytes each layer keeps for backward (distinct storages, parameters excluded) at the 1.3B
  shape (d_model 2048, L 2K, batch 1) (target: H3 / attention <= 2.5x); H3 twice: as CPU training runs it
  (the diagonal SSM by chunks from ``CPU_CHUNKED_FROM`` steps, which keeps chunk states and tables) and with
  the FFT convolution GPUs run (the kernel kept instead).
- ``--peak``: the --dry-run activation estimate against the measured peak RSS growth (fresh processes;
  debug_hybrid with and without activation checkpointing, 125M-shape H3 and attention layers at L 2K).
- ``--ops``: the building blocks against their alternatives (the short convolution's backends, the
  chunked SSM kernel against the materialised one, the lean FFT convolution against autograd through
  the reference).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import psutil
import torch
import torch.nn.functional as F

from hybrid_pretrain.base.malloc import OPT_OUT, keep_freed_memory
from hybrid_pretrain.kernels import fftconv
from hybrid_pretrain.kernels.causal_conv import causal_conv_conv1d, causal_conv_toeplitz
from hybrid_pretrain.kernels.fftconv import fftconv_ref, fftconv_torch, ssm_kernel, ssm_kernel_ref
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.attention import Attention
from hybrid_pretrain.models.mixers.h3 import H3
from hybrid_pretrain.models.mixers.ssm import DiagonalSSM
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.training.memory import layer_activations
from hybrid_pretrain.training.memory_probe import saved_bytes

CELLS = "256x1024x1,256x1024x8,1024x1024x1,1024x1024x8,256x8192x1,256x8192x8,1024x8192x1,1024x8192x8"


def mixers(d_model: int, length: int, d_state: int = 64) -> tuple[H3, Attention]:
    cfg = ModelConfig(vocab_size=256, d_model=d_model, n_heads=d_model // 64, layers="HA", h3_d_state=d_state,
                      max_seq_len=length)
    torch.manual_seed(0)
    return H3(cfg, 0), Attention(cfg, 1)


def best_of(fns: list[Callable[[], object]], repeats: int, clock: Callable[[], float] = time.perf_counter
            ) -> list[float]:
    """Best time of each fn over `repeats` rounds after one warm-up round, the fns alternating in each round."""
    best = [float("inf")] * len(fns)
    for r in range(repeats + 1):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            if r:
                best[i] = min(best[i], clock() - t0)
    return best


def best_wall_and_cpu(fns: list[Callable[[], object]], repeats: int) -> tuple[list[float], list[float]]:
    """(best wall times, best process CPU times) of the alternating fns.

    On a shared machine the CPU time is the steadier number: it does not count time this process was
    preempted (with several threads it adds their times, spin-waits included).
    """
    best_wall, best_cpu = [float("inf")] * len(fns), [float("inf")] * len(fns)
    for r in range(repeats + 1):
        for i, fn in enumerate(fns):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r:
                best_wall[i] = min(best_wall[i], time.perf_counter() - w0)
                best_cpu[i] = min(best_cpu[i], time.process_time() - c0)
    return best_wall, best_cpu


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module(x).backward(dy)
        module.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()

    return run


def fits(d_model: int, length: int, batch: int, device: torch.device, elem: int) -> bool:
    """Both layers' estimated activations twice over, within the memory available now (RAM or GPU)."""
    cfg = ModelConfig(vocab_size=256, d_model=d_model, n_heads=d_model // 64, layers="HA", max_seq_len=length)
    need = sum(sum(layer_activations(cfg, layer, batch * length, length, elem, cpu=device.type == "cpu"))
               for layer in parse_pattern("HA").layers)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    return 2 * need + 4 * batch * length * d_model * elem < free


CPU = torch.device("cpu")


def layer_times(cells: list[tuple[int, int, int]], threads: list[int], repeats: int, device: torch.device = CPU,
                dtype: torch.dtype = torch.float32) -> None:
    print(f"one layer forward + backward, {device} {dtype}, best of {repeats} (H3 and attention alternating); wall "
          f"time, then process CPU time")
    print(f"{'threads':>7} {'d_model':>7} {'L':>6} {'batch':>5} {'H3 ms':>9} {'attention ms':>13} {'H3 / attn':>10} "
          f"{'CPU: H3 ms':>11} {'attention ms':>13} {'H3 / attn':>10}")
    for n in threads:
        torch.set_num_threads(n)
        for d_model, length, batch in cells:
            if not fits(d_model, length, batch, device, dtype.itemsize):
                print(f"{n:>7} {d_model:>7} {length:>6} {batch:>5}   skipped: activations do not fit the free memory")
                continue
            h3, attn = (m.to(device, dtype) for m in mixers(d_model, length))
            x = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(batch, length, d_model, device=device, dtype=dtype)
            (w_h3, w_attn), (c_h3, c_attn) = best_wall_and_cpu([fwd_bwd(h3, x, dy), fwd_bwd(attn, x, dy)], repeats)
            print(f"{n:>7} {d_model:>7} {length:>6} {batch:>5} {w_h3 * 1e3:>9.1f} {w_attn * 1e3:>13.1f} "
                  f"{w_h3 / w_attn:>9.2f}x {c_h3 * 1e3:>11.1f} {c_attn * 1e3:>13.1f} {c_h3 / c_attn:>9.2f}x",
                  flush=True)


def saved(d_model: int = 2048, length: int = 2048) -> None:
    print(f"saved for backward, one layer, d_model {d_model}, L {length}, batch 1, fp32 (distinct storages)")
    h3, attention = mixers(d_model, length)
    x = torch.randn(1, length, d_model, requires_grad=True)
    results = {"attention": saved_bytes(lambda: attention(x), attention), "H3": saved_bytes(lambda: h3(x), h3)}
    chunked_from, fftconv.CPU_CHUNKED_FROM = fftconv.CPU_CHUNKED_FROM, length + 1  # ssm_conv_path reads it per call
    try:
        results["H3, FFT path"] = saved_bytes(lambda: h3(x), h3)
    finally:
        fftconv.CPU_CHUNKED_FROM = chunked_from
    for name, kept in results.items():
        print(f"  {name:<14} {kept / 2**20:8.1f} MiB")
    print(f"  H3 / attention: {results['H3'] / results['attention']:.2f}x on this machine's path "
          f"({fftconv.ssm_conv_path(x.transpose(1, 2))}), {results['H3, FFT path'] / results['attention']:.2f}x with "
          f"the FFT convolution (GPU)")


def peak() -> None:
    from hybrid_pretrain.tests.training.memory_cases import CASES, run_case

    print("--dry-run activation estimate vs measured peak RSS growth (fresh process each, 1 thread, fp32)")
    for case in CASES:
        r = run_case(case)
        print(f"  {case:<28} estimate {r['estimate'] / 2**20:8.1f} MiB  measured {r['measured'] / 2**20:8.1f} MiB "
              f" {r['estimate'] / r['measured']:.2f}x", flush=True)


def backward_of(fn: Callable[..., torch.Tensor], *args) -> Callable[[], None]:
    """A zero-argument callable running fn(*args).sum().backward()."""
    return lambda: fn(*args).sum().backward()


def discretised_kernel(fn: Callable, ssm: DiagonalSSM, length: int) -> torch.Tensor:
    return fn(*ssm.discretize(), length)


def ops(repeats: int) -> None:
    print(f"building blocks, forward + backward, fp32, best of {repeats}, alternating")
    for B, H, L in [(1, 256, 1024), (8, 256, 1024), (1, 1024, 1024), (1, 256, 8192)]:
        u = torch.randn(B, H, L, requires_grad=True)
        k = torch.randn(H, 64, requires_grad=True)
        k_full = F.pad(k.detach(), (0, L - 64)).requires_grad_()
        toeplitz, conv1d, fft = best_of([backward_of(causal_conv_toeplitz, u, k), backward_of(causal_conv_conv1d, u, k),
                                         backward_of(fftconv_torch, u, k_full)], repeats)
        print(f"  short conv (64 taps) B={B} H={H} L={L}: block-Toeplitz {toeplitz * 1e3:.1f} ms, oneDNN conv1d "
              f"{conv1d * 1e3:.1f} ms ({conv1d / toeplitz:.2f}x), FFT over L {fft * 1e3:.1f} ms "
              f"({fft / toeplitz:.2f}x)")
    for H, L in [(256, 1024), (1024, 1024), (256, 8192)]:
        ssm = DiagonalSSM(H, 64)
        chunked, ref = best_of([backward_of(discretised_kernel, ssm_kernel, ssm, L),
                                backward_of(discretised_kernel, ssm_kernel_ref, ssm, L)], repeats)
        print(f"  SSM kernel H={H} N=64 L={L}: chunked {chunked * 1e3:.1f} ms, materialised {ref * 1e3:.1f} ms "
              f"({ref / chunked:.1f}x)")
    for B, H, L in [(1, 256, 1024), (8, 256, 1024), (1, 1024, 8192)]:
        u, k = torch.randn(B, H, L, requires_grad=True), torch.randn(H, L, requires_grad=True)
        D = torch.randn(H, requires_grad=True)
        lean, ref = best_of([backward_of(fftconv_torch, u, k, D), backward_of(fftconv_ref, u, k, D)], repeats)
        print(f"  FFT conv B={B} H={H} L={L}: lean {lean * 1e3:.1f} ms, autograd through the reference "
              f"{ref * 1e3:.1f} ms ({ref / lean:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=CELLS, help="d_model x L x batch, comma-separated")
    parser.add_argument("--threads", default="1,2", help="torch CPU thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (layer times only)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="layer weights and activations")
    parser.add_argument("--saved", action="store_true", help="saved-for-backward bytes at the 1.3B shape")
    parser.add_argument("--peak", action="store_true", help="activation estimate vs measured peak")
    parser.add_argument("--ops", action="store_true", help="building blocks against their alternatives")
    args = parser.parse_args()
    print(f"malloc: {keep_freed_memory()} ({OPT_OUT}=system for glibc's defaults)", flush=True)
    if args.saved or args.peak or args.ops:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        if args.saved:
            saved()
        if args.peak:
            peak()
        if args.ops:
            ops(args.repeats)
        return
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    layer_times(cells, [int(n) for n in args.threads.split(",")], args.repeats, torch.device(args.device), dtype)


if __name__ == "__main__":
    main()
