"""Functional ops the models call: each op lives in its own folder with a pure-PyTorch reference.

Models import the public entry (``kernels.fftconv.fftconv``/``ssm_conv``, ``kernels.attention.attention``)
and never a specific backend: the entry dispatches to the Triton kernel on GPU and to the reference
(or a torch op) on CPU. ``kernels._triton`` builds the Triton kernels, interpreted where no GPU is.
"""
