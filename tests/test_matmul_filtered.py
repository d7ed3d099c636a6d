"""The ``exact_filtered`` row (fixedsim.matmul.filtered): exact sums rounded once into a float
output. Its bits equal the general kernel's and the Fraction oracle's, its output counts the
general kernel's, with the counts read or not, on one Numba thread or two.

The row runs through ``fs.matmul(..., path="exact_filtered")`` against ``path="general"``;
tests of its internals (its kernel, a product's ``mm``) call ``run(p)`` on a product ``p``
built here (``make``) as the path table builds it.
"""

import contextlib
import types

import numba
import numpy as np
import pytest
from helpers import assert_same_bits
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.jit import gemm_filtered as gk
from fixedsim.matmul import core, filtered

DETERMINISTIC = [r for r in fs.Rounding if r is not fs.Rounding.STOCHASTIC]
FTZ16 = fs.FloatFormat(5, 10, subnormals=False)
#: float32-container outputs (one compiled kernel); the float64-container one is tested apart
OUTPUTS = [fs.FP32, fs.TF32, fs.BF16, fs.FP16, fs.FP8_E4M3, fs.FP8_E5M2, FTZ16]
WIDE = fs.FloatFormat(9, 40)  # float64 container


def make(a, b, spec, read, seed=3):
    """The product ``p`` a row of the path table sees (inputs quantized, operands scanned)."""
    spec, keys, rb, c = core._setup("matmul", spec, seed, read)
    A = core._quantize_input(np.asarray(a), spec.input, spec.input_rounding, rb, keys[0],
                             c.input)
    B = core._quantize_input(np.asarray(b), spec.input, spec.input_rounding, rb, keys[1],
                             c.input)
    return types.SimpleNamespace(A=A, B=B, spec=spec, ba=core._Bits.of(A), bb=core._Bits.of(B),
                                 keys=keys, rb=rb, c=c)


def run_row(a, b, spec, read=True):
    """The row's result and counts: ``matmul(..., stats=True)`` when ``read``; else the row run
    on a product whose counts nobody reads, to look at them."""
    if read:
        return fs.matmul(a, b, spec, stats=True, path=filtered.NAME)
    p = make(a, b, spec, False)  # unread counts: the row itself, to see them
    assert filtered.declines(p) is None
    return filtered.run(p), p.c


def same_as_general(a, b, spec):
    """The row's bits (counts read and unread) and output counts equal the general kernel's;
    returns the row's paths."""
    got, c = run_row(a, b, spec)
    unread = fs.matmul(a, b, spec, path=filtered.NAME)
    want, cw = fs.matmul(a, b, spec, stats=True, path="general")
    assert got.dtype == unread.dtype == want.dtype == spec.output.dtype
    assert_same_bits(got.astype(np.float64), want.astype(np.float64), err_msg=repr(spec))
    assert_same_bits(unread.astype(np.float64), want.astype(np.float64), err_msg=repr(spec))
    assert c.output == cw.output, (c.output, cw.output)
    return c.paths


@contextlib.contextmanager
def certify(on=True):
    """Dot2's exactness certificate for any number of second-stage elements (``on``), or the
    row's default (from ``filtered._CERTIFY_FROM`` elements)."""
    old = filtered._CERTIFY_FROM
    filtered._CERTIFY_FROM = 0 if on else old
    try:
        yield
    finally:
        filtered._CERTIFY_FROM = old


@contextlib.contextmanager
def flipped(on=True):
    """Every product filtered transposed (``on``; where ``A @ B`` is summed in one call or by
    an ``mm``), or none."""
    old = filtered._FLIP_BELOW, filtered._FLIP_RATIO
    filtered._FLIP_BELOW, filtered._FLIP_RATIO = (2**62, 0) if on else (0, 0)
    try:
        yield
    finally:
        filtered._FLIP_BELOW, filtered._FLIP_RATIO = old


def same_as_oracle(a, b, spec):
    got, _ = run_row(a, b, spec)
    want = reference.matmul(np.asarray(a), np.asarray(b), spec)
    assert_same_bits(got.astype(np.float64), want, err_msg=f"{spec!r}\na={a!r}\nb={b!r}")


# -- data ----------------------------------------------------------------------------------------
F32_SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0**-24, 3 * 2.0**-25, 1.0 + 2.0**-23, 0.5 + 2.0**-24,
               2.0**-149, 2.0**-126, 3 * 2.0**-127, float(np.finfo(np.float32).max), 2.0**64,
               2.0**-64, 2.0**100, -(2.0**-100), 1.0 / 3.0, 65504.0, 65520.0, 448.0, 464.0]


@st.composite
def f32_matrices(draw, max_k=12):
    """float32 data for exact sums: any float32, few-bit values on nearby scales (ties and exact
    results), small integers, scales whose sums are subnormal, underflow or overflow in the
    output formats, and a row that cancels to an exact zero."""
    m, k, n = draw(st.integers(1, 3)), draw(st.integers(1, max_k)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["any", "ties", "ints", "scaled"]))
    if kind == "any":
        elems = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                          st.floats(-4.0, 4.0, width=32), st.sampled_from(F32_SPECIAL))
    elif kind == "ties":
        elems = st.builds(lambda sg, m, e: sg * m * 2.0**e, st.sampled_from([1.0, -1.0]),
                          st.sampled_from([1.0, 3.0, 0.75, 1.0 + 2.0**-23, 1.0 - 2.0**-24]),
                          st.sampled_from([0, -1, -4, -8, -11, -12, -24, -25, -60]))
    elif kind == "ints":
        elems = st.one_of(st.integers(-8, 8).map(float), st.sampled_from([2.0**-70, 2.0**40]))
    else:
        e = draw(st.sampled_from([-80, -70, -62, -20, -14, -9, 4, 7, 8, 14, 60, 63]))
        elems = st.builds(lambda v: v * 2.0**e, st.floats(-2.0, 2.0, width=32))

    def mat(r, c):
        vals = draw(st.lists(elems, min_size=r * c, max_size=r * c))
        return np.array(vals, dtype=np.float64).astype(np.float32).reshape(r, c)

    a, b = mat(m, k), mat(k, n)
    if draw(st.booleans()):  # a row that cancels to an exact zero
        h = k // 2
        a[0] = np.concatenate([a[0, :h], -a[0, :h], a[0, 2 * h:] * 0])
        b[: 2 * h] = np.concatenate([b[:h], b[:h]])
    if not (a.any() and b.any()):  # an all-zero operand is another row's (zero_products)
        a[0, 0] = b[0, 0] = 1.0
    return a, b


