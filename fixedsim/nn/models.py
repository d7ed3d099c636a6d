"""The model zoo: the networks of the studies, built deterministically from a seed.

Each constructor returns a :class:`~fixedsim.nn.Sequential`; the seed fixes every initial
weight (the layers draw from one ``numpy.random.Generator`` in order).
"""

from __future__ import annotations

import numpy as np

from .layers import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential

__all__ = ["mlp", "lenet", "cifarnet", "MODELS", "build"]


def mlp(seed: int = 0, in_features: int = 784, hidden=(1000, 1000), classes: int = 10,
        in_shape=None) -> Sequential:
    """Fully connected ReLU network; the default 784-1000-1000-10 is the MLP of Gupta et al.

    Takes images ``(N, C, H, W)`` (flattened first) or vectors ``(N, in_features)``.
    """
    rng = np.random.default_rng(seed)
    if in_shape is not None:
        in_features = int(np.prod(in_shape))
    layers, n = [Flatten()], in_features
    for h in hidden:
        layers += [Linear(n, h, rng=rng), ReLU()]
        n = h
    layers.append(Linear(n, classes, rng=rng))
    return Sequential(*layers)


def lenet(seed: int = 0, in_shape=(1, 28, 28), channels=(16, 32), hidden: int = 128,
          classes: int = 10, kernel: int = 5, batchnorm: bool = False) -> Sequential:
    """LeNet-style CNN: two 5x5 convolutions, each with ReLU and 2x2 max-pooling, one hidden
    fully connected layer.

    For 28x28 inputs: conv 5x5 (16) -> 24x24 -> pool -> 12x12 -> conv 5x5 (32) -> 8x8 -> pool ->
    4x4 -> 512 -> 128 -> 10. ``kernel`` sets the size of both kernels (an even size, such as
    4, lets kernel rescaling by 2 halve the first one: docs/approx.md). ``batchnorm``: a
    :class:`~fixedsim.nn.BatchNorm2d` after each convolution, which then has no bias (the
    normalisation removes it): conv - BatchNorm - ReLU - pool, as cifarnet's stages. The
    weights are those of the plain LeNet of the same seed (neither a bias nor BatchNorm
    draws from the generator).
    """
    rng = np.random.default_rng(seed)
    C, H, W = in_shape
    c1, c2 = channels
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1:
        raise ValueError(f"lenet: kernel must be an int >= 1, got {kernel!r}")
    k = kernel - 1
    h = ((H - k) // 2 - k) // 2
    w = ((W - k) // 2 - k) // 2
    if h < 1 or w < 1:
        raise ValueError(f"lenet: input {in_shape} too small for two {kernel}x{kernel} conv + "
                         f"pool stages")
    if not isinstance(batchnorm, bool):
        raise ValueError(f"lenet: batchnorm must be true or false, got {batchnorm!r}")
    layers, cin = [], C
    for c in (c1, c2):
        layers.append(Conv2d(cin, c, kernel, bias=not batchnorm, rng=rng))
        if batchnorm:
            layers.append(BatchNorm2d(c))
        layers += [ReLU(), MaxPool2d(2)]
        cin = c
    return Sequential(*layers, Flatten(), Linear(c2 * h * w, hidden, rng=rng), ReLU(),
                      Linear(hidden, classes, rng=rng))


def cifarnet(seed: int = 0, in_shape=(3, 32, 32), channels=(16, 32, 64), hidden: int = 128,
             classes: int = 10, batchnorm: bool = True, dropout: float = 0.0) -> Sequential:
    """A small CIFAR-style CNN: three 3x3 conv stages (conv, BatchNorm, ReLU, 2x2 max-pool),
    a hidden fully connected layer (optionally with dropout) and the classifier."""
    rng = np.random.default_rng(seed)
    C, H, W = in_shape
    layers = []
    for c in channels:
        layers.append(Conv2d(C, c, 3, padding=1, rng=rng))
        if batchnorm:
            layers.append(BatchNorm2d(c))
        layers += [ReLU(), MaxPool2d(2)]
        C, H, W = c, H // 2, W // 2
        if H < 1 or W < 1:
            raise ValueError(f"cifarnet: input {in_shape} too small for {len(channels)} stages")
    layers += [Flatten(), Linear(C * H * W, hidden, rng=rng), ReLU()]
    if dropout:
        layers.append(Dropout(dropout))
    layers.append(Linear(hidden, classes, rng=rng))
    return Sequential(*layers)


MODELS = {"mlp": mlp, "lenet": lenet, "cifarnet": cifarnet}


def build(name: str, seed: int = 0, in_shape=(1, 28, 28), classes: int = 10, **options):
    """A model by name (``mlp``, ``lenet``, ``cifarnet``) for inputs of ``in_shape``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](seed=seed, in_shape=tuple(in_shape), classes=classes, **options)
