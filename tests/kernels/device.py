"""The device kernel tests put their tensors on: ``KERNEL_TEST_DEVICE`` (default cpu).

On CPU the Triton kernels run under Triton's interpreter (``kernels/_triton.py``); with a GPU,
``KERNEL_TEST_DEVICE=cuda`` runs the same tests through the compiled kernels (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("KERNEL_TEST_DEVICE", "cpu"))
