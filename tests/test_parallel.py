"""The ring all-reduce: every partial sum rounded in the ring's order, against the exact oracle."""

import math
from fractions import Fraction

import numpy as np
import pytest
from helpers import assert_same_bits, float_toward_zero
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.jit.rng import random_u64_array
from fixedsim.nn.parallel import (
    AllReduce,
    WorkerContext,
    chunk_bounds,
    from_upper_triangle,
    parse_allreduce,
    ring_allreduce,
    upper_triangle,
)
from fixedsim.quantize import child_seed, random_key

FLAGS = ("inexact", "overflow", "underflow", "subnormal", "nan")


def _exact_add(a, b, rounding):
    """``a + b`` exactly: a Fraction, or a float for infinities, NaN and signed zeros."""
    if not (math.isfinite(a) and math.isfinite(b)):
        with np.errstate(invalid="ignore"):
            return float(np.float64(a) + np.float64(b))
    v = Fraction(a) + Fraction(b)
    if v != 0:
        return v
    sa, sb = math.copysign(1.0, a), math.copysign(1.0, b)
    if sa == sb:
        return math.copysign(0.0, sa)
    return -0.0 if rounding is fs.Rounding.DOWN else 0.0


def oracle(xs, fmt, rounding, overflow=None, seed=0, scale=1.0, random_bits=None):
    """The reduced array and flag totals, written from the ring's order alone: chunk ``c`` is
    ``((x_c + x_{c+1}) + ...) + x_{c-1}`` (worker indices mod N) over the workers' arrays
    rounded into ``fmt``, each ``+`` one rounding by :func:`fixedsim.reference.round_to_format`
    with the draws of ``child_seed(seed, step + 1, c)``; then divided by ``scale``. The cast
    rounds each element times ``scale`` as float64 computes it (the documented model: a
    product below 2**-1074 is 0 before the cast)."""
    rounding = fs.Rounding.coerce(rounding)
    n = len(xs)
    flat = [np.asarray(x, np.float64).reshape(-1) for x in xs]
    size = flat[0].size
    r = 64 if random_bits is None else random_bits
    sr = rounding is fs.Rounding.STOCHASTIC
    totals = dict.fromkeys(FLAGS, 0)

    def rnd(v, key, i):
        d = int(random_u64_array(random_key(key), i, 1)[0] >> np.uint64(64 - r)) if sr else None
        res, f = reference.round_to_format(v, fmt, rounding, overflow, draw=d,
                                           random_bits=random_bits, flags=True)
        for k in FLAGS:
            totals[k] += f[k]
        return float_toward_zero(res)

    cast = [[rnd(Fraction(float(v) * scale) if math.isfinite(v) and v else v,
                 child_seed(seed, 0, w), i) for i, v in enumerate(flat[w])] for w in range(n)]
    out = np.empty(size)
    for c, (lo, hi) in enumerate(chunk_bounds(size, n)):
        for j in range(lo, hi):
            acc = cast[c][j]
            for k in range(1, n):
                acc = rnd(_exact_add(acc, cast[(c + k) % n][j], rounding),
                          child_seed(seed, k, c), j - lo)
            out[j] = acc
    with np.errstate(invalid="ignore"):
        return out / scale, totals


@st.composite
def ring_cases(draw):
    fmt = draw(st.sampled_from([fs.FP32, fs.BF16, fs.FP16, fs.FP8_E4M3, fs.FP8_E5M2,
                                fs.FixedFormat(12, 6)]))
    rounding = draw(st.sampled_from(["nearest_even", "stochastic", "toward_zero"]))
    n = draw(st.integers(1, 5))
    size = draw(st.integers(0, 9))
    top = float(fmt.max) * 0.6  # sums of a few overflow now and then
    elem = st.one_of(st.floats(-top, top), st.floats(-1e-3, 1e-3), st.sampled_from([0.0, -0.0]))
    xs = [np.array(draw(st.lists(elem, min_size=size, max_size=size)), np.float64)
          for _ in range(n)]
    scale = draw(st.sampled_from([1.0, 1.0, 2.0**-4, 2.0**6]))
    return xs, fmt, rounding, draw(st.integers(0, 2**32)), scale


