"""Adaptive Deep Reuse (Ning, Guan and Shen, ICDE 2019; Ning and Shen, ICS 2019), exactly.

Rows of a layer's input matrix (the im2col matrix of a convolution) whose sub-vectors fall in
the same locality-sensitive-hash bucket share one centroid, and the product of that centroid is
computed once for all of them. :func:`reuse_matmul` is the primitive; :class:`Reuse` is the
setting a Conv2d or Linear layer takes; :mod:`fixedsim.reuse.schedules` changes it as training
goes. See docs/reuse.md.
"""

from .core import (
                   MAX_H,
                   Clustering,
                   Reuse,
                   ReuseStats,
                   ReuseTable,
                   cluster,
                   hyperplanes,
                   reuse_grad_input,
                   reuse_grad_weight,
                   reuse_matmul,
)

__all__ = ["MAX_H", "Clustering", "Reuse", "ReuseStats", "ReuseTable", "cluster", "hyperplanes",
           "reuse_grad_input", "reuse_grad_weight", "reuse_matmul"]
