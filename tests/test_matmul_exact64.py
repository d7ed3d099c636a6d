"""The exact_ozaki row (fixedsim.matmul.exact64): correctly rounded float64 dot products on
float64 BLAS, the same bits and the same counts as the general kernel and the Fraction oracle.

Products run through ``fs.matmul(..., path="exact_ozaki")`` against ``path="general"``; the
kernel-level tests and :func:`exact64.declines` take the ``p`` a row of the path table sees
(:func:`product`).
"""

import concurrent.futures
import math
import types
from fractions import Fraction

import numpy as np
import pytest
from helpers import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.compiling import read_only
from fixedsim.counters import Counters
from fixedsim.jit import gemm_exact64 as gz
from fixedsim.matmul import core, exact64
from fixedsim.testing import roundings

NAME = exact64.NAME
DETERMINISTIC = [r for r in fs.Rounding if r is not fs.Rounding.STOCHASTIC]
#: Outputs of 53 and 52 significand bits (the last with a narrow exponent range: its ends are
#: reached by ordinary values, so the fallback at the ends is exercised).
WIDE = [None, fs.FP64, fs.FloatFormat(11, 51), fs.FloatFormat(8, 52)]
#: More formats of 52 and 53 bits: flushing subnormals, no infinities.
WIDE_EDGES = WIDE + [fs.FloatFormat(9, 52, subnormals=False),
                     fs.FloatFormat(10, 51, inf_nan="fn")]


def product(A, B, spec, read=True):
    """The ``p`` a row of the path table sees."""
    A = np.ascontiguousarray(A, np.float64)
    B = np.ascontiguousarray(B, np.float64)
    c = Counters(calls=1)
    c._read = read
    return types.SimpleNamespace(A=A, B=B, spec=spec, ba=core._Bits.of(A), bb=core._Bits.of(B),
                                 keys=np.zeros(5, np.uint64), rb=64, c=c)


def run_row(A, B, spec, read=True):
    """The row's result and counters (None when nothing reads them)."""
    if read:
        return fs.matmul(A, B, spec, stats=True, path=NAME)
    return fs.matmul(A, B, spec, path=NAME), None


def run_general(A, B, spec):
    return fs.matmul(A, B, spec, stats=True, path="general")


def check(A, B, spec, oracle=True):
    """The row's bits and output counts are the general kernel's (and the oracle's), also
    when nothing reads the counts; returns the row's counters."""
    got, c = run_row(A, B, spec)
    unread, _ = run_row(A, B, spec, read=False)
    want, cg = run_general(A, B, spec)
    assert got.dtype == want.dtype == spec.result_format.dtype
    assert_same_bits(got, want, err_msg=f"{spec!r}\nA={A!r}\nB={B!r}")
    assert_same_bits(unread, want)
    for stage in ("input", "product", "accumulator", "output"):
        assert getattr(c, stage) == getattr(cg, stage), (stage, c, cg)
    if oracle:
        assert_same_bits(got, reference.matmul(A, B, spec), err_msg=repr(spec))
    assert c.paths[NAME] == 1
    return c


def general_share(c):
    return c.paths.get(NAME + "_general", 0)


# -- data ----------------------------------------------------------------------------------------
_special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 3.0, 2.0**-53, -(2.0**-53), 2.0**-52,
                            1.0 + 2.0**-52, 2.0**-1074, 2.0**-1022, 1e300, -1e300, 2.0**600])


@st.composite
def matrices(draw, max_k=10, emin=-40, emax=40):
    """Small operands of float64 values over a wide range of exponents, with values that make
    exact sums, ties and cancellations likely."""
    R, K, N = draw(st.integers(1, 3)), draw(st.integers(1, max_k)), draw(st.integers(1, 3))
    scaled = st.builds(math.ldexp, st.floats(-1.0, 1.0, allow_nan=False),
                       st.integers(emin, emax))
    elems = st.one_of(scaled, st.floats(-4.0, 4.0, allow_nan=False), _special)

    def mat(r, c):
        return np.array(draw(st.lists(elems, min_size=r * c, max_size=r * c)),
                        np.float64).reshape(r, c)

    return mat(R, K), mat(K, N)