# -- every element, every count -----------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(st.sampled_from(DETERMINISTIC), st.sampled_from(OUTPUTS), f32_matrices(), st.booleans(),
       st.booleans())
def test_matches_general_kernel_and_oracle(rnd, out, ab, cert, flip):
    """Bits (counts read and unread) and output counts equal the general kernel's; bits the
    oracle's; with Dot2's exactness certificate or without (few elements); filtered as it is
    or transposed."""
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    with certify(cert), flipped(flip):
        paths = same_as_general(*ab, spec)
        assert set(paths) <= {"exact_filtered", "exact_filtered_general", "reference"}, paths
        same_as_oracle(*ab, spec)


@contextlib.contextmanager
def chunks(size, start=1):
    """``A @ B`` summed in chunks of at most ``size`` columns from ``K = start`` on."""
    old = filtered._CHUNK_FROM, filtered._CHUNK
    filtered._CHUNK_FROM, filtered._CHUNK = start, size
    try:
        yield
    finally:
        filtered._CHUNK_FROM, filtered._CHUNK = old


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(DETERMINISTIC), st.sampled_from(OUTPUTS), f32_matrices(),
       st.integers(1, 5))
def test_chunked_sums_match_general_kernel_and_oracle(rnd, out, ab, size):
    """``A @ B`` summed in chunks (long ``K``; here chunks of 1 to 5 columns on short ones):
    the bits and counts are still the general kernel's and the oracle's."""
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    with chunks(size):
        same_as_general(*ab, spec)
        same_as_oracle(*ab, spec)


