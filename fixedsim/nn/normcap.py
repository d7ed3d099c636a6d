"""The weight-norm cap of SP-NGD: after every update, a weight whose norm exceeds
``sqrt(c * out_units)`` is scaled back to it.

Osawa et al. (CVPR 2019; SP-NGD, arXiv:2002.06015) train ResNet-50 at large batch with the
weights of the convolutions and of the fully connected layer kept from growing: after each
update, ``w <- w * min(1, sqrt(2 * d_out) / (||w|| + 1e-9))``, ``d_out`` the layer's output
units (a convolution's output channels) and ``||w||`` the Frobenius norm of the whole
weight (their public training code; biases and BatchNorm parameters are left alone). The
constant 2 is He initialization's: a weight drawn with variance ``2 / d_in`` has squared
norm about ``2 d_out``, so the cap holds the weights near the size they start at.

:func:`cap_weight_norms` applies it to every :class:`~fixedsim.nn.Linear` and
:class:`~fixedsim.nn.Conv2d` weight of a model, with ``c`` a setting (``TrainConfig
.weight_norm_cap``; SP-NGD's 2). The arithmetic, so that every machine gives the same bits:
the squared norm is the correctly rounded float64 sum (:func:`math.fsum`) of the squares of
the stored weight, each square a float64 product (exact for weights of 26 significant bits
or fewer: FP32, BF16, FP16, the FP8s, fixed point up to 26 bits), its square root the IEEE
one; the factor ``sqrt(c * out) / (norm + 1e-9)`` is float64; a weight whose factor is
below 1 becomes ``w * factor`` in float64, rounded once into the ``weights`` role (stochastic
draws keyed ``ctx.key(<layer>, "norm_cap")``: the run seed, the step and the layer), and a
weight within the cap is not touched (not even rounded). The optimizer's state (momentum)
is not rescaled, as in SP-NGD.
"""

from __future__ import annotations

import math

import numpy as np

from ..nn.optim import _number
from .core import Context
from .layers import Conv2d, Linear

__all__ = ["EPS", "check_cap", "cap_weight_norms", "weight_norm_limit"]

#: Added to the norm before the division (SP-NGD's guard against a zero weight).
EPS = 1e-9


def check_cap(c) -> float:
    """``c`` as a finite float >= 0 (0: no cap), else ValueError naming the rule."""
    return _number(c, "weight_norm_cap", low=0.0)


def weight_norm_limit(layer, c: float) -> float:
    """``sqrt(c * out_units)`` of a Linear (``out_features``) or Conv2d (``out_channels``)
    layer: the largest norm its weight keeps after an update."""
    out = layer.out_features if isinstance(layer, Linear) else layer.out_channels
    return math.sqrt(c * out)


def cap_weight_norms(layers, ctx: Context, c: float) -> int:
    """Scale back, in place, every Linear and Conv2d weight of ``layers`` whose norm exceeds
    :func:`weight_norm_limit`; returns how many were scaled.

    Parameters
    ----------
    layers : iterable of fixedsim.nn.Module
        The model's layers (``Sequential.layers``); others than Linear and Conv2d, and every
        bias, are left alone.
    ctx : Context
        The step's context: the ``weights`` role the scaled weight is rounded into, and its
        counters.
    c : float
        The cap's constant (>= 0; 0: no cap; SP-NGD's 2): the norm is held to
        ``sqrt(c * out_units)``.

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> from fixedsim.nn.normcap import cap_weight_norms
    >>> model = fs.nn.Sequential(fs.nn.Linear(2, 1))
    >>> lin = model.layers[0]
    >>> lin.weight.value = np.array([[3.0], [4.0]])      # norm 5; the cap sqrt(2 * 1)
    >>> ctx = fs.nn.Context(fs.nn.Policy.float32(), seed=0, step=0)
    >>> cap_weight_norms(model.layers, ctx, 2.0)
    1
    >>> float(np.linalg.norm(lin.weight.value))          # sqrt(2), in FP32
    1.4142135381698608
    """
    c = check_cap(c)
    if c == 0.0:
        return 0
    scaled = 0
    for layer in layers:
        if not isinstance(layer, (Linear, Conv2d)):
            continue
        w = np.asarray(layer.weight.value, np.float64)
        norm = math.sqrt(math.fsum((w * w).ravel()))
        factor = weight_norm_limit(layer, c) / (norm + EPS)
        if factor < 1.0:
            layer.weight.value = ctx.round("weights", w * factor, layer.name, "norm_cap")
            scaled += 1
    return scaled
