"""Measured peak vs --dry-run estimate, one case per fresh process.

``python -m hybrid_pretrain.tests.training.memory_cases CASE`` measures one case.

Run with MALLOC_MMAP_THRESHOLD_=65536 (``run_case`` sets it) so that glibc serves and returns every block of
64 KiB or more straight from the kernel from the first allocation on: RSS then follows live tensors.
Prints one JSON line: {"case", "measured", "estimate"} in bytes (activations only: weights, gradients and
inputs exist before the measured step). Shared by tests/training/test_memory_estimate.py and bench/h3_layer.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.tests.procs import REPO
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.memory import activation_bytes, layer_activations
from hybrid_pretrain.training.memory_probe import peak_rss_growth

LAYER_CASES = {"h3_125m_layer": "H", "attention_125m_layer": "A"}  # one 125M-shape block at L 2K, batch 1
CASES = ["debug_hybrid", "debug_hybrid_checkpointed", "debug_hybrid_autocast", *LAYER_CASES]


def _with_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():  # gradients exist before the step, as after the first one
        p.grad = torch.zeros_like(p)


def measure(case: str) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if case.startswith("debug_hybrid"):
        cfg = load_config(str(REPO / "configs" / "debug_hybrid.yaml"))
        model_cfg, b, s = cfg.model, cfg.train.micro_batch_size, cfg.data.seq_len
        model_cfg.vocab_size = model_cfg.vocab_size or cfg.data.vocab_size
        checkpointing = case.endswith("checkpointed")
        autocast = case.endswith("autocast")  # train.precision=bf16_autocast: fp32 weights, bf16 matmuls
        model = LanguageModel(model_cfg)
        model.checkpoint_activations = checkpointing
        _with_grads(model)
        ids = torch.randint(0, model_cfg.vocab_size, (b, s))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(ids, labels=ids)
            loss.backward()

        step()  # the first step also sets up libraries' caches (oneDNN, FFT plans)
        measured = peak_rss_growth(step)
        if autocast:  # bf16 activations, fp32 residual stream, and the bf16 weight copies the matmuls save
            estimate = activation_bytes(model_cfg, b, s, model_cfg.vocab_size, 2, residual_elem=4, cpu=True)
            estimate += 2 * sum(p.numel() for p in model.parameters())
        else:
            estimate = activation_bytes(model_cfg, b, s, model_cfg.vocab_size, 4, checkpointing=checkpointing, cpu=True)
    else:
        s, h = 2048, 768
        model_cfg = ModelConfig(vocab_size=256, d_model=h, n_heads=12, layers=LAYER_CASES[case], h3_d_state=64,
                                max_seq_len=s)
        block = LanguageModel(model_cfg).blocks[0]
        _with_grads(block)
        x, dy = torch.randn(1, s, h, requires_grad=True), torch.randn(1, s, h)
        block(x).backward(dy)  # warm-up, as above
        measured = peak_rss_growth(lambda: block(x).backward(dy))
        saved, transient = layer_activations(model_cfg, parse_pattern(model_cfg.layers).layers[0], s, s, 4, cpu=True)
        estimate = saved + transient - x.numel() * 4  # the block's input exists before the step
    return {"case": case, "measured": measured, "estimate": estimate}


def run_case(case: str, timeout: int = 600) -> dict:
    """``measure(case)`` in a fresh interpreter with glibc's mmap threshold fixed at 64 KiB."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", "hybrid_pretrain.tests.training.memory_cases", case], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