@settings(max_examples=60)
@given(ring_cases())
@example(([np.array([5e-324])], fs.FP32, "nearest_even", 0, 0.0625))  # scaled to 0 in float64
def test_ring_matches_oracle_bit_for_bit(case):
    """The reduced array and every event count equal the oracle's (FP32, BF16, FP16, both FP8,
    fixed point; nearest even, stochastic, toward zero; power-of-two loss scales)."""
    xs, fmt, rounding, seed, scale = case
    got, stats = ring_allreduce(xs, fmt, rounding, seed=seed, scale=scale)
    want, flags = oracle(xs, fmt, rounding, seed=seed, scale=scale)
    assert_same_bits(got, want, f"{fmt} {rounding} N={len(xs)}")
    assert {k: getattr(stats, k) for k in FLAGS} == flags
    n, size = len(xs), xs[0].size
    assert (stats.workers, stats.size, stats.casts, stats.additions) == (n, size, n * size,
                                                                        (n - 1) * size)


def test_float64_ring_is_numpy_addition_in_ring_order():
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((3, 5)) * 10.0 ** rng.integers(-8, 8, (3, 5)) for _ in range(4)]
    got, stats = ring_allreduce(xs, None)
    flat = [x.reshape(-1) for x in xs]
    want = np.empty(15)
    for c, (lo, hi) in enumerate(chunk_bounds(15, 4)):
        acc = flat[c][lo:hi].copy()
        for k in range(1, 4):
            acc = acc + flat[(c + k) % 4][lo:hi]
        want[lo:hi] = acc
    assert_same_bits(got.reshape(-1), want)
    # chunks 4, 4, 4, 3: worker 1 sends chunks 1, 0, 3 then 2, 1, 0: 23 float64 words
    assert stats.casts == 0 and stats.additions == 45 and stats.bytes_per_worker == 23 * 8


def test_one_worker_is_one_rounding_into_the_format():
    x = np.array([0.1, -3.3, 1e-9, 70000.0])
    got, stats = ring_allreduce([x], fs.FP16)
    assert_same_bits(got, fs.quantize(x, fs.FP16))
    assert (stats.casts, stats.additions, stats.overflow, stats.bytes_per_worker) == (4, 0, 1, 0)
    v = fs.quantize(x[:3], fs.BF16)
    assert_same_bits(ring_allreduce([v], fs.BF16)[0], v)  # values of the format: identity


def test_ring_order_matters():
    """Chunk 1 is summed from worker 1 on: the two small terms meet first and survive; a
    left-to-right sum adds each to 1.0 and loses both, and so does the ring with the workers
    in reverse order (1 + 2**-8 ties to 1 in BF16)."""
    small = 2.0**-8
    xs = [np.array([small, 1.0]), np.array([small, small]), np.array([1.0, small])]
    got, _ = ring_allreduce(xs, fs.BF16)
    assert got.tolist() == [1.0078125, 1.0078125]
    left_to_right = fs.add(fs.add(xs[0], xs[1], fs.BF16), xs[2], fs.BF16)
    assert left_to_right.tolist() == [1.0078125, 1.0]
    reverse, _ = ring_allreduce(xs[::-1], fs.BF16)
    assert reverse.tolist() == [1.0, 1.0]
    assert ring_allreduce(xs[::-1], None)[0].tolist() == [1.0078125, 1.0078125]


