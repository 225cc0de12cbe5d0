"""Functional ops the models call: each op lives in its own folder with a pure-PyTorch reference.

Models import the public entry (e.g. ``kernels.fftconv.fftconv``) and never a specific backend, so
a fused Triton path can be added behind the same signature without touching model code.
"""