# -- bit for bit against the general kernel and the oracle ---------------------------------------
@settings(max_examples=40, deadline=None)
@given(matrices(), roundings(include_stochastic=False), st.sampled_from(WIDE_EDGES))
def test_same_bits_and_counts_as_general_and_oracle(ab, rnd, out):
    a, b = ab
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    if exact64.declines(product(a, b, spec)) is None:
        check(a, b, spec)


@settings(max_examples=20, deadline=None)
@given(matrices(max_k=6, emin=-1074, emax=1023), roundings(include_stochastic=False),
       st.sampled_from(WIDE_EDGES))
def test_the_whole_exponent_range(ab, rnd, out):
    """Overflow, underflow, subnormal results (also in formats that flush subnormals or have
    no infinities), rows whose scaling would lose bits: the row leaves those elements to the
    general kernel, whose counts it takes."""
    a, b = ab
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    if exact64.declines(product(a, b, spec)) is None:
        check(a, b, spec)


_TIE = 2.0**-53  # half an ulp of 1


@pytest.mark.parametrize("rnd", DETERMINISTIC, ids=lambda r: r.name)
@pytest.mark.parametrize("out", [None, fs.FloatFormat(11, 51)], ids=repr)
@pytest.mark.parametrize("row, decided", [
    ([1.0, _TIE], "directed"),                  # a float64 tie: directed modes decide it
    ([1.0, 2 * _TIE], False),                   # exact in float64, a tie at 52 bits
    ([1.0, _TIE, _TIE * 2.0**-20], True),       # just above the tie
    ([1.0, _TIE, -_TIE * 2.0**-20], True),      # just below it
    ([1.0, _TIE, _TIE**2], "directed"),         # too close to the tie for the bounds
    ([1.0, -_TIE / 4], True),                   # just below 1 (a binade edge)
    ([3.0, 1.0, -4.0], None),                   # an exact zero sum: +0 (DOWN: -0, general)
    ([1.0, 2.0**-40, -(2.0**-40)], None),       # exactly 1
], ids=str)
def test_ties_exact_sums_and_binade_edges(row, decided, rnd, out):
    a = np.array([row])
    b = np.ones((len(row), 2))
    b[:, 1] = -1.0
    c = check(a, b, fs.MatmulSpec(output=out, output_rounding=rnd))
    if decided == "directed":  # at 52 bits 1 + 2**-53 is no tie, only a float64 value
        decided = not (rnd.is_nearest and out is None)
    if decided is not None:
        assert (general_share(c) == 0) == decided
    if row == [3.0, 1.0, -4.0]:  # cancellation to zero: the row decides it unless DOWN
        assert general_share(c) == (2 if rnd is fs.Rounding.DOWN else 0)


@pytest.mark.parametrize("rnd", DETERMINISTIC, ids=lambda r: r.name)
def test_zero_rows_and_columns(rnd):
    """All products zero (a row of zeros, +0 and -0): +0, or -0 rounding DOWN when a product
    is -0; the row decides +0 itself and leaves DOWN's signs to the general kernel."""
    a = np.array([[0.0, -0.0, 0.0], [1.0, 2.0, 3.0]])
    b = np.array([[1.0, -2.0, 0.0], [-1.0, 2.0, -0.0], [0.5, 1.0, 0.0]])
    c = check(a, b, fs.MatmulSpec(output_rounding=rnd))
    zeros = 4  # row 0 (3 elements) and column 2 of row 1
    assert general_share(c) == (zeros if rnd is fs.Rounding.DOWN else 0)


