"""H3's long convolution, our path vs the torch.fft reference, side by side: ``python bench/fftconv.py``.

For L = 1K ... 64K, one diagonal SSM as H3 runs it (B x H channels, N/2 complex modes), forward +
backward through every input. Paths:
- ``reference``: ``ssm_conv_ref``, the full-length kernel and one torch.fft convolution of 2L;
- ``state_passing``: chunks of ``--chunk`` through the dispatching fftconv, the SSM state carried;
- ``fft``: the lean path of one convolution, the kernel by chunked Vandermonde matmuls then ``fftconv``;
- ``chunked``: ``kernels.ssm_chunked`` (matmuls within chunks of J steps, a scan of states between them);
- ``ours``: ``kernels.fftconv.ssm_conv``, whatever the dispatcher picks (its choice is printed);
- on CUDA also ``triton`` (L <= 8K): the fused FlashConv kernel with the SSM's kernel precomputed.
Prints time and peak memory of each and their ratios to the reference. Each (path, L) runs in its own
process, so one path's freed-but-cached memory never hides another's peak: peak memory is
``torch.cuda.max_memory_allocated`` on GPU and the growth of the process's peak RSS (VmHWM) over the
measurement on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from hybrid_pretrain.kernels.fftconv import (
    TRITON_MAX_LEN,
    fftconv,
    fftconv_triton,
    ssm_conv,
    ssm_conv_path,
    ssm_conv_ref,
    ssm_conv_state_passing,
    ssm_kernel,
)
from hybrid_pretrain.kernels.ssm_chunked import ssm_conv_chunked
from hybrid_pretrain.models.mixers.ssm import DiagonalSSM


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def build_paths(ssm: DiagonalSSM, chunk: int, device: torch.device) -> dict[str, Callable]:
    paths: dict[str, Callable] = {
        "reference": lambda u: ssm_conv_ref(u, *ssm.discretize(), ssm.D),
        "state_passing": lambda u: ssm_conv_state_passing(u, *ssm.discretize(), ssm.D, chunk=chunk),
        "fft": lambda u: fftconv(u, ssm_kernel(*ssm.discretize(), u.shape[-1]), ssm.D),
        "chunked": lambda u: ssm_conv_chunked(u, *ssm.discretize(), ssm.D),
        "ours": lambda u: ssm_conv(u, *ssm.discretize(), ssm.D),
    }
    if device.type == "cuda":
        paths["triton"] = lambda u: fftconv_triton(u, ssm_kernel(*ssm.discretize(), u.shape[-1]), ssm.D)
    return paths


def measure_one(args: argparse.Namespace, name: str, L: int) -> tuple[float, float]:
    """(median seconds, peak MiB above the inputs) of path `name` at length L, forward and backward."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    ssm = DiagonalSSM(args.channels, args.d_state).to(device)
    fn = build_paths(ssm, args.chunk, device)[name]
    u = torch.randn(args.batch, args.channels, L, device=device, requires_grad=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kb("VmRSS") * 1024
    times = []
    for i in range(args.repeats + 1):  # the first run warms up (Triton compile, FFT plans) and is not timed
        start = time.perf_counter()
        fn(u).square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kb("VmHWM") * 1024
    return statistics.median(times), (peak - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536", help="comma-separated L")
    parser.add_argument("--batch", type=int, default=1, help="B")
    parser.add_argument("--channels", type=int, default=16, help="H: SSM channels (H3: heads x head_dim^2)")
    parser.add_argument("--d-state", type=int, default=64, help="N: real state size (N/2 complex modes)")
    parser.add_argument("--chunk", type=int, default=TRITON_MAX_LEN, help="state-passing chunk length")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "L"), help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args, args.one[0], int(args.one[1]))))
        return
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths: expected comma-separated integers, got {args.lengths!r}")
    device = torch.device(args.device)
    names = list(build_paths(DiagonalSSM(1, 2), args.chunk, device))
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; B={args.batch} H={args.channels} "
          f"N={args.d_state}, chunk {args.chunk}, forward + backward, median of {args.repeats}")
    jobs = [(L, name) for L in lengths for name in names if not (name == "triton" and L > TRITON_MAX_LEN)]
    child = [sys.executable, __file__, "--batch", str(args.batch), "--channels", str(args.channels),
             "--d-state", str(args.d_state), "--chunk", str(args.chunk), "--repeats", str(args.repeats),
             "--device", args.device, "--one"]
    rows = []
    for L, name in tqdm(jobs, desc="fftconv bench", file=sys.stderr):
        out = subprocess.run(child + [name, str(L)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"bench/fftconv.py: {name} at L={L} failed: {out.stderr.strip().splitlines()[-1]}")
        seconds, mib = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((L, name, seconds, mib))
    print(f"{'L':>6} {'path':>14} {'ms':>9} {'MiB':>8} {'time/ref':>9} {'mem/ref':>8}  note")
    for L, name, seconds, mib in rows:
        ref_s, ref_mib = next((s, m) for L2, n, s, m in rows if L2 == L and n == "reference")
        note = f"dispatcher picks {ssm_conv_path(torch.empty(0, 0, L, device=device))}" if name == "ours" else ""
        print(f"{L:>6} {name:>14} {seconds * 1e3:9.2f} {mib:8.1f} {seconds / ref_s:9.2f} {mib / ref_mib:8.2f}  {note}")


if __name__ == "__main__":
    main()
