"""Start-up memory of one expert-parallel rank: whole model then slice (before) vs its own share only (after).

``python bench/startup_memory.py`` builds one rank of a ``glam_1.7b_64e``-shaped model (its 24 layers,
``HHHHHHHHAHHHHHHHAHHHHHHH`` with an MoE of 64 experts, top-2, in every other layer, vocabulary 50257)
at a reduced width (``--d-model``, d_ffn 4x) in a fresh process per measurement, and reports the
process's peak RSS (``resource.getrusage`` maxrss) after the imports and after the build:

- before: what ``parallel.build.build_model`` did until issue 18: build the whole single-rank model,
  then keep this rank's E/EP experts (``parallel.expert.parallelize_experts``);
- after: ``build_model`` now (meta device, then ``parallel.materialize`` makes this rank's share).

No process groups are needed: the rank is passed as ``ep_rank``. The build's own memory is the peak
minus the post-import RSS; the ratio before / after is what the change buys.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def model_config(d_model: int, num_experts: int):
    from hybrid_pretrain.models.config import ModelConfig

    section = yaml.safe_load((REPO / "configs" / "glam_1.7b_64e.yaml").read_text())["model"]
    return ModelConfig(**{**section, "d_model": d_model, "d_ffn": 4 * d_model, "n_heads": max(1, d_model // 128),
                          "num_experts": num_experts})


def measure(path: str, d_model: int, num_experts: int, ep: int, rank: int) -> dict:
    """In this (fresh) process: build one rank's model by ``path`` and return RSS figures in MiB."""
    import deepspeed.moe.layer  # noqa: F401  (both paths import it for the expert containers: not the build's cost)
    import torch

    from hybrid_pretrain.models.architectures import build_arch
    from hybrid_pretrain.parallel.build import build_model
    from hybrid_pretrain.parallel.expert import parallelize_experts
    from hybrid_pretrain.training.config import ParallelConfig

    torch.set_num_threads(1)
    cfg = model_config(d_model, num_experts)
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if path == "before":
        torch.manual_seed(0)
        model = parallelize_experts(build_arch(cfg), ep, rank)
    else:
        model = build_model(cfg, ParallelConfig(expert=ep), 0, dp_size=ep, ep_rank=rank)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kept = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    return {"imported_mib": imported, "peak_mib": peak, "build_mib": peak - imported, "kept_param_mib": kept}


def run_child(path: str, args: argparse.Namespace, ep: int) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--d-model", str(args.d_model), "--experts", str(args.experts),
           "--ep", str(ep), "--rank", str(args.rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{path} at EP={ep} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256, help="reduced width (GLaM 1.7B: 2048); d_ffn is 4x")
    parser.add_argument("--experts", type=int, default=64, help="experts per MoE layer (GLaM 1.7B/64E: 64)")
    parser.add_argument("--ep", type=int, nargs="+", default=[8, 64], help="expert-parallel sizes to measure")
    parser.add_argument("--rank", type=int, default=0, help="which expert-parallel rank to build")
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.d_model, args.experts, args.ep[0], args.rank)))
        return
    cfg = model_config(args.d_model, args.experts)
    print(f"glam_1.7b_64e shape at d_model {cfg.d_model}, d_ffn {cfg.ffn_dim}, {cfg.num_experts} experts, "
          f"rank {args.rank}; one fresh process per row", flush=True)
    print(f"{'EP':>4} {'path':>7} {'after imports':>14} {'peak RSS':>10} {'build':>10} {'params kept':>12}")
    for ep in args.ep:
        rows = {path: run_child(path, args, ep) for path in ("before", "after")}
        for path, r in rows.items():
            print(f"{ep:>4} {path:>7} {r['imported_mib']:>10.0f} MiB {r['peak_mib']:>6.0f} MiB "
                  f"{r['build_mib']:>6.0f} MiB {r['kept_param_mib']:>8.0f} MiB", flush=True)
        before, after = rows["before"], rows["after"]
        print(f"{ep:>4} before / after: peak RSS {before['peak_mib'] / after['peak_mib']:.2f}x, "
              f"build {before['build_mib'] / max(after['build_mib'], 1.0):.2f}x", flush=True)


if __name__ == "__main__":
    main()
