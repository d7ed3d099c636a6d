"""Random erasing (Zhong, Zheng, Kang, Li and Yang, "Random Erasing Data Augmentation",
AAAI 2020): each training image is, with probability ``p``, given a rectangle of random
values.

For each image of a batch (``N, C, H, W``), independently: with probability ``p`` a
rectangle is drawn, its area ``s * H * W`` with ``s`` uniform in ``[0.02, 0.4]`` and its
aspect ratio ``r`` (height over width) uniform in ``[0.3, 1 / 0.3]`` (the paper's
Algorithm 1 and its defaults), height ``round(sqrt(s H W r))`` and width ``round(sqrt(s H W /
r))``; a draw that does not fit in the image (or rounds to an empty side) is drawn again, up
to :data:`ATTEMPTS` times, after which the image is left as it is (the paper draws until one
fits; a bound keeps a step's cost bounded). The rectangle's top-left corner is uniform over
the places where it fits, and every value under it, in every channel, is replaced by a
value uniform in ``[lo, hi]``, the batch's smallest and largest input (the paper's "random
values" in the pixels' range, 0 to 255 before normalization). Fashion-MNIST is among the
paper's benchmarks; random erasing on half the images (``p = 0.5``) is part of the training
recipe of Osawa et al. (CVPR 2019; docs/kfac.md).

The erased batch is float64 (its other values unchanged) and rounded once, into
``activations``, by the model's first rounding. Every draw comes from ``ctx.key("erasing",
"batch")``: the run seed and the step alone, so a resumed run, and every emulated
data-parallel worker (the global batch is erased before it is split), sees the same
rectangles. Erasing comes before mixup (:mod:`fixedsim.nn.mixup`) when both are on: an
augmentation of each image, then the mix of the batch.
"""

from __future__ import annotations

import numpy as np

from ..nn.optim import _number
from .core import Context

__all__ = ["ATTEMPTS", "AREA", "ASPECT", "check_probability", "erase_batch"]

#: The range of the erased area as a fraction of the image's (the paper's ``s_l, s_h``).
AREA = (0.02, 0.4)
#: The smallest aspect ratio (height over width) of the rectangle; the largest is its
#: inverse (the paper's ``r_1``).
ASPECT = 0.3
#: Draws of the rectangle's size per image before the image is left as it is.
ATTEMPTS = 10


def check_probability(p) -> float:
    """``p`` as a float in ``[0, 1]`` (0: no erasing), else ValueError naming the rule."""
    return _number(p, "random_erasing", low=0.0, high=1.0)


def erase_batch(x, p: float, ctx: Context):
    """The batch with random rectangles erased: ``(x_erased, boxes)``.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
        The batch's images.
    p : float
        In ``(0, 1]``: the probability that an image is erased.
    ctx : Context
        The step's context (its seed and step key the draws).

    Returns
    -------
    x_erased : numpy.ndarray
        float64, shape (N, C, H, W): ``x`` with each erased image's rectangle replaced by
        values uniform in ``[x.min(), x.max()]``.
    boxes : numpy.ndarray
        int64, shape (N, 4): ``(top, left, height, width)`` of each image's rectangle,
        ``(0, 0, 0, 0)`` where the image was not erased.

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> from fixedsim.nn.erasing import erase_batch
    >>> x = np.zeros((4, 1, 28, 28)); x[:, :, 0, 0] = 1.0   # values in [0, 1]
    >>> ctx = fs.nn.Context(fs.nn.Policy.exact(), seed=1, step=0)
    >>> xe, boxes = erase_batch(x, 1.0, ctx)
    >>> top, left, h, w = boxes[0]
    >>> bool(0.02 * 784 * 0.9 <= h * w <= 0.4 * 784 * 1.1)   # about 2% to 40% of the image
    True
    >>> bool(((xe >= 0) & (xe <= 1)).all())
    True
    """
    p = check_probability(p)
    if p == 0:
        raise ValueError("random erasing probability must be > 0 to erase a batch (0 means "
                         "no erasing)")
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"random erasing needs images, shape (N, C, H, W); got shape "
                         f"{x.shape}")
    N, _, H, W = x.shape
    rng = np.random.default_rng(ctx.key("erasing", "batch"))
    erase = rng.random(N) < p
    area = rng.uniform(*AREA, (N, ATTEMPTS)) * (H * W)
    aspect = rng.uniform(ASPECT, 1.0 / ASPECT, (N, ATTEMPTS))
    corner = rng.random((N, 2))
    h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (h >= 1) & (h <= H) & (w >= 1) & (w <= W)
    first = np.argmax(fits, axis=1)  # the first draw that fits (0 when none does)
    rows = np.arange(N)
    erase &= fits[rows, first]
    boxes = np.zeros((N, 4), np.int64)
    hs, ws = h[rows, first], w[rows, first]
    boxes[:, 2] = np.where(erase, hs, 0)
    boxes[:, 3] = np.where(erase, ws, 0)
    boxes[:, 0] = np.where(erase, np.floor(corner[:, 0] * (H - hs + 1)), 0)
    boxes[:, 1] = np.where(erase, np.floor(corner[:, 1] * (W - ws + 1)), 0)
    out = np.array(x, np.float64)
    if not erase.any():
        return out, boxes
    lo, hi = float(out.min()), float(out.max())
    C = x.shape[1]
    fill = rng.uniform(lo, hi, int((boxes[:, 2] * boxes[:, 3]).sum()) * C)
    at = 0
    for n in np.flatnonzero(erase):
        t, left, bh, bw = (int(v) for v in boxes[n])
        size = C * bh * bw
        out[n, :, t:t + bh, left:left + bw] = fill[at:at + size].reshape(C, bh, bw)
        at += size
    return out, boxes
