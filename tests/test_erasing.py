"""Random erasing: the seeded rectangles of a batch (sizes, places, values, their
distribution) and random erasing in training (resumed bit for bit, with emulated workers and
mixup, from the CLI)."""

import numpy as np
import pytest
from helpers import assert_train_setting_checked, same_weights, whole_and_resumed
from scipy import stats

from fixedsim import data as fdata
from fixedsim.nn import Context, Policy
from fixedsim.nn.erasing import AREA, ASPECT, erase_batch
from fixedsim.nn.train import TrainConfig, train


def _batch(n=64, shape=(2, 28, 28), seed=0):
    """Images whose values lie in [0.25, 0.75] except one pixel at each end of that range,
    so that a value outside it would be seen and the fill range is known."""
    x = np.random.default_rng(seed).uniform(0.3, 0.7, (n, *shape)).astype(np.float32)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 0.25, 0.75
    return x


def test_rectangles_replace_only_their_values():
    """Outside its rectangle an image keeps its values bit for bit; inside, every value in
    every channel is a fresh draw within the batch's range; sizes and places fit the
    image."""
    x = _batch()
    xe, boxes = erase_batch(x, 1.0, Context(Policy.exact(), seed=3, step=7))
    assert xe.dtype == np.float64 and xe.shape == x.shape
    H, W = x.shape[2:]
    for n, (t, left, h, w) in enumerate(boxes):
        assert h >= 1 and w >= 1 and t + h <= H and left + w <= W
        inside = np.zeros((H, W), bool)
        inside[t:t + h, left:left + w] = True
        assert np.array_equal(xe[n][:, ~inside], x[n][:, ~inside].astype(np.float64))
        fill = xe[n][:, inside]
        assert ((fill >= 0.25) & (fill <= 0.75)).all()
        assert np.unique(fill).size == fill.size  # fresh draws, not one value or a copy
        assert not np.isin(fill, x[n]).any()


def test_draws_keyed_by_seed_and_step():
    """The same seed and step erase the same rectangles with the same values; another step
    or seed, others."""
    x = _batch()
    ctx = lambda seed, step: Context(Policy.exact(), seed=seed, step=step)  # noqa: E731
    a, ba = erase_batch(x, 0.5, ctx(1, 4))
    b, bb = erase_batch(x, 0.5, ctx(1, 4))
    assert a.tobytes() == b.tobytes() and np.array_equal(ba, bb)
    for other in (ctx(1, 5), ctx(2, 4)):
        assert not np.array_equal(erase_batch(x, 0.5, other)[1], ba)


def test_sizes_and_probability_follow_the_paper():
    """Over 4,000 images at p = 0.5: the erased share is binomial around a half; the first
    draw that fits sets the size (so areas above ``H W`` times the largest share never
    occur and the aspect ratios cover [0.3, 1 / 0.3]); images not erased have an empty box
    and keep their values."""
    x = _batch(n=4000, shape=(1, 28, 28), seed=1)
    xe, boxes = erase_batch(x, 0.5, Context(Policy.exact(), seed=9, step=0))
    erased = boxes[:, 2] > 0
    assert stats.binomtest(int(erased.sum()), erased.size, 0.5).pvalue > 1e-3
    assert np.array_equal(xe[~erased], x[~erased].astype(np.float64))
    assert (boxes[~erased] == 0).all()
    h, w = boxes[erased, 2], boxes[erased, 3]
    share = h * w / 784
    # rounding each side to an integer moves the area by at most about a side's length
    assert share.min() >= AREA[0] * 0.5 and share.max() <= AREA[1] * 1.3
    assert np.median(share) == pytest.approx(np.mean(AREA), abs=0.06)
    ratio = h / w
    assert ratio.min() < ASPECT * 1.3 and ratio.max() > 1 / ASPECT / 1.3
    # the corner is uniform over the places the rectangle fits: the mean offset is half
    # the room left
    room = 28 - h
    rel = (boxes[erased, 0] + 0.5) / (room + 1)
    assert rel.mean() == pytest.approx(0.5, abs=0.02)


def test_small_images_that_no_draw_fits_are_left_alone():
    """A 1 x 1 image: a drawn rectangle (2% to 40% of it) rounds to sides of 1 only when
    its area is at least a quarter and its aspect ratio near 1, else to an empty side; an
    image none of whose 10 draws fits keeps its values."""
    x = np.random.default_rng(2).uniform(0, 1, (500, 1, 1, 1))
    xe, boxes = erase_batch(x, 1.0, Context(Policy.exact(), seed=0, step=0))
    kept = boxes[:, 2] == 0
    assert kept.any() and (~kept).any()
    assert np.array_equal(xe[kept], x[kept])
    assert (boxes[~kept, 2:] == 1).all()


def test_erase_batch_refuses_bad_input():
    ctx = Context(Policy.exact())
    x = np.zeros((4, 1, 8, 8))
    with pytest.raises(ValueError, match=r"probability must be > 0 to erase a batch"):
        erase_batch(x, 0.0, ctx)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"random_erasing must be"):
            erase_batch(x, bad, ctx)
    with pytest.raises(ValueError, match=r"needs images, shape \(N, C, H, W\); got shape "
                                         r"\(4, 64\)"):
        erase_batch(x.reshape(4, 64), 0.5, ctx)


def _tiny():
    return fdata.synthetic(n_train=64, n_test=16, shape=(1, 16, 16), classes=4, seed=3)


@pytest.mark.parametrize("extra", [
    {},
    {"optimizer": "kfac", "damping": 0.01, "inv_interval": 2, "workers": 2,
     "allreduce": "bf16", "mixup": 0.4},
], ids=["sgd", "kfac-2-workers-bf16-mixup"])
def test_erasing_in_training_resumes_bit_for_bit_and_changes_the_run(tmp_path, extra):
    """The rectangles are keyed by the step: a resumed run ends with the bits of one that
    never stopped; erasing changes the trained weights."""
    base = dict(model="lenet", epochs=2, batch_size=32, lr=0.05, seed=5, **extra)
    pol = Policy.float32()
    whole, rest = whole_and_resumed(TrainConfig(**base, random_erasing=0.5), pol, _tiny(),
                                    tmp_path)
    plain = train(TrainConfig(**base), pol, progress=False, data=_tiny())
    assert same_weights(whole.model, rest.model)
    assert not same_weights(whole.model, plain.model)


def test_erasing_setting_is_checked_and_reaches_the_cli(tmp_path):
    assert_train_setting_checked(tmp_path, "random_erasing", 0.5,
                                 (-0.1, 1.01, float("nan"), "0.2", True), 2)
