"""The :class:`Dataset` container, image scaling, and the deterministic stratified split."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Dataset", "images_from_uint8", "split_per_class"]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An image classification data set, split into training and test parts.

    Attributes
    ----------
    name : str
        A short name: ``"embedded"``, ``"fashion-mnist"``, ``"mnist5k"``, ``"synthetic"``,
        or the directory's name.
    x_train, x_test : numpy.ndarray
        Images, float32, shape (N, C, H, W), values in [0, 1]. Images read from uint8 files
        are ``code / 255`` rounded to float32 (0 and 255 map to exactly 0 and 1).
    y_train, y_test : numpy.ndarray
        Labels, int64, shape (N,), each in ``range(len(classes))``.
    classes : tuple of str
        The class names, indexed by label.
    source : str
        Where the data came from (a directory, a file, or how it was made).

    The dataclass is frozen (its fields cannot be rebound) but the arrays are ordinary,
    writable NumPy arrays, new on every load; index them (``x_train[idx]``) to shuffle or batch.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple
    source: str

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
                raise ValueError(f"Dataset {self.name!r}: x_{part} must be a float32 array of "
                                 f"shape (N, C, H, W), got {_describe(x)}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
                raise ValueError(f"Dataset {self.name!r}: y_{part} must be an int64 array of "
                                 f"shape (N,), got {_describe(y)}")
            if len(x) != len(y):
                raise ValueError(f"Dataset {self.name!r}: {len(x)} images but {len(y)} labels "
                                 f"in the {part} part")
            if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(f"Dataset {self.name!r}: {part} labels must lie in "
                                 f"[0, {len(self.classes)}), got [{y.min()}, {y.max()}]")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"Dataset {self.name!r}: training images {self.x_train.shape[1:]} "
                             f"and test images {self.x_test.shape[1:]} differ in shape")

    @property
    def image_shape(self) -> tuple:
        """The shape (C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """The number of classes, ``len(classes)``."""
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
                f"image_shape={self.image_shape}, classes={self.num_classes})")


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def images_from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) or (N, C, H, W) as float32 (N, C, H, W) in [0, 1]: ``code / 255``.

    >>> images_from_uint8(np.array([[[0, 51, 255]]], dtype=np.uint8))
    array([[[[0. , 0.2, 1. ]]]], dtype=float32)
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images of shape (N, H, W) or (N, C, H, W), got "
                         f"{_describe(images)}")
    if images.ndim == 3:
        images = images[:, None, :, :]
    return images.astype(np.float32) / np.float32(255)


def split_per_class(labels: np.ndarray, counts, seed: int) -> list:
    """Split indices into parts holding ``counts[j]`` examples of every class, deterministically.

    The examples of each class are put in a random order, drawn from ``seed``, and cut into
    consecutive parts of ``counts[0]``, ``counts[1]``, ... examples; each part's indices are
    returned in that random order too, so the classes are interleaved. The order comes from
    the raw output of NumPy's PCG64 bit generator, whose stream NumPy keeps stable across
    versions, so the same labels and seed give the same split everywhere.

    Parameters
    ----------
    labels : array_like of int
        Class labels, 0 .. K-1; every class must occur at least ``sum(counts)`` times.
    counts : sequence of int
        Examples per class in each part.
    seed : int
        Seed of the order.

    Returns
    -------
    list of numpy.ndarray
        One int64 index array per part, of length ``K * counts[j]``.

    Examples
    --------
    >>> labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    >>> train, test = split_per_class(labels, [2, 1], seed=0)
    >>> np.bincount(labels[train]), np.bincount(labels[test])
    (array([2, 2, 2]), array([1, 1, 1]))
    >>> sorted(np.concatenate([train, test]).tolist()) == list(range(9))
    True
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {_describe(labels)}")
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be non-negative, got {counts}")
    key = np.random.PCG64(seed).random_raw(len(labels))
    parts = [[] for _ in counts]
    for c in range(int(labels.max()) + 1 if labels.size else 0):
        members = np.flatnonzero(labels == c)
        if len(members) < sum(counts):
            raise ValueError(f"class {c} has {len(members)} examples, fewer than the "
                             f"{sum(counts)} asked for ({' + '.join(map(str, counts))})")
        members = members[np.argsort(key[members], kind="stable")]
        start = 0
        for j, n in enumerate(counts):
            parts[j].append(members[start:start + n])
            start += n
    out = []
    for chunks in parts:
        idx = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        out.append(idx[np.argsort(key[idx], kind="stable")].astype(np.int64))
    return out
