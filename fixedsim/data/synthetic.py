"""A learnable synthetic image classification set, made from a seed in milliseconds, for tests."""

from __future__ import annotations

import numbers

import numpy as np

from .dataset import Dataset

__all__ = ["synthetic"]


def _check_count(name, n):
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    return int(n)


def synthetic(n_train: int = 10_000, n_test: int = 2_000, *, shape=(1, 28, 28),
              classes: int = 10, seed: int = 0, noise: float = 0.4) -> Dataset:
    """A synthetic image classification set: one random template per class, plus noise.

    Each class has a template: a random pattern drawn uniformly in [0, 1] on a coarse grid
    (about a quarter of the resolution) and enlarged to ``shape``, so it has blobs a
    convolution can pick up. An image of class k is ``a * template[k] + noise * z``, with a
    contrast ``a`` uniform in [0.7, 1] per image and ``z`` standard normal per pixel, clipped
    to [0, 1]. Both parts have the classes in equal numbers (up to one) in random order. A
    nearest-class-mean classifier is nearly perfect at the default noise, so a small network
    learns it in a few steps; raise ``noise`` to make it harder.

    Parameters
    ----------
    n_train, n_test : int
        Number of training and test images.
    shape : tuple of int
        Image shape (C, H, W).
    classes : int
        Number of classes, at least 1.
    seed : int
        Seed of everything: the same arguments give the same arrays, bit for bit (with the same
        NumPy version).
    noise : float
        Standard deviation of the Gaussian pixel noise.

    Returns
    -------
    Dataset
        Named ``"synthetic"``, float32 images (N, C, H, W) in [0, 1], int64 labels.

    Examples
    --------
    >>> ds = synthetic(200, 50, shape=(1, 8, 8), classes=4, seed=1)
    >>> ds
    Dataset('synthetic', train=200, test=50, image_shape=(1, 8, 8), classes=4)
    >>> np.bincount(ds.y_train)
    array([50, 50, 50, 50])
    """
    n_train = _check_count("n_train", n_train)
    n_test = _check_count("n_test", n_test)
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(d, numbers.Integral) and d > 0 for d in shape):
        raise ValueError(f"shape must be three positive integers (C, H, W), got {shape!r}")
    if not isinstance(classes, numbers.Integral) or classes < 1:
        raise ValueError(f"classes must be a positive integer, got {classes!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be non-negative, got {noise!r}")
    c, h, w = (int(d) for d in shape)
    rng = np.random.default_rng(seed)
    lh, lw = max(1, min(h, (h + 3) // 4)), max(1, min(w, (w + 3) // 4))
    coarse = rng.random((classes, c, lh, lw), dtype=np.float32)
    rows, cols = np.arange(h) * lh // h, np.arange(w) * lw // w
    templates = coarse[:, :, rows[:, None], cols[None, :]]

    def part(n):
        labels = rng.permutation(np.arange(n, dtype=np.int64) % classes)
        contrast = rng.uniform(0.7, 1.0, size=(n, 1, 1, 1)).astype(np.float32)
        x = templates[labels] * contrast
        x += np.float32(noise) * rng.standard_normal(x.shape, dtype=np.float32)
        np.clip(x, 0.0, 1.0, out=x)
        return x, labels

    x_train, y_train = part(n_train)
    x_test, y_test = part(n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test,
                   classes=tuple(str(k) for k in range(classes)),
                   source=f"fixedsim.data.synthetic(shape={shape}, classes={classes}, "
                          f"seed={seed}, noise={noise})")