def test_chunked_sum_and_its_bound():
    """The chunked sum is the sum of the full chunks' BLAS products plus the last chunk's,
    and ``d`` counts the additions a product can pass through: ``k_c`` in its chunk, ``n_c``
    after it."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 10)), rng.standard_normal((10, 2))
    with chunks(4):
        S, d = filtered._chunked(a, b)
    want = a[:, :4] @ b[:4]  # n_c = 2 chunks of k_c = 4 columns, then the last 2
    want += a[:, 4:8] @ b[4:8]
    want += a[:, 8:] @ b[8:]
    assert_same_bits(S, want)
    assert d == 4 + 2 + 1


@contextlib.contextmanager
def zero_pairs(on=True):
    """The nonzero-pair count for the zero sums always (``on``) or never."""
    old = filtered._ZERO_MASKS
    filtered._ZERO_MASKS = 2**40 if on else 0
    try:
        yield
    finally:
        filtered._ZERO_MASKS = old


@st.composite
def disjoint_supports(draw):
    """Sparse float32 operands whose sums often meet no nonzero pair (ReLU-like zeros, signed
    zeros among them), with cancellations to zero beside them."""
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 10)), draw(st.integers(1, 4))
    elems = st.one_of(st.sampled_from([0.0, -0.0, 0.0]), st.floats(-4.0, 4.0, width=32),
                      st.sampled_from([1.0, -1.0, 2.0**-24, 3.0]))
    a = np.array(draw(st.lists(elems, min_size=m * k, max_size=m * k)), np.float32)
    b = np.array(draw(st.lists(elems, min_size=k * n, max_size=k * n)), np.float32)
    a, b = a.reshape(m, k), b.reshape(k, n)
    a[0, 0] = a[0, 0] or 1.0  # an all-zero operand is another row's (zero_products)
    b[-1, -1] = b[-1, -1] or 2.0
    return a, b


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DETERMINISTIC), st.sampled_from([fs.FP32, fs.BF16, fs.FP8_E4M3]),
       disjoint_supports())
def test_sums_of_zero_products_found_by_their_pairs(rnd, out, ab):
    """Zero sums checked for nonzero pairs (forced here): bits and counts are still the
    general kernel's and the oracle's, DOWN (whose zero signs depend on the products')
    included, which keeps the second look."""
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    with zero_pairs():
        same_as_general(*ab, spec)
        same_as_oracle(*ab, spec)


def _zero_sums(A, B, S, marked, every=2**40):
    """:func:`zero_sums` on the marked elements ``marked`` (a list of ``(r, j)``): ``(out,
    fail, counts, marks, dropped)``, ``out`` NaN where nothing was written."""
    R, N = S.shape
    out = np.full((R, N), np.nan, np.float32)
    fail = np.zeros((R, N), np.uint8)
    counts = np.zeros((R, gk.N_C), np.int64)
    marks = np.full((R, filtered._MARKS), -1, np.int64)
    for r, j in sorted(marked):  # as the filter lists them: row by row, in column order
        fail[r, j] = 1
        marks[r, counts[r, gk.C_MARKED]] = j
        counts[r, gk.C_MARKED] += 1
    dropped = gk.zero_sums(S, np.ascontiguousarray(A, np.float64),
                           np.ascontiguousarray(B, np.float64), out, fail, counts, marks, every)
    return out, fail, counts, marks, dropped


def test_zero_products_and_a_cancellation():
    """A row meeting no nonzero pair is +0 without a second look; a sum that cancels to zero
    (two nonzero pairs) stays marked, and is an exact +0 too; a row whose one pair gives a
    value stays as it is; the counts and the marks follow."""
    a = np.array([[0.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, -3.0],
                  [1.0, 2.0**-80, -1.0]], np.float32)
    b = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    S = a.astype(np.float64) @ b.astype(np.float64)
    marked = [(0, 0), (0, 1), (1, 1), (2, 0), (1, 0)]
    out, fail, counts, marks, dropped = _zero_sums(a, b, S, marked)
    assert dropped == 2
    assert out[0, 0] == 0 and not np.signbit(out[0, 0]) and out[2, 0] == 0
    assert np.isnan(out[1]).all() and fail[1].tolist() == [1, 1] and np.isnan(out[0, 1])
    assert fail[0].tolist() == [0, 1] and fail[2, 0] == 0
    assert counts[:, gk.C_MARKED].tolist() == [1, 2, 0, 0]
    assert marks[0, 0] == 1  # the row's marks rebuilt: its one marked column left
    # (1 + 2**-80) - 1 = 0 in float64, but 2**-80 exactly: three pairs, left to be seen
    S3 = np.zeros((4, 2))
    out, fail, counts, _, dropped = _zero_sums(a, np.ones((3, 2), np.float32), S3, [(3, 1)])
    assert dropped == 0 and fail[3, 1] == 1 and np.isnan(out[3, 1])
    # as if the masks cost more than the second look: nothing is unmarked
    out, fail, _, _, dropped = _zero_sums(a, b, S, marked, every=0)
    assert dropped == 0 and fail.sum() == 5 and np.isnan(out).all()


def test_zero_products_over_many_words():
    """K beyond one 64-bit word: a pair in the last word alone is found, so is one in the
    first word alone, and a sum meeting none in any word is +0."""
    K = 150
    a = np.zeros((3, K), np.float32)
    b = np.zeros((K, 1), np.float32)
    a[0, 149] = 1.0  # meets b at 149 only: the third word
    a[1, 3] = 1.0  # meets b at 3: the first word
    a[2, 100] = 1.0  # meets nothing
    b[149, 0] = b[3, 0] = -2.0
    b[64, 0] = 5.0
    S = np.zeros((3, 1))  # as if every sum were zero
    out, fail, _, _, dropped = _zero_sums(a, b, S, [(0, 0), (1, 0), (2, 0)])
    assert dropped == 1 and fail[:, 0].tolist() == [1, 1, 0] and out[2, 0] == 0.0


@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("side", [1.0, -1.0])
def test_a_chunked_error_as_large_as_its_bound(read, side, monkeypatch):
    """A chunked sum off by as much as ``gamma(d) * sum|a_k b_k|`` (``d = k_c + n_c + 1 = 5``
    for chunks of 2 over K = 4; the test takes 4), on the other side of an FP32 midpoint than
    the exact sum, 2**-51 from it: the filter must not decide there; the result is the
    oracle's."""
    a = np.array([[1.0, 2.0**-24, side * 2.0**-80, 0.0]], np.float32)
    b = np.array([[1.0], [1.0], [1.0], [0.0]], np.float32)
    spec = fs.MatmulSpec(output=fs.FP32)
    s = 1.0 + 2.0**-24 - side * 2.0**-51  # the exact sum is 1 + 2**-24 + side * 2**-80
    gamma = 4 * 2.0**-53 / (1 - 4 * 2.0**-53)
    assert 2.0**-51 + 2.0**-80 <= gamma * (1.0 + 2.0**-24)  # |s - exact| within the bound
    with chunks(2):
        p = make(a, b, spec, read)
        assert filtered._chunked(p.A, p.B)[1] == 5
        monkeypatch.setattr(filtered, "_chunked", lambda A, B: (np.array([[s]]), 4))
        out = filtered.run(p)
    assert_same_bits(out.astype(np.float64), reference.matmul(a, b, spec))


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(DETERMINISTIC), f32_matrices(max_k=6))
def test_float64_container_output(rnd, ab):
    """A format whose values need float64 (40 fraction bits): the same kernel, float64 out."""
    spec = fs.MatmulSpec(output=WIDE, output_rounding=rnd)
    same_as_general(*ab, spec)
    same_as_oracle(*ab, spec)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([fs.FP16, fs.BF16]), st.sampled_from([fs.FP32, fs.BF16, fs.FP8_E4M3]),
       st.sampled_from(DETERMINISTIC), st.integers(0, 2**32 - 1))
