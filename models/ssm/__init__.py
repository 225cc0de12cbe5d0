"""Shared state-space machinery for the SSM-family mixers (S4, S4D, DSS, GSS).

- ``hippo``: HiPPO-LegS and its normal-plus-low-rank (NPLR) form; the S4D-LegS and S4D-Lin diagonal inits.
- ``cauchy``: S4's DPLR kernel through the generating function at roots of unity (Cauchy + Woodbury),
  and the bilinear discretisation of the DPLR matrix for the recurrent view.
- ``dss_kernel``: DSS's softmax-normalised diagonal kernel and its recurrent coefficients.
- ``bidirectional``: one causal plus one anti-causal convolution (S4's bidirectional mode).
- ``reference``: dense, loop-by-loop recurrences every fast path is tested against.
"""
