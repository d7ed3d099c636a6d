"""Mixup (Zhang, Cisse, Dauphin and Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
ICLR 2018): each training batch is replaced by convex combinations of its examples and of
their one-hot labels.

For a batch ``(x, y)`` of ``N`` examples one weight ``lam ~ Beta(alpha, alpha)`` and one
permutation ``pi`` of the batch are drawn, and the step trains on ``lam * x + (1 - lam) *
x[pi]`` against the target distributions ``lam * onehot(y) + (1 - lam) * onehot(y[pi])``
(:class:`~fixedsim.nn.SoftmaxCrossEntropy` with soft targets). It is part of the large-batch
recipe of Osawa et al. (CVPR 2019; their public training code uses ``alpha`` from 0.4 to 1.0),
which restores some of the regularization a large batch loses (docs/kfac.md).

The mixed inputs are computed in float64 and rounded once, into ``activations``, by the
model's first rounding; ``lam`` and ``pi`` are drawn from ``ctx.key("mixup", "batch")``, so
they depend only on the run seed and the step: a resumed run, and every emulated
data-parallel worker (the global batch is mixed before it is split), sees the same mix.
"""

from __future__ import annotations

import numpy as np

from ..nn.optim import _number
from .core import Context

__all__ = ["check_alpha", "mix_batch"]


def check_alpha(alpha) -> float:
    """``alpha`` as a finite float >= 0 (0: no mixup), else ValueError naming the rule."""
    return _number(alpha, "mixup", low=0.0)


def mix_batch(x, y, classes: int, alpha: float, ctx: Context):
    """The mixed batch: ``(x_mixed, targets, lam)``.

    Parameters
    ----------
    x : array_like
        The batch's inputs, ``N`` examples along the first axis.
    y : array_like of int
        Their labels, in ``[0, classes)``.
    classes : int
    alpha : float
        > 0: the parameter of the Beta distribution of ``lam`` (small ``alpha``: ``lam``
        near 0 or 1, little mixing; 1: uniform).
    ctx : Context
        The step's context (its seed and step key the draw).

    Returns
    -------
    x_mixed : numpy.ndarray
        ``lam * x + (1 - lam) * x[pi]``, float64.
    targets : numpy.ndarray
        ``(N, classes)`` float64, ``lam * onehot(y) + (1 - lam) * onehot(y[pi])``.
    lam : float

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> from fixedsim.nn.mixup import mix_batch
    >>> x, y = np.array([[0.0], [1.0]]), np.array([0, 1])
    >>> ctx = fs.nn.Context(fs.nn.Policy.exact(), seed=1, step=0)
    >>> xm, t, lam = mix_batch(x, y, 2, 0.4, ctx)
    >>> bool(np.allclose(t.sum(axis=1), 1)), bool(0 <= lam <= 1)
    (True, True)
    >>> bool(np.allclose(xm[:, 0], t[:, 1]))  # x equals the label here: mixed alike
    True
    """
    alpha = check_alpha(alpha)
    if alpha == 0:
        raise ValueError("mixup alpha must be > 0 to mix a batch (0 means no mixup)")
    x = np.asarray(x)
    y = np.asarray(y)
    n = len(y)
    if x.shape[:1] != (n,):
        raise ValueError(f"mix_batch: {x.shape[0] if x.ndim else 0} inputs for {n} labels")
    rng = np.random.default_rng(ctx.key("mixup", "batch"))
    lam = float(rng.beta(alpha, alpha))
    perm = rng.permutation(n)
    xf = np.asarray(x, np.float64)
    x_mixed = lam * xf + (1.0 - lam) * xf[perm]
    targets = np.zeros((n, int(classes)))
    rows = np.arange(n)
    targets[rows, y] += lam
    targets[rows, y[perm]] += 1.0 - lam
    return x_mixed, targets, lam