def test_fp16_bf16_data(inp, out, rnd, seed):
    """FP16/BF16 inputs (spec.input), wide value ranges, so that exact_blas does not apply:
    many sums are exact values of the output (decided unread, recomputed when counted)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((5, 24)) * 2.0 ** rng.integers(-20, 8, (5, 24))
    b = rng.standard_normal((24, 4))
    spec = fs.MatmulSpec(input=inp, output=out, output_rounding=rnd)
    with certify(seed % 2 == 0):
        same_as_general(a, b, spec)


@pytest.mark.parametrize("rnd", DETERMINISTIC)
@pytest.mark.parametrize("out", [fs.FP32, fs.BF16, fs.FP16, fs.FP8_E4M3])
def test_ordinary_data_matches_general(rnd, out):
    """Normal float32 data, K = 64: nearly every element decided by the first filter."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((7, 64)).astype(np.float32)
    b = rng.standard_normal((64, 6)).astype(np.float32)
    assert same_as_general(a, b, fs.MatmulSpec(output=out, output_rounding=rnd)) == \
        {"exact_filtered": 1}


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("cert", [False, True])
@pytest.mark.parametrize("rnd", DETERMINISTIC)
@pytest.mark.parametrize("out", [fs.FP32, fs.FP16, fs.BF16, fs.FP8_E5M2])
def test_undecided_elements_are_recomputed(rnd, out, cert, flip):
    """Exact ties and exact values of the output, all-zero products (signed zeros), a sum that
    cancels (-0 under DOWN), overflow, sums beyond the vectorised filter's range: each equals
    the general kernel. With the certificate, the compensated sum finds the ties, the exact
    values and the cancellation exactly (every step exact), and only sums it does not get
    exactly and that lie within its error bound of a boundary go to the general kernel: row
    1's two, 2**-60 off a tie, and row 7's first, 2**-100 above 2**60 (a boundary when the
    counts are read). Without it (few elements, the default), the ties and exact values go
    there too. Filtered as it is or transposed."""
    m = out.man_bits
    big = float(np.float32(out.max))
    a = np.array([[1.0, 2.0**-(m + 1), 0.0, 0.0],  # a tie of the output format
                  [1.0, 2.0**-(m + 1), 2.0**-60, 0.0],  # just above the tie
                  [3.0, 5.0, 0.0, 0.0],  # an exact small integer
                  [-0.0, 0.0, -0.0, 0.0],  # all products zero
                  [1.0 / 3.0, -1.0 / 3.0, 0.0, 0.0],  # cancels to an exact zero
                  [big, big, 0.0, 0.0],  # overflows
                  [2.0**-100, 2.0**-90, 0.0, 0.0],  # far below every format's subnormals
                  [2.0**-100, 0.0, 0.0, 2.0**60]], np.float32)  # a wide span: no exact_blas
    b = np.array([[1.0, -1.0, 0.0],
                  [1.0, -1.0, -0.0],
                  [1.0, 1.0, 2.0**-24],
                  [1.0, -0.0, 3.0]], np.float32)
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    with certify(cert), flipped(flip):
        paths = same_as_general(a, b, spec)
        same_as_oracle(a, b, spec)
    general = paths.get("exact_filtered_general", 0)
    assert paths["exact_filtered"] == 1 and (general <= 3 if cert else general >= 4), paths


def test_rows_with_many_marks():
    """Rows with more undecided elements than the kernel lists (exact integer sums, counted):
    every one is found and summed exactly by the compensated sum."""
    rng = np.random.default_rng(5)
    a = rng.integers(-3, 4, (3, 30)).astype(np.float32)
    b = rng.integers(-3, 4, (30, 40)).astype(np.float32)
    a[1] *= 2.0**-30  # one row of sums inexact in FP16: decided
    spec = fs.MatmulSpec(output=fs.FP16)
    p = make(a, b, spec, True)
    marked = []
    orig = filtered._second_stage
    try:
        filtered._second_stage = lambda A, B, S, p, fr, *rest: (marked.append(fr.size),
                                                                orig(A, B, S, p, fr, *rest))[1]
        filtered.run(p)
    finally:
        filtered._second_stage = orig
    assert marked[0] >= 2 * 40 - 10  # rows 0 and 2 nearly whole: beyond the 16 listed
    assert same_as_general(a, b, spec) == {"exact_filtered": 1}


@pytest.mark.parametrize("full_rows", [0, 1, 2, 3, 5])
def test_marked_elements_listed_whichever_rows_overflow(full_rows):
    """The marked elements, from the kernel's first marks of each row and ``fail``: every one
    once, whether no row, a few or most rows have more than the kernel lists."""
    rng = np.random.default_rng(full_rows)
    R, N = 5, 60
    fail = np.zeros((R, N), np.uint8)
    for r in range(R):
        k = rng.integers(filtered._MARKS + 1, N) if r < full_rows else rng.integers(0, 10)
        fail[r, rng.choice(N, k, replace=False)] = 1
    per_row = fail.sum(axis=1).astype(np.int64)
    marks = np.full((R, filtered._MARKS), -1, np.int64)
    for r in range(R):
        cols = np.flatnonzero(fail[r])[:filtered._MARKS]
        marks[r, :cols.size] = cols
    fr, fj = filtered._marked(per_row, marks, fail)
    got = sorted(zip(fr.tolist(), fj.tolist(), strict=True))
    assert got == sorted(zip(*(v.tolist() for v in np.nonzero(fail)), strict=True))


@pytest.mark.parametrize("shape, flips", [((40, 7, 8), True), ((40, 7, 64), False),
                                           ((15, 7, 8), False), ((16, 7, 8), True)])