@pytest.mark.parametrize("rnd", DETERMINISTIC, ids=lambda r: r.name)
@pytest.mark.parametrize("a, b", [
    ([[1e308, 1e308, 1.0]], [[1.0], [1.0], [2.0**-60]]),           # overflow
    ([[2.0**-600, 3 * 2.0**-600]], [[2.0**-500], [2.0**-480]]),    # subnormal sum
    ([[2.0**-600, -(2.0**-600)]], [[2.0**-480], [2.0**-480 * (1 - 2.0**-52)]]),  # underflow
    ([[2.0**1000, 2.0**-1074, 1.5]], [[1.0], [1.0], [2.0**-60]]),  # a row that loses bits
    ([[1.0, 1.0]], [[2.0**1000], [2.0**-1074]]),                   # a column that loses bits
], ids=["overflow", "subnormal", "underflow", "lossy-row", "lossy-column"])
def test_ends_of_the_range_go_to_the_general_kernel(a, b, rnd):
    a, b = np.array(a), np.array(b)
    c = check(a, b, fs.MatmulSpec(output_rounding=rnd))
    assert general_share(c) == a.shape[0] * b.shape[1]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), roundings(include_stochastic=False),
       st.sampled_from([None, fs.FloatFormat(11, 51)]))
def test_float32_data(seed, rnd, out):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((3, 9)).astype(np.float32)
    b = (rng.standard_normal((9, 2)) * 2.0**rng.integers(-30, 30, (9, 2))).astype(np.float32)
    check(a.astype(np.float64), b.astype(np.float64), fs.MatmulSpec(output=out,
                                                                     output_rounding=rnd))


# -- ordinary data: the general kernel is a vanishing share --------------------------------------
def _ordinary(kind, rng, shape):
    x = rng.standard_normal(shape)
    if kind == "uniform":
        return rng.uniform(-1, 1, shape)
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "gradients":
        return x * 1e-7
    if kind == "mixed":
        return x * 10.0 ** rng.integers(-8, 9, shape)
    return x


@pytest.mark.parametrize("kind", ["normal", "uniform", "relu", "gradients", "mixed"])
def test_ordinary_data_needs_no_fallback(kind):
    """Every element decided by the row (none to the general kernel or the oracle); a sample
    of rows checked against the oracle."""
    rng = np.random.default_rng(["normal", "uniform", "relu", "gradients", "mixed"].index(kind))
    a = _ordinary(kind, rng, (40, 300))
    b = _ordinary("normal" if kind == "relu" else kind, rng, (300, 30))
    for rnd in (fs.Rounding.NEAREST_EVEN, fs.Rounding.DOWN):
        spec = fs.MatmulSpec(output_rounding=rnd)
        y, c = run_row(a, b, spec)
        assert general_share(c) == 0 and "reference" not in c.paths
        assert c.output.roundings == c.output.inexact == y.size
        assert_same_bits(y[:2], reference.matmul(a[:2], b, spec))


def test_refinement_decides_small_sums():
    """Sums about 2**-30 of their terms' magnitudes: the first bound cannot decide them, the
    compensated dot product does (nothing goes to the general kernel)."""
    rng = np.random.default_rng(7)
    K = 64
    a = rng.standard_normal((3, K))
    b = rng.standard_normal((K, 3))
    for r in range(3):  # element (r, r): the last product cancels the others but 2**-30
        part = sum(Fraction(a[r, k]) * Fraction(b[k, r]) for k in range(K - 1))
        b[K - 1, r] = float((Fraction(2.0**-30) - part) / Fraction(a[r, K - 1]))
    spec = fs.MatmulSpec()
    p = product(a, b, spec)
    beta = exact64.beta_for(K)
    A1, A12, A2, ta, nA, mA, ea, badA = exact64._split(p.A, beta, 0)
    B1, B12, B2, tb, nB, mB, eb, badB = exact64._split(read_only(p.B.T, np.float64), beta, 1)
    out = np.empty((3, 3))
    fail = np.zeros((3, 3), np.uint8)
    crad = 4.0 * K * 2.0**-53
    n_inexact, n_left = gz.finish(A1 @ B1.T, A12 @ B12.T, A2 @ B2.T, ta @ tb.T, nA, mA, ea,
                                  np.zeros(3), nB, mB, eb, np.zeros(3), beta, crad, True, 0,
                                  -1022, 1023, out, fail)
    rows, cols = np.nonzero(fail)
    assert n_left == rows.size >= 1 and n_inexact == 9 - n_left  # the small sums are left
    assert gz.refine_at(ta, tb, rows, cols, ea, eb, beta, crad, True, 0, -1022, 1023, out,
                        fail) == (n_left, 0)
    assert not fail.any()
    c = check(a, b, spec)
    assert general_share(c) == 0