def test_saturations_are_counted():
    q = fs.FixedFormat(8, 4)  # largest 7.9375
    got, st_ = ring_allreduce([np.full(4, 6.0)] * 3, q)
    assert got.tolist() == [q.max] * 4
    assert st_.overflow == 8 and st_.additions == 8  # 6 + 6 saturates, and max + 6 again
    got, st_ = ring_allreduce([np.array([60000.0, 1.0])] * 2, fs.FP16)
    assert math.isinf(got[0]) and got[1] == 2.0 and st_.overflow == 1
    got, st_ = ring_allreduce([np.array([400.0])] * 2, fs.FP8_E4M3)  # "fn": saturates
    assert got.tolist() == [448.0] and st_.overflow == 1


def test_loss_scale_keeps_small_gradients():
    g = np.array([3e-6, -5e-7, 1e-5])
    plain, st_ = ring_allreduce([g] * 4, fs.FP8_E5M2)
    scaled, st2 = ring_allreduce([g] * 4, fs.FP8_E5M2, scale=2.0**16)
    assert np.abs(scaled - 4 * g).max() < np.abs(plain - 4 * g).max()
    assert st_.underflow > st2.underflow == 0
    assert scaled.dtype == np.float64


def test_bytes_per_worker():
    _, s = ring_allreduce([np.zeros(8)] * 4, fs.BF16)
    assert s.bytes_per_worker == 2 * 3 * 2 * 2  # 2 (N-1) chunks of 2 elements, 2 bytes each
    _, s = ring_allreduce([np.zeros(10)] * 4, fs.BF16)  # chunks 3, 3, 2, 2: worker 1 sends 16
    assert s.bytes_per_worker == 32
    _, s = ring_allreduce([np.zeros(8)] * 2, fs.FixedFormat(12, 6))
    assert s.bytes_per_worker == 2 * 4 * 2  # 12 bits take 2 bytes


