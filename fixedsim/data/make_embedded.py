"""Regenerate the embedded Fashion-MNIST subset from the full data set.

Run ``python -m fixedsim.data.make_embedded [--source DIR] [--output DIR]``. It reads the four
IDX files of Fashion-MNIST from ``--source`` (default ``/usr/share/datasets/fashion-mnist``,
from the Debian package ``dataset-fashion-mnist``), picks 1,000 training and 200 test images
of every class with :func:`fixedsim.data.split_per_class` and seed 0, and writes, into
``--output`` (default: the package's ``fixedsim/data/embedded/``):

* ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
  ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``: the subset, uint8, as in
  the original files;
* ``train-indices-idx1-int32.gz``, ``t10k-indices-idx1-int32.gz``: each chosen image's
  position in the full training or test file.

The split depends only on the labels and the seed (PCG64's raw stream, stable across NumPy
versions) and gzip output has no time stamp, so the same source gives the same bytes.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from .dataset import split_per_class
from .idx import read_idx, write_idx
from .loaders import _FASHION_HINT, EMBEDDED_DIR, FASHION_MNIST_DIR, IDX_FILES, _find_files

__all__ = ["make_embedded", "main"]

SEED = 0
TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200


def make_embedded(source=FASHION_MNIST_DIR, output=EMBEDDED_DIR, *,
                  train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                  seed: int = SEED) -> dict:
    """Write a stratified subset of the IDX data set in ``source`` into ``output``.

    Parameters
    ----------
    source : str or os.PathLike
        Folder with the four standard IDX files (raw or gzipped).
    output : str or os.PathLike
        Folder to write into (created if needed); existing files of the same names are
        replaced.
    train_per_class, test_per_class : int
        Images of each class to keep from the training and from the test file.
    seed : int
        Seed of the choice (see :func:`fixedsim.data.split_per_class`).

    Returns
    -------
    dict
        File name -> size in bytes of every file written.
    """
    source, output = pathlib.Path(source), pathlib.Path(output)
    files = _find_files(source, "Fashion-MNIST", _FASHION_HINT)
    output.mkdir(parents=True, exist_ok=True)
    written = {}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        images = read_idx(files[f"{part}_images"])
        labels = read_idx(files[f"{part}_labels"])
        (idx,) = split_per_class(labels, [per_class], seed)
        stem = "train" if part == "train" else "t10k"
        out = {
            IDX_FILES[f"{part}_images"]: images[idx],
            IDX_FILES[f"{part}_labels"]: labels[idx],
            f"{stem}-indices-idx1-int32": idx.astype(np.int32),
        }
        for name, array in out.items():
            path = output / (name + ".gz")
            write_idx(path, array, compress=True)
            written[path.name] = path.stat().st_size
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fixedsim.data.make_embedded",
        description="Regenerate fixedsim's embedded Fashion-MNIST subset from the full data set.")
    parser.add_argument("--source", default=str(FASHION_MNIST_DIR),
                        help="folder with the four Fashion-MNIST IDX files (default: %(default)s)")
    parser.add_argument("--output", default=str(EMBEDDED_DIR),
                        help="folder to write the subset into (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS,
                        help="training images per class (default: %(default)s)")
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS,
                        help="test images per class (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        written = make_embedded(args.source, args.output, train_per_class=args.train_per_class,
                                test_per_class=args.test_per_class, seed=args.seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, size in written.items():
        print(f"{size:>10,d}  {pathlib.Path(args.output) / name}")
    print(f"{sum(written.values()):>10,d}  in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