# -- the pieces of the proof ----------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 2, 3, 75, 128, 512, 1000, 1024, 2**20, 2**40])
def test_beta_keeps_every_slice_sum_below_2_53(K):
    beta = exact64.beta_for(K)
    assert 9 * K * 4**beta <= 2**55 < 9 * K * 4**(beta + 1) or beta == 25
    assert {75: 22, 128: 22, 512: 21, 1024: 20}.get(K, beta) == beta


@settings(max_examples=25, deadline=None)
@given(matrices(max_k=12, emin=-1074, emax=1023), st.sampled_from([1, 20, 22, 25]))
def test_split_is_exact(ab, beta):
    """``x * 2**(beta - e) = a1 + a2 t + r t`` exactly, integers within their bounds, and the
    tails as documented (rows whose scaling loses bits are marked instead)."""
    a = np.ascontiguousarray(ab[0])
    c1, c12, c2, tail, nrm, mx, e, bad = exact64._split(read_only(a, np.float64), beta, 0)
    T = 2**beta
    K = a.shape[1]
    for i in range(a.shape[0]):
        m = np.abs(a[i]).max()
        assert m < 2.0**e[i] and (m == 0 or m >= 2.0**(e[i] - 1))
        assert np.all(np.abs(c1[i]) <= T) and np.all(np.abs(c2[i]) <= T // 2)
        assert np.all(c1[i] == np.round(c1[i])) and np.all(c2[i] == np.round(c2[i]))
        assert np.array_equal(c12[i], c1[i] + c2[i])
        assert mx[i] == np.abs(tail[i, K:]).max() <= 2.0**(-beta - 1)
        lost = False
        for k in range(K):
            u = Fraction(a[i, k]) * Fraction(2)**(beta - int(e[i]))
            rebuilt = Fraction(tail[i, k]) + Fraction(tail[i, K + k])
            assert Fraction(tail[i, k]) == Fraction(c1[i, k]) + Fraction(c2[i, k]) / T
            lost = lost or rebuilt != u
        assert bool(bad[i]) == lost


def test_worst_case_integer_products_are_exact_in_blas():
    """Slices at their largest (``|a1 + a2|`` near ``1.5 T``) over the longest K for the
    slice width: BLAS's float64 result equals the integer product."""
    for K in (1024, 4096):
        beta = exact64.beta_for(K)
        T = 2.0**beta
        u = (T - 2) + 0.5 - 2.0**-beta  # a1 = T - 2, a2 = T/2 - 1
        row = np.full(K, u * 2.0**-beta)  # row max < 1, e = 0
        a1, a12, a2, *_ = exact64._split(read_only(np.stack([row, -row]), np.float64), beta, 0)
        assert a12[0, 0] == 1.5 * T - 3
        got = a12 @ a12.T
        want = a12.astype(np.int64) @ a12.astype(np.int64).T
        assert np.abs(want).max() <= 2**53 and np.array_equal(got, want)


@pytest.mark.parametrize("rnd", [fs.Rounding.NEAREST_EVEN, fs.Rounding.UP], ids=str)
def test_blocks_of_rows_give_the_same_bits(monkeypatch, rnd):
    """A in blocks of rows (as large operands run): the same bits and counts as one block,
    with blocks that need a tail product and blocks that do not (integer rows), a zero row
    and a row that goes to the general kernel (its scaling loses bits)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((23, 40))
    a[5:12] = np.round(a[5:12] * 8)  # rows of small integers: no tail of A there
    a[13] = 0.0
    a[17, :2] = [2.0**1000, 2.0**-1074]
    b = rng.standard_normal((40, 9))
    spec = fs.MatmulSpec(output_rounding=rnd)
    one, c1 = run_row(a, b, spec)
    monkeypatch.setattr(exact64, "_BLOCK_VALUES", 5 * 40 + 4 * 9)  # one row per block
    blocks, cb = run_row(a, b, spec)
    monkeypatch.setattr(exact64, "_BLOCK_VALUES", 6 * (5 * 40 + 4 * 9))  # six rows per block
    six, c6 = run_row(a, b, spec)
    assert_same_bits(blocks, one)
    assert_same_bits(six, one)
    assert c1.output == cb.output == c6.output
    assert c1.paths == cb.paths == c6.paths
    assert general_share(c1) >= 9  # row 17; an exact sum or tie of the integer rows may add
    check(a[[0, 13, 17]], b, spec)


def test_work_space_kept_or_fresh_and_per_thread(monkeypatch):
    """The bits do not depend on the work space: a thread's kept buffer reused across shapes,
    fresh arrays for calls too large to keep, smaller blocks to fit it, and two threads
    running at once (each its own buffer)."""
    rng = np.random.default_rng(11)
    cases = [(rng.standard_normal((300, 20)), rng.standard_normal((20, 10))),
             (rng.standard_normal((5, 9)) * 1e-200, rng.standard_normal((9, 4)) * 1e150)]
    spec = fs.MatmulSpec()
    want = [run_row(a, b, spec)[0] for a, b in cases]
    for a, b in cases[::-1] + cases:  # shapes change under a kept buffer
        assert_same_bits(run_row(a, b, spec)[0], want[[x is a for x, _ in cases].index(True)])
    monkeypatch.setattr(exact64, "_KEEP_VALUES", 6 * 20 * 10 + 150 * (5 * 20 + 4 * 10))
    exact64._scratch.buf = None
    assert_same_bits(run_row(*cases[0], spec)[0], want[0])  # blocks of 150 rows to fit
    assert exact64._scratch.buf.size == exact64._KEEP_VALUES
    monkeypatch.setattr(exact64, "_KEEP_VALUES", 10)
    assert_same_bits(run_row(*cases[0], spec)[0], want[0])  # fresh arrays
    monkeypatch.undo()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_row, a, b, spec) for _ in range(4) for a, b in cases]
        for i, fut in enumerate(futures):
            assert_same_bits(fut.result()[0], want[i % 2])
    assert_same_bits(want[1], reference.matmul(*cases[1], spec))


# -- when the row applies ------------------------------------------------------------------------
@pytest.mark.parametrize("spec, a, b, why", [
    (fs.MatmulSpec(product=fs.FP32), None, None, "products are rounded"),
    (fs.MatmulSpec(accumulator=fs.FP32), None, None, "there is an accumulator"),
    (fs.MatmulSpec(output=fs.FixedFormat(16, 8)), None, None, "not a float format"),
    (fs.MatmulSpec(output=fs.FP32), None, None, "at most 50 fraction bits"),
    (fs.MatmulSpec(output=fs.FloatFormat(11, 50)), None, None, "at most 50 fraction bits"),
    (fs.MatmulSpec(output_rounding="stochastic", seed=1), None, None, "stochastic"),
    (fs.MatmulSpec(), [[np.inf, 1.0]], None, "infinity or a NaN"),
    (fs.MatmulSpec(), None, [[np.nan], [1.0]], "infinity or a NaN"),
    (fs.MatmulSpec(), np.ones((0, 2)), None, "empty"),
    (fs.MatmulSpec(), np.ones((1, 0)), np.ones((0, 1)), "empty"),
    (fs.MatmulSpec(), [[0.0, -0.0]], None, "all zeros"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_declines_with_the_rule(spec, a, b, why):
    a = np.array([[1.5, 2.0**-60]]) if a is None else np.array(a, np.float64)
    b = np.array([[1.0], [3.0]]) if b is None else np.array(b, np.float64)
    reason = exact64.declines(product(a, b, spec))
    assert reason is not None and why in reason


@pytest.mark.parametrize("out", WIDE, ids=repr)
def test_applies_to_wide_outputs_in_every_deterministic_mode(out):
    a, b = np.array([[1.5, 2.0**-60]]), np.array([[1.0], [3.0]])
    for rnd in DETERMINISTIC:
        assert exact64.declines(product(a, b, fs.MatmulSpec(output=out,
                                                            output_rounding=rnd))) is None