def test_stochastic_streams_depend_on_seed_only():
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(50) for _ in range(3)]
    a, _ = ring_allreduce(xs, "Q<12,6>", "stochastic", seed=11)
    b, _ = ring_allreduce(np.stack(xs), "Q<12,6>", "stochastic", seed=11)
    c, _ = ring_allreduce(xs, "Q<12,6>", "stochastic", seed=12)
    assert_same_bits(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("call, match", [
    (lambda: ring_allreduce([], fs.BF16), "at least one worker"),
    (lambda: ring_allreduce([np.zeros(2), np.zeros(3)], fs.BF16), "same shape"),
    (lambda: ring_allreduce([np.zeros(2)], fs.BF16, scale=0.0), "scale must be"),
    (lambda: ring_allreduce([np.zeros(2)], "FP7"), "unknown format"),
    (lambda: ring_allreduce([np.zeros(2)], fs.BF16, overflow="wrap"), "WRAP"),
    (lambda: ring_allreduce([np.zeros(2)], None, "stochastic"), "without a format"),
    (lambda: parse_allreduce("bf17"), r"allreduce 'bf17'.*FORMAT\[:ROUNDING\]"),
    (lambda: parse_allreduce("bf16:sideways"), "rounding"),
    (lambda: parse_allreduce("bf16:scale=-1"), "scale must be"),
    (lambda: parse_allreduce("bf16:speed=2"), "unknown option"),
    (lambda: parse_allreduce("float64:stochastic"), "needs a format"),
    (lambda: parse_allreduce("Q<8,4>:overflow=infinity"), "INFINITY"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_seed():
    with pytest.raises(TypeError, match="seed must be an int"):
        ring_allreduce([np.zeros(2)], fs.BF16, "stochastic", seed=1.5)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        ring_allreduce([np.zeros(2)], fs.BF16, "stochastic", seed=-1)
    with pytest.raises(TypeError, match="real numbers"):
        ring_allreduce([np.array(["a"])], fs.BF16)


def test_parse_allreduce():
    assert parse_allreduce("") is None
    assert parse_allreduce("bf16") == AllReduce(fs.BF16)
    a = parse_allreduce("fp8_e5m2:stochastic:scale=1024:overflow=saturate")
    assert (a.fmt, a.rounding, a.scale, a.overflow) == (fs.FP8_E5M2, fs.Rounding.STOCHASTIC,
                                                        1024.0, fs.Overflow.SATURATE)
    assert parse_allreduce(str(a)) == a
    assert parse_allreduce("float64").fmt is None


def test_worker_contexts_draw_apart():
    p = fs.nn.Policy.float32()
    k = [WorkerContext(p, seed=1, step=3, worker=w).key("0.conv2d", "errors") for w in (0, 1)]
    assert k[0] != k[1] != fs.nn.Context(p, seed=1, step=3).key("0.conv2d", "errors")
    assert k[0] == WorkerContext(p, seed=1, step=3, worker=0).key("0.conv2d", "errors")


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic", "down"])
def test_sums_float64_cannot_hold(rounding):
    """Partial sums that float64 rounds (far-apart exponents) and exact zeros (their sign under
    DOWN) take fs.add; the rest one quantize of the float64 sums: both match the oracle."""
    xs = [np.array([1e38, 0.5, 1.0, -0.0, 3.0]), np.array([1e-38, 2**-30, -1.0, -0.0, 1.0]),
          np.array([-1e38, 0.25, 0.0, 0.0, -4.0])]
    got, stats = ring_allreduce(xs, fs.BF16, rounding, seed=9)
    want, flags = oracle(xs, fs.BF16, rounding, seed=9)
    assert_same_bits(got, want)
    assert {k: getattr(stats, k) for k in FLAGS} == flags


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), stack=st.sampled_from([(), (3,), (2, 2)]),
       seed=st.integers(0, 2**32 - 1))
def test_upper_triangle_packs_row_by_row_and_mirrors_back(n, stack, seed):
    """upper_triangle lists m[i, j] for i <= j row by row (written out here as loops);
    from_upper_triangle puts every value back in both of its places, so a symmetric matrix
    comes back bit for bit."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(stack + (n, n))
    sym = x + np.swapaxes(x, -1, -2)
    t = upper_triangle(sym)
    assert t.shape == stack + (n * (n + 1) // 2,)
    for idx in np.ndindex(*stack):
        want = [sym[idx][i, j] for i in range(n) for j in range(i, n)]
        assert t[idx].tolist() == want
    assert from_upper_triangle(t, n).tobytes() == sym.tobytes()
    back = from_upper_triangle(upper_triangle(x), n)  # an asymmetric matrix: its upper half
    assert np.array_equal(back, np.swapaxes(back, -1, -2))
    assert np.array_equal(np.triu(back), np.triu(x))


def test_upper_triangle_bad_shapes():
    with pytest.raises(ValueError, match="square matrices on the last two axes"):
        upper_triangle(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="square matrices on the last two axes"):
        upper_triangle(np.zeros(4))
    with pytest.raises(ValueError, match=r"n \(n \+ 1\) / 2 = 6 values for n = 3"):
        from_upper_triangle(np.zeros(5), 3)


def test_whole_symmetric_matrices_lose_symmetry_in_a_rounded_ring():
    """Why K-FAC's factors travel as triangles: the ring sums entries (i, j) and (j, i) in
    different chunks, so in different orders, and in BF16 they round apart; the triangle's
    ring, mirrored, is symmetric and rounds the same values of the upper half."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(4):
        a = rng.standard_normal((64, 24))
        parts.append(a.T @ a / 256)
    whole = np.asarray(ring_allreduce(parts, fs.BF16)[0])
    assert np.count_nonzero(whole != whole.T) > 0
    tri, stats = ring_allreduce([upper_triangle(p) for p in parts], fs.BF16)
    sym = from_upper_triangle(np.asarray(tri), 24)
    assert np.array_equal(sym, sym.T)
    assert stats.roundings == 7 * 300  # 4 casts and 3 additions of each of 24 * 25 / 2
