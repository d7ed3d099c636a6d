"""Approximate tensor operations: column-row sampling of matrix products and convolutions.

Adelman, Levy, Hakimi and Silberstein, "Faster Neural Network Training with Approximate Tensor
Operations", NeurIPS 2021 (arXiv:1805.08079): a product ``A B`` is estimated from a sample of
the column-row pairs of its inner dimension (CRS, Bernoulli-CRS, top-k), seeded and counted,
the kept pairs' product computed under any :class:`~fixedsim.MatmulSpec`.
:func:`sampled_matmul` and :func:`sampled_conv2d` are the primitives; :class:`Approx` is the
setting a Conv2d or Linear layer takes. :class:`GradApprox` approximates a layer's backward
pass (top-k or random sampling of the error, a stale weight gradient); :class:`Rescale`
schedules kernel rescaling (train at low resolution first). See docs/approx.md.
"""

from .core import (
                   METHODS,
                   PRODUCTS,
                   Approx,
                   ApproxStats,
                   Selection,
                   keep_count,
                   parse_approx,
                   sampled_conv2d,
                   sampled_matmul,
                   select,
)
from .grad import GRAD_METHODS, GradApprox, parse_grad_approx, sample_error, topk_error
from .rescale import Rescale, parse_rescale, rescale_kernel

__all__ = ["METHODS", "PRODUCTS", "Approx", "ApproxStats", "Selection", "keep_count",
           "parse_approx", "sampled_conv2d", "sampled_matmul", "select", "GRAD_METHODS",
           "GradApprox", "parse_grad_approx", "sample_error", "topk_error", "Rescale",
           "parse_rescale", "rescale_kernel"]
