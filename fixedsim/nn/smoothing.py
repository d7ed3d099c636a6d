"""Gaussian smoothing of the objective: gradients taken at randomly perturbed weights.

For large-batch training, Naganuma and Yokota (CCGrid 2019, "A Performance Improvement
Approach for Second-Order Optimization in Large Mini-batch Training") smooth the objective so
that a second-order method regains the regularization that small, noisy batches give SGD.
Only their abstract could be read here, so fixedsim implements the documented family instead
of their exact recipe: the gradient of ``E_eps[L(w + sigma * eps)]``, ``eps ~ N(0, I)``,
estimated with one draw per step, i.e. the gradient at ``w + sigma * eps`` applied to ``w``
(together with label smoothing, :class:`~fixedsim.nn.SoftmaxCrossEntropy`
``label_smoothing``). See docs/kfac.md.

The perturbed weight ``w + sigma * eps`` is computed in float64 and rounded once into the
``weights`` role (the forward pass sees a representable weight); ``eps`` is drawn from
``ctx.key("smoothing", <parameter name>)``, so it depends only on the run seed, the step and
the parameter: a resumed run draws the same noise.
"""

from __future__ import annotations

import numpy as np

from ..nn.optim import _number
from .core import Context

__all__ = ["perturb_weights", "restore_weights", "check_sigma"]


def check_sigma(sigma) -> float:
    """``sigma`` as a finite float >= 0, else ValueError naming the rule."""
    return _number(sigma, "smoothing_sigma", low=0.0)


def perturb_weights(params: dict, ctx: Context, sigma: float) -> dict | None:
    """Set every parameter to ``w + sigma * eps`` rounded into ``weights``; returns the
    original values for :func:`restore_weights` (None, changing nothing, when ``sigma`` is
    0).

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> from fixedsim.nn.smoothing import perturb_weights, restore_weights
    >>> p = fs.nn.Parameter("w", np.zeros(3))
    >>> ctx = fs.nn.Context(fs.nn.Policy.exact(), seed=1, step=4)
    >>> saved = perturb_weights({"w": p}, ctx, 0.5)
    >>> bool(np.all(p.value != 0))
    True
    >>> restore_weights({"w": p}, saved)
    >>> p.value
    array([0., 0., 0.])
    """
    sigma = check_sigma(sigma)
    if sigma == 0.0:
        return None
    saved = {}
    for name, p in params.items():
        w = np.asarray(p.value)
        rng = np.random.default_rng(ctx.key("smoothing", name))
        noisy = np.asarray(w, np.float64) + sigma * rng.standard_normal(w.shape)
        saved[name] = p.value
        p.value = ctx.round("weights", noisy, "smoothing", name)
    return saved


def restore_weights(params: dict, saved: dict | None) -> None:
    """Put back the values :func:`perturb_weights` returned (nothing for None)."""
    if saved is None:
        return
    for name, p in params.items():
        p.value = saved[name]