def test_narrow_products_filtered_transposed(shape, flips, monkeypatch):
    """A product with fewer than 64 columns and at least twice as many rows is filtered on
    ``S.T`` (the filter sees ``N`` rows), with the bits and counts of the general kernel."""
    R, K, N = shape
    rng = np.random.default_rng(R + N)
    a = rng.standard_normal((R, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    a[3] = 0.0  # a zero row: a zero column of S.T
    a[5, :3] = [1.0, 2.0**-24, 0.0]
    b[:3, 1] = [1.0, 1.0, 1.0]  # ... and a sum on an FP32 midpoint (a second look)
    a[5, 3:] = b[3:, 1] = 0.0
    seen = []
    real = gk.filter_round
    monkeypatch.setattr(gk, "filter_round", lambda S, *rest: (seen.append(S.shape),
                                                               real(S, *rest))[1])
    same_as_general(a, b, fs.MatmulSpec(output=fs.FP32))
    assert seen and set(seen) == {(N, R) if flips else (R, N)}


def test_exact_values_decided_when_unread():
    """To nearest with nobody reading the counts, a sum that is exactly a value of the format
    is decided by the first filter (only midpoints decide there); counted, it is marked, and
    the general kernel sums it (the default for few elements), or the compensated sum finds it
    exact (every step exact: the certificate)."""
    a = np.array([[3.0, 5.0, 2.0**-30]], np.float32)
    b = np.array([[1.0], [1.0], [2.0**-30]], np.float32)  # 8 + 2**-60: FP16 rounds it to 8
    spec = fs.MatmulSpec(output=fs.FP16)
    unread, c = run_row(a, b, spec, read=False)
    assert unread[0, 0] == 8.0 and "exact_filtered_general" not in c.paths
    assert c.output == fs.counters.StageCounts(roundings=1)  # unread: no events counted
    a[0, 2] = 0.0  # exactly 8: a bound cannot tell it from 8 +- tiny
    read, c = run_row(a, b, spec)
    assert read[0, 0] == 8.0 and c.paths == {"exact_filtered": 1, "exact_filtered_general": 1}
    assert c.output == fs.counters.StageCounts(roundings=1)  # exact: not inexact
    with certify():
        read, c = run_row(a, b, spec)
    assert read[0, 0] == 8.0 and c.paths == {"exact_filtered": 1}
    assert c.output == fs.counters.StageCounts(roundings=1)


def test_extreme_scales_skip_the_norms():
    """Operands whose squares leave float64's normal range: every element is filtered on its
    compensated sum (no norm-based bound), still bit for bit."""
    a = np.array([[2.0**-100, 3.0 * 2.0**-101], [1.0, 2.0**-110]], np.float32) * 2.0**-20
    b = np.array([[2.0**-100, 1.0], [5.0, 2.0**-90]], np.float32)
    for out in (fs.FP32, fs.FP8_E4M3):
        same_as_general(a, b, fs.MatmulSpec(output=out))
        same_as_oracle(a, b, fs.MatmulSpec(output=out))


def test_parallel_filter_same_bits_and_counts(monkeypatch):
    """The filter runs on all Numba threads above ``_SERIAL`` elements: same bits and counts on
    one thread and on two."""
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((40, 50)) * 2.0 ** rng.integers(-14, 4, (40, 50))).astype(
        np.float32)
    b = rng.standard_normal((50, 30)).astype(np.float32)
    spec = fs.MatmulSpec(output=fs.FP8_E4M3, output_rounding="toward_zero")
    monkeypatch.setattr(filtered, "_SERIAL", 1)
    threads = numba.get_num_threads()
    results = []
    try:
        for t in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(t)
            results.append(run_row(a, b, spec))
    finally:
        numba.set_num_threads(threads)
    for out, c in results[1:]:
        assert_same_bits(out.astype(np.float64), results[0][0].astype(np.float64))
        assert c.output == results[0][1].output
    assert numba.get_num_threads() == threads
    same_as_general(a, b, spec)


@pytest.mark.parametrize("flip", [False, True])
def test_mm_replaces_the_product(flip):
    """A product's ``mm`` (another summation order of the same exact products, as a
    convolution's or a reuse layer's) is used instead of ``A @ B``, filtered as it is or
    transposed."""
    rng = np.random.default_rng(8)
    a = rng.standard_normal((6, 20)).astype(np.float32)
    b = rng.standard_normal((20, 5)).astype(np.float32)
    spec = fs.MatmulSpec(output=fs.BF16)
    p = make(a, b, spec, True)
    calls = []

    def mm(scale, Bs, k0, k1):
        calls.append((scale, k0, k1))
        return p.A[:, k0:10] @ Bs[k0:10] + p.A[:, 10:k1] @ Bs[10:k1]  # two halves summed
    p.mm = mm
    with flipped(flip):
        out = filtered.run(p)
    assert calls == [(0, 0, 20)]
    assert_same_bits(out.astype(np.float64), reference.matmul(a, b, spec))


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("side", [1.0, -1.0])
def test_a_blas_error_as_large_as_the_bound(read, side, flip):
    """A product ``mm`` off by as much as ``gamma(K) * sum|a_k b_k|`` (what a BLAS may do;
    K = 4), on the other side of an FP32 midpoint than the exact sum, 2**-51 from it: the
    filter must not decide there (a bound 0.58 times as large would, wrongly); the result is
    the oracle's."""
    a = np.array([[1.0, 2.0**-24, side * 2.0**-80, 0.0]], np.float32)
    b = np.array([[1.0], [1.0], [1.0], [0.0]], np.float32)
    spec = fs.MatmulSpec(output=fs.FP32)
    p = make(a, b, spec, read)
    s = 1.0 + 2.0**-24 - side * 2.0**-51  # the exact sum is 1 + 2**-24 + side * 2**-80
    p.mm = lambda scale, Bs, k0, k1: np.array([[s]])
    gamma = 4 * 2.0**-53 / (1 - 4 * 2.0**-53)
    assert 2.0**-51 + 2.0**-80 <= gamma * (1.0 + 2.0**-24)  # |s - exact| within the bound
    with flipped(flip):
        out = filtered.run(p)
    assert_same_bits(out.astype(np.float64), reference.matmul(a, b, spec))


def test_conv2d_through_matmul_table():
    """conv2d's products take this row when the table holds it (any row: same bits)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    spec = fs.MatmulSpec(output=fs.FP16)
    got = fs.conv2d(x, w, spec, padding=1)
    cols = np.stack([np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))[0, :, i:i + 3, j:j + 3]
                     .reshape(-1) for i in range(5) for j in range(5)])
    assert_same_bits(got.reshape(3, 25).T.astype(np.float64),
                     reference.matmul(cols, w.reshape(3, -1).T, spec))


# -- when the row declines, and why ----------------------------------------------------------------
A32 = np.array([[1.5, -2.25], [0.5, 3.0]], np.float32)


@pytest.mark.parametrize("spec, a, b, reason", [
    (fs.MatmulSpec(product=fs.FP16, output=fs.FP16), A32, A32, r"products are rounded"),
    (fs.MatmulSpec(output=fs.FP16), np.array([[np.inf, 1.0]]), A32, r"infinity or a NaN"),
    (fs.MatmulSpec(accumulator=fs.FP32, output=fs.FP16), A32, A32, r"an accumulator"),
    (fs.MatmulSpec(output=fs.FixedFormat(16, 8)), A32, A32, r"not a float format"),
    (fs.MatmulSpec(), A32, A32, r"not a float format"),
    (fs.MatmulSpec(output=fs.FloatFormat(11, 51)), A32, A32, r"too wide"),
    (fs.MatmulSpec(output=fs.FP16, output_rounding="stochastic", seed=1), A32, A32,
     r"stochastic"),
    (fs.MatmulSpec(output=fs.FP16), np.zeros((2, 0)), np.zeros((0, 2)), r"empty"),
    (fs.MatmulSpec(output=fs.FP16), np.zeros((2, 2)), A32, r"all zeros"),
    (fs.MatmulSpec(output=fs.FP16), np.array([[1.0 + 2.0**-40, 1.0]]), np.array(
        [[1.0 + 2.0**-20], [1.0]]), r"more than 53 significant bits"),
    (fs.MatmulSpec(output=fs.FP16), np.array([[2.0**-1000, 1.0]]), A32, r"range"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_declines(spec, a, b, reason):
    """Each condition of the row, as ``matmul(..., path=...)`` states it."""
    with pytest.raises(ValueError, match="path 'exact_filtered' does not apply: .*" + reason):
        fs.matmul(a, b, spec, path=filtered.NAME)


def test_declines_is_cheap_with_a_lazy_operand():
    """``declines`` reads the shapes from ``p.R`` when the table gives it (``A`` built later)."""
    p = make(A32, A32, fs.MatmulSpec(output=fs.FP16), True)
    lazy = types.SimpleNamespace(**{k: v for k, v in vars(p).items() if k != "A"}, R=2)
    assert filtered.declines(lazy) is None


@st.composite
def near_boundaries(draw):
    """``(fmt, rounding, relax, s, e)``: a sum ``s`` near a value or a midpoint of ``fmt``
    (normal, subnormal, beyond the largest, near the binades' first values, far below the
    smallest subnormal) and a radius ``e`` of up to a few quanta."""
    fmt = draw(st.sampled_from(OUTPUTS + [WIDE]))
    rnd = draw(st.sampled_from(DETERMINISTIC))
    relax = draw(st.booleans()) and rnd in (fs.Rounding.NEAREST_EVEN, fs.Rounding.NEAREST_AWAY)
    m = fmt.man_bits
    E = draw(st.integers(max(fmt.emin - m - 3, -1000), min(fmt.emax + 2, 990)))
    q = 2.0 ** (max(E, fmt.emin) - m)  # the quantum at 2**E
    base = 2.0**E + draw(st.integers(0, 2 ** min(m, 8))) * q
    if draw(st.booleans()):
        base = 2.0**E  # a binade's first value: the finer midpoint below it
    offset = draw(st.sampled_from([0.0, 0.5, 0.25, -0.25, -0.5, 0.75, 1.0 / 3.0]))
    jitter = draw(st.sampled_from([0.0, 2.0**-40, -(2.0**-40), 2.0**-10]))
    s = (base + offset * q) * (1.0 + jitter)
    e = draw(st.sampled_from([0.0, 2.0**-45, 2.0**-20, 0.1, 0.2, 0.26, 0.49, 0.6, 1.5])) * q
    sign = draw(st.sampled_from([1.0, -1.0]))
    return fmt, rnd, relax, sign * s, e


@settings(max_examples=400, deadline=None)
@given(near_boundaries())
@example((fs.FP8_E4M3, fs.Rounding.ODD, False, 2.0**-9 * (1 + 2.0**-40), 0.0))  # was wrong:
# round to odd just above the smallest subnormal (one quantum: odd, kept)
def test_a_decided_interval_rounds_as_one(case):
    """The kernel's decision is sound: when it decides ``s`` with radius ``e``, both ends of
    ``[s - e, s + e]`` (exact, as Fractions) round, by the oracle, to its result (monotone
    rounding: so does every point between); strictly, no value of the format lies in the
    interval (every point inexact) and the overflow and subnormal events are the oracle's."""
    from fractions import Fraction
    fmt, rnd, relax, s, e = case
    S = np.array([[s]])
    out = np.empty((1, 1), fmt.dtype)
    fail = np.empty((1, 1), np.uint8)
    counts = np.empty((1, gk.N_C), np.int64)
    pi, pd = filtered._params(fmt, rnd, relax, not relax)
    gk.filter_round(S, np.ones((1, 1)), np.ones((1, 1)), e, pi, pd, out, fail, counts,
                    np.empty(1), np.empty(1), np.empty((1, 1), np.int64), 0)
    if fail[0, 0]:
        return
    v = float(out[0, 0])
    ends = [Fraction(s) - Fraction(e), Fraction(s) + Fraction(e)]
    for x in ends:
        r, f = reference.round_to_format(x, fmt, rnd, flags=True)
        assert_same_bits(np.array([v]), np.array([float(r)]), err_msg=f"{fmt!r} {rnd} {x}")
        if not relax:
            assert f["inexact"] and not f["underflow"]
            assert counts[0, gk.C_OVERFLOW] == f["overflow"]
            assert counts[0, gk.C_SUBNORMAL] == f["subnormal"]
    if not relax and np.isfinite(v) and abs(v) <= fmt.max:
        assert not (ends[0] <= Fraction(v) <= ends[1])


def test_decisions_are_not_vacuous():
    """Sums well inside a cell are decided, in every mode, normal and subnormal range."""
    for fmt in (fs.FP16, fs.FP8_E4M3):
        for rnd in DETERMINISTIC:
            q = 2.0 ** (fmt.emin - fmt.man_bits)
            S = np.array([[1.0 + 2.0 ** -(fmt.man_bits + 2), -3 * q / 4 - 5 * q, 0.3 * q]])
            out = np.empty(S.shape, np.float32)
            fail = np.empty(S.shape, np.uint8)
            pi, pd = filtered._params(fmt, rnd, False, True)
            gk.filter_round(S, np.ones((1, 1)), np.ones((1, 3)), q / 64, pi, pd, out, fail,
                            np.empty((1, gk.N_C), np.int64), np.empty(1), np.empty(3),
                            np.empty((1, 3), np.int64), 0)
            assert fail.tolist() == [[0, 0, 1]]  # 0.3 q: beyond the kernel's range
            want = [reference.round_to_format(float(x), fmt, rnd) for x in S[0, :2]]
            assert out[0, :2].tolist() == [float(w) for w in want]


def test_kernel_marks_what_it_cannot_decide():
    """filter_round directly: a sum on a midpoint, on a value, out of its range, zero and NaN
    are marked; a sum within its cell is decided with the rounding of S."""
    S = np.array([[1.0 + 2.0**-11, 1.0, 2.0**-1000, 0.0, np.nan, 1.0 + 3 * 2.0**-12]])
    out = np.empty(S.shape, np.float32)
    fail = np.empty(S.shape, np.uint8)
    counts = np.empty((1, gk.N_C), np.int64)
    pi, pd = filtered._params(fs.FP16, fs.Rounding.NEAREST_EVEN, False, True)
    na, nb, marks = np.empty(1), np.empty(6), np.full((1, 3), -1)
    gk.filter_round(S, np.ones((1, 1)), np.ones((1, 6)), 2.0**-40, pi, pd, out, fail, counts,
                    na, nb, marks, 0)
    assert na.tolist() == [1.0] and nb.tolist() == [1.0] * 6
    assert marks.tolist() == [[0, 1, 2]]  # the first three marked columns
    assert fail.tolist() == [[1, 1, 1, 1, 1, 0]]
    assert out[0, 5] == np.float32(1.0 + 2.0**-10)
    assert counts.tolist() == [[1, 0, 0, 5]]


@pytest.mark.parametrize("rnd", DETERMINISTIC)
def test_zero_rows_and_columns_decided_by_the_filter(rnd):
    """A row of ``A`` or a column of ``B`` of signed zeros has a zero norm: every product is
    zero, and the filter makes the sum ``+0`` (exact, no event) without a second look, in
    every mode but DOWN, which marks them (``-0`` when a product is ``-0``); bits and counts
    as the general kernel's and the oracle's."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    b = rng.standard_normal((7, 6)).astype(np.float32)
    a[1] = 0.0
    a[3] = -0.0
    a[3, 2] = 0.0
    b[:, 0] = -0.0
    b[:, 4] = 0.0
    spec = fs.MatmulSpec(output=fs.FP32, output_rounding=rnd)
    seen = []
    orig = filtered._second_stage
    try:
        filtered._second_stage = lambda A, B, S, p, fr, fj, *rest: (
            seen.append(set(zip(fr.tolist(), fj.tolist(), strict=True))),
            orig(A, B, S, p, fr, fj, *rest))[1]
        same_as_general(a, b, spec)
    finally:
        filtered._second_stage = orig
    same_as_oracle(a, b, spec)
    zeros = {(r, j) for r in range(5) for j in range(6) if r in (1, 3) or j in (0, 4)}
    if rnd is fs.Rounding.DOWN:
        assert seen and zeros <= seen[0]
    else:
        assert not seen or not (zeros & seen[0])
        got = fs.matmul(a, b, spec)
        assert all(np.signbit(got[r, j]) == 0 and got[r, j] == 0 for r, j in zeros)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_sparse_dot2_is_dot2(K, seed, density):
    """dot2_sparse_at (over the nonzero entries of the rows of ``A``, ``B`` read in place)
    gives dot2_at's ``hi``, ``lo``, ``t`` and exactness bit for bit: zero products change
    nothing in Dot2. Signed zeros, exact sums, cancellations and rows repeated or not in
    order."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4, K)).astype(np.float32).astype(np.float64)
    a[rng.random((4, K)) > density] = 0.0
    a[rng.random((4, K)) < 0.1] = -0.0
    a[2] = np.round(a[2] * 4) / 4  # few bits: exact sums
    b = rng.standard_normal((K, 5)).astype(np.float32).astype(np.float64)
    b[rng.random((K, 5)) < 0.2] = -0.0
    b[:, 3] = np.round(b[:, 3])
    rows = np.array([0, 0, 1, 3, 3, 2, 2, 0, 1, 3], np.int64)
    cols = np.array([0, 4, 1, 3, 2, 3, 0, 1, 1, 4], np.int64)
    n = rows.size
    want = [np.empty(n), np.empty(n), np.empty(n), np.empty(n, np.uint8)]
    got = [np.empty(n), np.empty(n), np.empty(n), np.empty(n, np.uint8)]
    gk.dot2_at(a, np.ascontiguousarray(b.T), rows, cols, *want)
    gk.dot2_sparse_at(a, b, rows, cols, *got)
    for w, g in zip(want, got, strict=True):
        assert w.tobytes() == g.tobytes()


def test_sparse_second_stage_matches_general():
    """Sparse rows (most products zero) whose sums the filter cannot decide (exact integer
    sums, counted) take the sparse compensated sum: bits and counts as the general kernel."""
    rng = np.random.default_rng(2)
    a = rng.integers(-3, 4, (6, 300)).astype(np.float32)
    a[rng.random(a.shape) < 0.9] = 0.0
    b = rng.integers(-3, 4, (300, 9)).astype(np.float32)
    assert filtered._sparse_rows(a.astype(np.float64), np.arange(6))
    for cert in (False, True):
        with certify(cert):
            for rnd in DETERMINISTIC:
                paths = same_as_general(a, b, fs.MatmulSpec(output=fs.FP16, output_rounding=rnd))
                assert paths["exact_filtered"] == 1


# -- Gram products: x.T @ x from x alone ----------------------------------------------------------
@contextlib.contextmanager
def gram_chunks(size):
    """A Gram product summed in chunks of ``size`` rows from ``K = 2 * size`` on (on short
    ``K``: the default chunks start at 2,048 rows)."""
    old = filtered._GRAM_CHUNK
    filtered._GRAM_CHUNK = size
    try:
        yield
    finally:
        filtered._GRAM_CHUNK = old


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DETERMINISTIC), st.sampled_from(OUTPUTS), f32_matrices(),
       st.integers(1, 4), st.booleans())
