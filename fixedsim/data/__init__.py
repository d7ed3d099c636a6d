"""Data sets for training: IDX files, the embedded Fashion-MNIST subset, MNIST 5k, synthetic.

Every loader returns a :class:`Dataset` with float32 images (N, C, H, W) in [0, 1] and int64
labels; nothing is ever downloaded. See docs/data.md.

>>> from fixedsim import data
>>> ds = data.load()                      # the default: embedded()
>>> ds.x_train.shape, ds.x_train.dtype, ds.y_test.shape
((10000, 1, 28, 28), dtype('float32'), (2000,))
"""

from .dataset import Dataset, split_per_class
from .idx import IDXError, read_idx, write_idx
from .loaders import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    MNIST_CLASSES,
    embedded,
    fashion_mnist,
    idx_directory,
    load,
    mnist_5k,
)
from .synthetic import synthetic

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "MNIST_CLASSES",
    "Dataset",
    "IDXError",
    "embedded",
    "fashion_mnist",
    "idx_directory",
    "load",
    "mnist_5k",
    "read_idx",
    "split_per_class",
    "synthetic",
    "write_idx",
]
