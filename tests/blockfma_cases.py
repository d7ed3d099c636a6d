"""What the BlockFMA test modules share: operands that stress alignment, the check of the
blockfma row against the oracle (bits and per-step counts), one Numba thread."""

import contextlib
import math

import numba
import numpy as np
from helpers import assert_same_bits
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference


@contextlib.contextmanager
def one_numba_thread():
    """One Numba thread for small products (the bits do not depend on it:
    test_matmul_blockfma.py::test_threads_do_not_change_bits)."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


@st.composite
def operands(draw, fmt, shape, top=8):
    """Values of ``fmt`` spread over its exponent range, up to ``2**top``: mixed exponents,
    subnormals, zeros of both signs, cancelling pairs (the same magnitude with both signs)."""
    n = int(np.prod(shape))
    e = draw(st.lists(st.integers(fmt.emin - fmt.man_bits, min(fmt.emax, top)), min_size=n,
                      max_size=n))
    m = draw(st.lists(st.floats(1.0, 2.0, exclude_max=True), min_size=n, max_size=n))
    sign = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=n, max_size=n))
    x = np.array([s * math.ldexp(v, k) for s, v, k in zip(sign, m, e, strict=True)])
    zeros = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    x = np.where(zeros, np.copysign(0.0, x), x).reshape(shape)
    x = np.asarray(fs.quantize(x, fmt), np.float64)
    if draw(st.booleans()) and shape[-1] > 1:  # cancellation: a column repeated, negated
        x[..., 1] = -x[..., 0]
    return x


def check(a, b, spec, c=None):
    """The blockfma row's bits and per-step counts (accumulator, alignment, output) are the
    oracle's (general row: the oracle on every element), counted and not."""
    got, cnt = fs.matmul(a, b, spec, c, stats="steps")
    assert cnt.paths.get("blockfma") == 1, cnt.paths
    unread = fs.matmul(a, b, spec, c)
    want, cw = fs.matmul(a, b, spec, c, stats="steps", path="general")
    ref = reference.matmul(a, b, spec, c=c)
    for y in (got, unread, want):
        assert_same_bits(y.astype(np.float64), ref)
    assert cnt.accumulator == cw.accumulator
    assert cnt.alignment == cw.alignment
    assert cnt.output == cw.output