def test_gram_products_match_general_kernel_and_oracle(rnd, out, ab, size, left):
    """``x.T @ x`` and ``x @ x.T`` (``x`` the first operand of the drawn pair, the other
    operand its transpose in memory), summed from ``x`` alone in chunks of 1 to 4 rows or in
    one call: the bits and counts of the general kernel on a copy, and the oracle's bits."""
    x = ab[0]
    a, b = (x, x.T) if left else (x.T, x)
    copy = np.ascontiguousarray(a), np.ascontiguousarray(b)
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    with gram_chunks(size):
        got, c = fs.matmul(a, b, spec, stats=True, path=filtered.NAME)
        unread = fs.matmul(a, b, spec, path=filtered.NAME)
    want, cw = fs.matmul(*copy, spec, stats=True, path="general")
    assert_same_bits(got.astype(np.float64), want.astype(np.float64), err_msg=repr(spec))
    assert_same_bits(unread.astype(np.float64), want.astype(np.float64), err_msg=repr(spec))
    assert c.output == cw.output, (c.output, cw.output)
    assert_same_bits(got.astype(np.float64), reference.matmul(*copy, spec))


def test_gram_chunked_sum_and_its_bound():
    """The Gram sum is the sum of the chunks' products ``c.T @ c`` of consecutive rows of
    ``B`` (``k_c = max(_GRAM_CHUNK, isqrt(K))``), in order, and ``d = k_c + n_c + 1``; below
    ``K = 2 k_c`` one BLAS call, ``d = K``."""
    rng = np.random.default_rng(5)
    B = rng.standard_normal((10, 3))
    with gram_chunks(4):  # k_c = 4: chunks 0-3, 4-7, 8-9
        S, d = filtered._gram_chunked(B)
        assert d == 4 + 3 + 1
        want = B[:4].T @ B[:4]
        want += B[4:8].T @ B[4:8]
        want += B[8:].T @ B[8:]
        assert_same_bits(S, want)
        S, d = filtered._gram_chunked(B[:7])
        assert d == 7 and S.shape == (3, 3)
    with gram_chunks(1):  # k_c = isqrt(10) = 3
        assert filtered._gram_chunked(B)[1] == 3 + 4 + 1


