"""Linear recurrences ``x_k = a_k * x_{k-1} + b_k`` over a sequence: a log-depth parallel scan and its reference.

The pairs (a, b) compose associatively, ``(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)``, which is what
lets S5 and DLR run a recurrent model over the whole sequence in O(log L) sequential steps.
"""

from hybrid_pretrain.models.scan.parallel import linear_scan
from hybrid_pretrain.models.scan.reference import linear_scan_ref

__all__ = ["linear_scan", "linear_scan_ref"]
