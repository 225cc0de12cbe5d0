#!/usr/bin/env bash
# Issue 17's GPU check, at most 8 minutes on one H100: `bash bench/gpu_check.sh` from any directory.
#
# Needs a CUDA build of torch with Triton and this project installed (`pip install -e .` in that
# environment; PYTHON=... picks the interpreter). Each step has its own time limit (sum: 480 s) and
# prints its ratios side by side; paste the output into bench/RESULTS.md with the device named.
#   1. the kernel tests on CUDA tensors: Triton kernels compiled, not interpreted (KERNEL_TEST_DEVICE=cuda)
#   2. FlashConv (Triton) vs torch.fft (cuFFT) for H3's diagonal SSM, 125M-shape channels, batch 8
#   3. one H3 layer vs one attention layer, forward + backward, bf16
#   4. the 125M hybrid vs the all-attention Transformer, one training step, bf16 autocast
#   5. the same pair generating 128 tokens after prompts of 512 / 1024 / 1536, batch 1 and 8, bf16
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

"$PY" - <<'PYEOF'
import torch, triton
assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA GPU"
print(f"device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")
PYEOF

step() { echo; echo "== $1 (limit $2 s)"; }

step "1. kernel tests, compiled Triton on CUDA tensors" 180
KERNEL_TEST_DEVICE=cuda timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/kernels

step "2. FlashConv vs torch.fft, diagonal SSM forward + backward, B=8, H=768" 80
timeout 80 "$PY" bench/fftconv.py --device cuda --lengths 4096,16384 --batch 8 --channels 768 --repeats 5

step "3. one H3 layer vs one attention layer, forward + backward, bf16" 60
timeout 60 "$PY" bench/h3_layer.py --device cuda --dtype bf16 --threads 1 --repeats 5 \
    --cells 768x2048x8,1024x1024x8,1024x8192x4,2048x2048x8

step "4. 125M hybrid vs Transformer, training step (forward, backward, AdamW), bf16 autocast" 70
timeout 70 "$PY" bench/train_throughput.py --config configs/h3_hybrid_125m.yaml --device cuda --dtype bf16 \
    --batch 4 --lengths 2048,8192 --repeats 3

step "5. 125M hybrid vs Transformer, generation with prefill, bf16" 90
timeout 90 "$PY" bench/generation.py --config configs/h3_hybrid_125m.yaml --device cuda --dtype bf16 --repeats 1