@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("side", [1.0, -1.0])
def test_a_gram_error_as_large_as_its_bound(read, side, monkeypatch):
    """A Gram sum off by as much as ``gamma(d) * sum|a_k b_k|`` (d = 4, K = 4), on the other
    side of an FP32 midpoint than the exact sum, 2**-51 from it, with the norms taken from
    that sum's own diagonal: the filter must not decide there; the result is the oracle's."""
    x = np.array([[1.0, 1.0], [2.0**-12, 2.0**-12], [2.0**-40, side * 2.0**-40], [0.0, 0.0]],
                 np.float32)
    spec = fs.MatmulSpec(output=fs.FP32)
    exact = reference.matmul(x.T, x, fs.MatmulSpec())  # S01 = 1 + 2**-24 + side * 2**-80
    s = 1.0 + 2.0**-24 - side * 2.0**-51
    gamma = 4 * 2.0**-53 / (1 - 4 * 2.0**-53)
    assert 2.0**-51 + 2.0**-80 <= gamma * (1.0 + 2.0**-24)  # |s - exact| within the bound
    S = exact.copy()
    S[0, 1] = S[1, 0] = s
    calls = []
    monkeypatch.setattr(filtered, "_gram_chunked",
                        lambda B: calls.append(B.shape) or (S.copy(), 4))
    out = fs.matmul(x.T, x, spec, stats=read)
    out = out[0] if read else out
    assert calls == [(4, 2)]
    assert_same_bits(out.astype(np.float64), reference.matmul(x.T, x, spec))


def test_gram_pairs_recognised():
    """A Gram product is recognised where the first operand is the second transposed in
    memory, and only there."""
    x = np.arange(12.0).reshape(4, 3)
    x32 = x.astype(np.float32)
    assert core._is_gram(x.T, x) and core._is_gram(x, x.T) and core._is_gram(x32.T, x32)
    f = np.asfortranarray(x)
    assert core._is_gram(f.T, f) and core._is_gram(x.T[:, ::-1], x[::-1])  # any strides
    y = np.arange(20.0).reshape(5, 4)
    for a, b in ((np.ascontiguousarray(x.T), x),  # equal values, other memory
                 (y[1:].T, y[:-1]),  # the same shape, shifted by a row
                 (y[:, 1:].T, y[:, :3]),  # shifted by a column
                 (x.T[:, ::-1], x),  # the rows of one reversed
                 (x.T.astype(np.float32), x32),  # float32 values of a float64 array
                 (x32.T, x32.view(np.int32)),  # the same bits read as integers
                 (x.T.tolist(), x),
                 (x.astype(">f8").T, x.astype(">f8")),  # not native: converted
                 (x.T[None], x)):  # not 2-D
        assert not core._is_gram(a, b), (a, b)
