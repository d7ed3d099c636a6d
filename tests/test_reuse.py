"""fixedsim.reuse (Adaptive Deep Reuse): the reused product against its definition, the
clustering against a slow Python reference, the backward formulas, the layers, the cross-batch
table, the schedules, training with reuse, and bad input.

The definition (fixedsim/reuse/core.py): the result of ``reuse_matmul`` is
``matmul(Xt, Wq, spec)`` bit for bit, ``Xt`` the input matrix with every sub-vector replaced
by its cluster's centroid. Two consequences are checked on their own: with every row its own
cluster the result is the dense product (values, dtype and signs of zeros), and the clusters,
codes and centroids are those of a plain-Python implementation of the hashing rule.

Data. Most tests use values on a fixed-point grid (small integers over ``2**k``), so that
float64 sums of them are exact and a NumPy reference can be compared bit for bit, and
"float data" (magnitudes in ``[2**-10, 6]`` or exactly +0). Neither contains ``-0.0``: the sign
of a negative zero in the input is lost by the centroids (a known bug, checked on its own by
``test_negative_zero_rows_keep_their_sign``), and the exactness tests are about everything else.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import helpers
import numba
import numpy as np
import pytest
from helpers import numeric_grad
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fixedsim as fs
from fixedsim import nn
from fixedsim.nn.train import CHECKPOINT, TrainConfig, train
from fixedsim.reuse import (
    MAX_H,
    Reuse,
    ReuseTable,
    cluster,
    hyperplanes,
    reuse_grad_input,
    reuse_grad_weight,
    reuse_matmul,
)
from fixedsim.reuse.schedules import Adaptive, ClusterReuseOff, Constant, parse_reuse
from fixedsim.testing import roundings

RNE = fs.Rounding.NEAREST_EVEN
STOCH = fs.Rounding.STOCHASTIC
Q16_8 = fs.FixedFormat(16, 8)
Q12_6 = fs.FixedFormat(12, 6)
Q16_12 = fs.FixedFormat(16, 12)


@pytest.fixture(autouse=True, scope="module")
def _one_numba_thread():
    """Run this module's kernels on one Numba thread.

    The products here are tiny, and on a busy 2-core machine the launch of a parallel kernel
    cost about 8 ms (OpenMP threads waiting for a core), which made the module several times
    slower. Results do not depend on the thread count:
    ``test_hashing_is_deterministic_and_thread_independent`` checks that with 1 and 2 threads.
    """
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(old)


# -- helpers ------------------------------------------------------------------------------------
def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]).reshape(-1)


def assert_identical(got, want, what=""):
    """Same dtype, shape and bit patterns (signed zeros distinguished)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    gb, wb = _bits(got), _bits(want)
    bad = np.flatnonzero(gb != wb)
    if bad.size:
        i = bad[0]
        raise AssertionError(f"{what}: {bad.size} of {gb.size} differ; first at flat index {i}: "
                             f"got {got.reshape(-1)[i]!r}, expected {want.reshape(-1)[i]!r}")


def without_input(spec):
    """``spec`` with its input stage removed (random_bits kept only where still meaningful)."""
    s = dataclasses.replace(spec, input=None, input_rounding=RNE, random_bits=None)
    still = ((s.product is not None and s.product_rounding is STOCH)
             or ((s.output is not None or s.accumulator is None) and s.output_rounding is STOCH))
    return dataclasses.replace(s, random_bits=spec.random_bits) if still else s


def input_rounded(W, spec, seed):
    """``W`` as ``matmul(..., spec, seed=seed)`` rounds its second operand (stage B draws):
    the product of an identity matrix (exact in every input format) and ``W``."""
    if spec.input is None:
        return np.asarray(W, np.float64)
    only = fs.MatmulSpec(input=spec.input, input_rounding=spec.input_rounding,
                         random_bits=spec.random_bits if spec.input_rounding is STOCH else None)
    return fs.matmul(np.eye(W.shape[0]), W, only, seed=seed)


def block_bounds(K, L):
    return [(k0, min(K, k0 + L)) for k0 in range(0, K, L)]


def ref_cluster(X, L, H, seed, groups=None, fmt=None):
    """The hashing and clustering rule in plain Python: per block, projections summed in
    float64 in column order, bit h set when > 0, clusters numbered by first row (keyed by
    (group, code)), centroid = float64 sum in row order / count, rounded to nearest even."""
    X = np.asarray(X, np.float64)
    R, K = X.shape
    out = []
    for k0, k1 in block_bounds(K, L):
        P = hyperplanes(seed, k0, k1, H)
        codes = []
        for r in range(R):
            code = 0
            for h in range(H):
                acc = 0.0
                for k in range(k0, k1):
                    acc += float(X[r, k]) * float(P[k - k0, h])
                if acc > 0:
                    code |= 1 << h
            codes.append(code)
        number, ids, first = {}, [], []
        for r in range(R):
            key = (0 if groups is None else int(groups[r]), codes[r])
            if key not in number:
                number[key] = len(number)
                first.append(r)
            ids.append(number[key])
        n = len(number)
        sums = np.zeros((n, k1 - k0))
        counts = np.zeros(n, np.int64)
        for r in range(R):
            for k in range(k0, k1):
                sums[ids[r], k - k0] += X[r, k]
            counts[ids[r]] += 1
        cents = sums / counts[:, None].astype(np.float64)
        if fmt is not None:
            cents = np.asarray(fs.quantize(cents, fmt, RNE), np.float64)
        out.append(dict(bounds=(k0, k1), ids=np.array(ids, np.int64),
                        codes=np.array([codes[r] for r in first], np.int64), counts=counts,
                        centroids=cents))
    return out


def member_sums(ids, n, G):
    s = np.zeros((n, G.shape[1]))
    for r in range(G.shape[0]):
        s[ids[r]] += G[r]
    return s


def block_seed(seed, b):
    """The documented seed of block b's stochastic stages in the backward products."""
    ss = np.random.SeedSequence([int(seed), b])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


# -- strategies ---------------------------------------------------------------------------------
@st.composite
def grid_arrays(draw, shape, lo=-12, hi=12):
    """Small integers over 2**k (k in 0..4): sums of products are exact in float64. No -0.0."""
    k = draw(st.integers(0, 4))
    ints = draw(hnp.arrays(np.int64, shape, elements=st.integers(lo, hi)))
    return ints / 2.0**k


_MAG = st.floats(2.0**-10, 6.0, allow_nan=False, allow_infinity=False)
_FLOAT_ELEMS = st.one_of(st.just(0.0), _MAG, _MAG.map(lambda v: -v))


def float_arrays(shape, dtype=np.float64):
    return hnp.arrays(np.float64, shape, elements=_FLOAT_ELEMS).map(lambda a: a.astype(dtype))


@st.composite
def operands(draw, max_r=12, max_k=12, max_n=5, lo=-12, hi=12):
    R = draw(st.integers(1, max_r))
    K = draw(st.integers(1, max_k))
    N = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["grid", "float", "float32"]))
    if kind == "grid":
        return draw(grid_arrays((R, K), lo, hi)), draw(grid_arrays((K, N)))
    dt = np.float32 if kind == "float32" else np.float64
    return draw(float_arrays((R, K), dt)), draw(float_arrays((K, N)))


ACC_FMTS = [fs.FP32, fs.FP16, fs.BF16, fs.FixedFormat(24, 12), Q16_8]
OUT_FMTS = [None, fs.FP16, fs.BF16, fs.FP32, Q16_8, fs.FixedFormat(12, 4)]


@st.composite
def specs(draw, inputs=(None, fs.FP16, fs.BF16, Q12_6), products=(None,)):
    """Exact specs, outputs in float and fixed formats with every rounding, fixed and float
    accumulators (block 1 and more, saturating and wrapping), input and product roundings."""
    kind = draw(st.sampled_from(["exact", "output", "accumulator"]))
    inp = draw(st.sampled_from(inputs))
    in_rnd = draw(st.sampled_from([RNE, STOCH, fs.Rounding.TOWARD_ZERO])) if inp else RNE
    prod = draw(st.sampled_from(products))
    prod_rnd = draw(roundings()) if prod is not None else RNE
    acc = None
    if kind == "accumulator":
        fmt = draw(st.sampled_from(ACC_FMTS))
        rnd = draw(roundings())
        if isinstance(fmt, fs.FixedFormat):
            ovf = draw(st.sampled_from([fs.Overflow.SATURATE, fs.Overflow.WRAP]))
        else:
            ovf = draw(st.sampled_from([None, fs.Overflow.SATURATE]))
        acc = fs.Accumulator(fmt, rnd, ovf, draw(st.sampled_from([1, 2, 4])),
                             random_bits=draw(st.sampled_from([None, 4])) if rnd is STOCH
                             else None)
    out = None if kind == "exact" else draw(st.sampled_from(OUT_FMTS))
    rounds_out = out is not None or acc is None
    out_rnd = draw(roundings()) if kind != "exact" and rounds_out else RNE
    stages = [in_rnd if inp else None, prod_rnd if prod else None,
              out_rnd if rounds_out else None]
    rbits = draw(st.sampled_from([None, 5])) if STOCH in stages else None
    return fs.MatmulSpec(input=inp, product=prod, accumulator=acc, output=out,
                         output_rounding=out_rnd, input_rounding=in_rnd,
                         product_rounding=prod_rnd, random_bits=rbits)


SEEDS = st.integers(0, 2**32)
PRODUCT_SEEDS = st.integers(0, 2**63 - 1)


# -- 1. every row its own cluster: the dense product --------------------------------------------
@settings(max_examples=300)
@given(operands(), specs(), st.integers(1, 14), st.integers(1, MAX_H), SEEDS, PRODUCT_SEEDS)
def test_every_row_its_own_cluster_is_the_dense_product(XW, spec, L, H, seed, s):
    X, W = XW
    R, K = X.shape
    Y, stats = reuse_matmul(X, W, L, H, seed=seed, spec=spec, groups=np.arange(R),
                            product_seed=s)
    assert stats.remain_ratio == 1.0
    assert stats.clusters.tolist() == [R] * len(block_bounds(K, L))
    assert_identical(Y, fs.matmul(X, W, spec, seed=s), f"{spec!r}")
    assert stats.counters.macs == stats.macs
    if stats.path == "reuse":  # one cluster per row: nothing saved
        assert stats.macs == stats.dense_macs == R * K * W.shape[1]


@pytest.mark.parametrize("shape", [(0, 3, 2), (3, 0, 2), (3, 3, 0), (0, 0, 0)])
@pytest.mark.parametrize("spec", [fs.MatmulSpec(), fs.MatmulSpec(output=fs.FP16),
                                  fs.MatmulSpec(accumulator=fs.FP32)], ids=repr)
def test_empty_operands(shape, spec):
    R, K, N = shape
    X, W = np.ones((R, K)), np.ones((K, N))
    Y, stats = reuse_matmul(X, W, 2, 3, spec=spec, groups=np.arange(R))
    assert_identical(Y, fs.matmul(X, W, spec))
    assert stats.remain_ratio == 1.0 and stats.macs == 0 and stats.dense_macs == 0


def test_product_seed_defaults_to_the_spec_seed():
    rng = np.random.default_rng(1)
    X, W = rng.standard_normal((6, 7)), rng.standard_normal((7, 3))
    spec = fs.MatmulSpec(input=fs.BF16, input_rounding=STOCH, output=fs.FP16,
                         output_rounding=STOCH, seed=11)
    groups = np.arange(6)
    Y, _ = reuse_matmul(X, W, 3, 4, spec=spec, groups=groups)
    assert_identical(Y, fs.matmul(X, W, spec))
    Y2, _ = reuse_matmul(X, W, 3, 4, spec=spec, groups=groups, product_seed=12)
    assert_identical(Y2, fs.matmul(X, W, spec, seed=12))
    assert not np.array_equal(Y, Y2)  # the seed reaches the stochastic stages


@pytest.mark.parametrize("spec", [
    fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, "down")),
    fs.MatmulSpec(output=fs.FP32, output_rounding="down"),
], ids=repr)
def test_negative_zero_rows_keep_their_sign(spec):
    # "A cluster of one row is that row exactly, so with every row its own cluster the result
    # is the dense product, bit for bit."
    X = np.array([[-0.0], [-0.0]])
    W = np.array([[1.0]])
    Y, _ = reuse_matmul(X, W, 1, 4, spec=spec, groups=np.arange(2))
    assert_identical(Y, fs.matmul(X, W, spec))


# -- 2. the definition: the product of the reconstructed matrix ---------------------------------
CENTROID_FORMATS = ["spec", None, Q16_8, fs.FP16, fs.BF16]


@settings(max_examples=300)
@given(operands(max_r=16, lo=-4, hi=4),
       specs(inputs=(None, fs.FP16, fs.BF16, Q12_6), products=(None, fs.FP16)),
       st.integers(1, 14), st.one_of(st.integers(1, 6), st.just(MAX_H)), SEEDS, PRODUCT_SEEDS,
       st.sampled_from(CENTROID_FORMATS), st.booleans(), st.data())
def test_result_is_the_product_of_the_reconstructed_matrix(XW, spec, L, H, seed, s, cf,
                                                           use_groups, data):
    X, W = XW
    R, K = X.shape
    groups = data.draw(hnp.arrays(np.int64, R, elements=st.integers(0, 2))) if use_groups \
        else None
    Y, stats = reuse_matmul(X, W, L, H, seed=seed, spec=spec, groups=groups,
                            centroid_format=cf, product_seed=s)
    cl = stats.clustering
    Xt = cl.reconstruct()
    assert Xt.shape == X.shape and Xt.dtype == np.float64
    ref = fs.matmul(Xt, input_rounded(W, spec, s), without_input(spec), seed=s)
    assert_identical(Y, ref, f"{spec!r}, centroid_format={cf!r}")
    fmt = cf if cf != "spec" else (spec.input if spec.input is not None
                                   else (fs.FP32 if X.dtype == np.float32 else None))
    if fmt is not None:  # the centroids are values of the centroid format
        assert np.array_equal(np.asarray(fs.quantize(Xt, fmt), np.float64), Xt)
    if cf == "spec" and spec.input is not None:
        # Xt is on the input grid, where the input rounding is the identity
        assert_identical(Y, fs.matmul(Xt, W, spec, seed=s))
    if spec.product is not None or (spec.accumulator is not None
                                    and isinstance(spec.accumulator.fmt, fs.FloatFormat)):
        assert stats.path == "dense"  # no sharing under product rounding or a float chain


def test_input_rounded_helper_is_the_quantizer():
    W = np.random.default_rng(2).standard_normal((5, 3))
    for fmt in (fs.FP16, fs.BF16, Q12_6):
        for rnd in (RNE, fs.Rounding.TOWARD_ZERO):
            got = input_rounded(W, fs.MatmulSpec(input=fmt, input_rounding=rnd), 3)
            np.testing.assert_array_equal(got, np.asarray(fs.quantize(W, fmt, rnd), np.float64))


def _grid(rng, shape, lo=-8, hi=8, k=3):
    return rng.integers(lo, hi + 1, shape) / 2.0**k


@pytest.mark.parametrize("out", [None, fs.FP16, fs.BF16, fs.FP32, Q16_8, fs.FixedFormat(8, 2)],
                         ids=repr)
@pytest.mark.parametrize("rnd", list(fs.Rounding), ids=lambda r: r.name)
@pytest.mark.parametrize("inp", [None, fs.FP16, Q12_6], ids=repr)
def test_exact_sums_take_the_reuse_path(out, rnd, inp):
    if out is None and rnd is fs.Rounding.DOWN:
        pytest.xfail("known: output=None with DOWN rounding goes dense (see "
                     "test_float64_down_output_takes_the_reuse_path)")
    rng = np.random.default_rng(3)
    X, W = _grid(rng, (20, 9)), _grid(rng, (9, 3), k=2)
    spec = fs.MatmulSpec(input=inp, output=out, output_rounding=rnd)
    Y, stats = reuse_matmul(X, W, 3, 2, spec=spec, centroid_format=Q16_8, product_seed=5)
    assert stats.path == "reuse", stats.counters.paths
    cl = stats.clustering
    assert stats.remain_ratio < 1
    assert stats.macs == sum(int(n) * (k1 - k0) * 3 for n, (k0, k1)
                             in zip(cl.clusters, cl.bounds, strict=True)) < stats.dense_macs
    assert stats.gather_adds == 20 * 3 * 3
    assert_identical(Y, fs.matmul(cl.reconstruct(), input_rounded(W, spec, 5),
                                  without_input(spec), seed=5))


@pytest.mark.xfail(strict=True, reason="output=None with DOWN rounding: matmul's exact BLAS "
                   "path declines (zero signs) and the filtered path needs a float output, so "
                   "the product is computed densely although the sum is exact")
def test_float64_down_output_takes_the_reuse_path():
    rng = np.random.default_rng(3)
    X, W = _grid(rng, (20, 9)), _grid(rng, (9, 3), k=2)
    _, stats = reuse_matmul(X, W, 3, 2, spec=fs.MatmulSpec(output_rounding="down"),
                            centroid_format=Q16_8)
    assert stats.path == "reuse"


@pytest.mark.parametrize("acc", [fs.FP32, fs.FP16, fs.Accumulator(fs.BF16, "up", block=4),
                                 fs.Accumulator(fs.FixedFormat(12, 2), "stochastic", "wrap"),
                                 fs.Accumulator(fs.FixedFormat(10, 5), block=2)], ids=repr)
def test_accumulator_chains_are_dense(acc):
    # accumulators that round or overflow on these data: nothing can be shared
    rng = np.random.default_rng(4)
    X, W = _grid(rng, (20, 9)), _grid(rng, (9, 3), k=2)
    spec = fs.MatmulSpec(accumulator=acc)
    Y, stats = reuse_matmul(X, W, 3, 2, spec=spec, centroid_format=Q16_8, product_seed=9)
    assert stats.path == "dense"
    assert stats.remain_ratio < 1
    assert stats.macs == stats.dense_macs == 20 * 9 * 3 and stats.gather_adds == 0
    assert stats.counters.macs == stats.macs
    assert_identical(Y, fs.matmul(stats.clustering.reconstruct(), W, spec, seed=9))


@pytest.mark.parametrize("wrap", [False, True])
def test_a_fixed_accumulator_that_cannot_round_is_shared(wrap):
    # every partial sum is a value of Q<32,16>: the chain is the exact sum, so the products
    # are computed per cluster
    rng = np.random.default_rng(4)
    X, W = _grid(rng, (20, 9)), _grid(rng, (9, 3), k=2)
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FixedFormat(32, 16),
                                                    overflow="wrap" if wrap else None))
    Y, stats = reuse_matmul(X, W, 3, 2, spec=spec, centroid_format=Q16_8)
    assert stats.path == "reuse" and stats.macs < stats.dense_macs
    assert_identical(Y, fs.matmul(stats.clustering.reconstruct(), W, spec))


def test_float_data_default_centroids_are_float32_for_float32_data():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((30, 8)).astype(np.float32)
    W = rng.standard_normal((8, 2)).astype(np.float32)
    spec = fs.MatmulSpec(output=fs.FP32)
    Y, stats = reuse_matmul(X, W, 4, 2, spec=spec)
    Xt = stats.clustering.reconstruct()
    np.testing.assert_array_equal(Xt.astype(np.float32).astype(np.float64), Xt)
    assert stats.remain_ratio < 1
    assert stats.path == "reuse"  # float data, exact accumulation into a float output
    assert_identical(Y, fs.matmul(Xt, W, spec))
    # float64 data: the float64 means (not float32-representable in general)
    _, st64 = reuse_matmul(X.astype(np.float64), W, 4, 2, spec=spec)
    Xt64 = st64.clustering.reconstruct()
    assert not np.array_equal(Xt64.astype(np.float32).astype(np.float64), Xt64)


def test_macs_count_each_cluster_product_once():
    # codes below 2**26: exact BLAS splits K into chunks, and their int64 sum reaches 2**54
    X = np.full((2, 4), 2.0**26 - 1)
    W = np.full((4, 1), 2.0**26 - 1)
    spec = fs.MatmulSpec(output=fs.FP32)
    Y, stats = reuse_matmul(X, W, 4, 4, spec=spec, groups=np.arange(2))
    assert_identical(Y, fs.matmul(X, W, spec))  # the values are right
    assert stats.path == "reuse"
    assert stats.macs == 2 * 4 * 1  # clusters * L * N


# -- 3. clustering against the Python reference -------------------------------------------------
@settings(max_examples=200)
@given(st.integers(1, 24), st.integers(1, 12), st.data())
def test_clustering_matches_a_python_reference(R, K, data):
    kind = data.draw(st.sampled_from(["grid", "float"]))
    X = data.draw(grid_arrays((R, K), -3, 3) if kind == "grid" else float_arrays((R, K)))
    L = data.draw(st.integers(1, K + 2))
    H = data.draw(st.one_of(st.integers(1, 8), st.just(MAX_H)))
    seed = data.draw(SEEDS)
    groups = data.draw(st.one_of(st.none(), hnp.arrays(np.int64, R, elements=st.integers(0, 3))))
    fmt = data.draw(st.sampled_from([None, Q16_8, fs.FP16, fs.BF16]))
    cl = cluster(X, L, H, seed=seed, groups=groups, centroid_format=fmt)
    ref = ref_cluster(X, L, H, seed, groups, fmt)
    assert cl.bounds == [b["bounds"] for b in ref]
    assert (cl.rows, cl.K, cl.seed, cl.H) == (R, K, seed, H)
    for b, (want, ids, codes, counts, cents) in enumerate(zip(
            ref, cl.ids, cl.codes, cl.counts, cl.centroids, strict=True)):
        assert_identical(ids, want["ids"], f"block {b} ids")
        assert_identical(codes, want["codes"], f"block {b} codes")
        assert_identical(counts, want["counts"], f"block {b} counts")
        assert_identical(cents, want["centroids"], f"block {b} centroids")
    clusters = np.array([len(b["counts"]) for b in ref])
    np.testing.assert_array_equal(cl.clusters, clusters)
    assert cl.remain_ratio == clusters.sum() / (R * len(ref))
    assert cl.hash_ops == R * K * H and cl.table_hits == 0
    Xt = np.empty((R, K))
    for b in ref:
        k0, k1 = b["bounds"]
        Xt[:, k0:k1] = b["centroids"][b["ids"]]
    assert_identical(cl.reconstruct(), Xt)


@settings(max_examples=60)
@given(st.integers(1, 24), st.integers(1, 12), st.integers(1, 4), st.data())
def test_reuse_statistics(R, K, N, data):
    X = data.draw(grid_arrays((R, K), -3, 3))
    W = data.draw(grid_arrays((K, N)))
    L = data.draw(st.integers(1, K + 2))
    H = data.draw(st.integers(1, 6))
    spec = data.draw(st.sampled_from([fs.MatmulSpec(), fs.MatmulSpec(output=fs.FP32),
                                      fs.MatmulSpec(output=Q16_8, output_rounding=STOCH)]))
    with fs.counters.record() as rec:
        Y, stats = reuse_matmul(X, W, L, H, seed=data.draw(SEEDS), spec=spec,
                                centroid_format=Q16_8, product_seed=1)
    cl = stats.clustering
    nb = len(block_bounds(K, L))
    assert (stats.rows, stats.blocks) == (R, nb)
    np.testing.assert_array_equal(stats.clusters, cl.clusters)
    assert stats.remain_ratio == cl.remain_ratio == cl.clusters.sum() / (R * nb)
    assert stats.dense_macs == R * K * N
    assert stats.hash_ops == R * K * H
    assert stats.centroid_adds == R * K
    assert stats.hits == R * nb - cl.clusters.sum()
    assert stats.table_hits == 0
    assert rec.macs == stats.counters.macs == stats.macs and rec.calls == 1
    if np.any(W) and any(c.any() for c in cl.centroids):  # exact BLAS needs nonzero operands
        assert stats.path == "reuse"
    if stats.path == "reuse":
        assert stats.macs == sum(int(n) * (k1 - k0) * N
                                 for n, (k0, k1) in zip(cl.clusters, cl.bounds, strict=True))
        assert stats.gather_adds == R * N * nb
    else:
        assert stats.macs == R * K * N and stats.gather_adds == 0
    assert_identical(Y, fs.matmul(cl.reconstruct(), W, spec, seed=1))


def test_docstring_example():
    X = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.5], [1.0, 2.5], [-3.0, 1.0]])
    Y, st_ = reuse_matmul(X, np.eye(2), L=2, H=4)
    np.testing.assert_array_equal(Y, [[1, 2.25]] * 4 + [[-3, 1]])
    assert (st_.remain_ratio, st_.macs, st_.dense_macs, st_.path) == (0.4, 8, 20, "reuse")


# -- 4. the hashing is a function of the seed ---------------------------------------------------
def test_hashing_is_deterministic_and_thread_independent():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    rng = np.random.default_rng(6)
    X = _grid(rng, (700, 20))  # more than 256 rows: several chunks of the LSH kernel
    W = _grid(rng, (20, 4))
    spec = fs.MatmulSpec(output=fs.FP32)

    def run():
        cl = cluster(X, 5, 8, seed=11)
        Y, stats = reuse_matmul(X, W, 5, 8, seed=11, spec=spec, centroid_format=Q16_8)
        return cl, Y, stats

    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = run()
        numba.set_num_threads(2)
        b = run()
        c = run()
    finally:
        numba.set_num_threads(old)
    assert numba.get_num_threads() == old
    for x, y in ((a, b), (b, c)):
        for name in ("ids", "codes", "counts", "centroids"):
            for u, v in zip(getattr(x[0], name), getattr(y[0], name), strict=True):
                assert_identical(u, v, name)
        assert_identical(x[1], y[1], "Y")
        assert x[2].macs == y[2].macs
    assert a[2].path == "reuse" and a[2].remain_ratio < 1
    # another seed: other hyperplanes, other codes
    assert not np.array_equal(hyperplanes(11, 0, 5, 8), hyperplanes(12, 0, 5, 8))
    assert hyperplanes(11, 0, 5, 8).shape == (5, 8)
    np.testing.assert_array_equal(hyperplanes(11, 0, 5, 8), hyperplanes(11, 0, 5, 8))
    other = cluster(X, 5, 8, seed=12)
    assert any(not np.array_equal(u, v) for u, v in zip(a[0].codes, other.codes, strict=True))
    # the hyperplanes of a block depend on its columns and on H
    assert not np.array_equal(hyperplanes(11, 0, 5, 8), hyperplanes(11, 5, 10, 8))
    assert not np.array_equal(hyperplanes(11, 0, 5, 8)[:, :4], hyperplanes(11, 0, 5, 4))


# -- 5. backward formulas -----------------------------------------------------------------------
@settings(max_examples=60)
@given(st.integers(1, 16), st.integers(1, 10), st.integers(1, 4), st.data())
def test_grad_weight_and_input_against_numpy(R, K, N, data):
    X = data.draw(grid_arrays((R, K), -3, 3))
    G = data.draw(grid_arrays((R, N)))
    W = data.draw(grid_arrays((K, N)))
    L = data.draw(st.integers(1, K + 1))
    H = data.draw(st.integers(1, 5))
    groups = data.draw(st.one_of(st.none(), hnp.arrays(np.int64, R, elements=st.integers(0, 2))))
    cl = cluster(X, L, H, seed=data.draw(SEEDS), groups=groups, centroid_format=Q16_8)
    Xt = cl.reconstruct()  # on the Q16.8 grid: every float64 sum below is exact
    dW, c = reuse_grad_weight(cl, G)
    assert dW.dtype == np.float64 and dW.shape == (K, N)
    np.testing.assert_array_equal(dW, Xt.T @ G)
    assert c.macs == sum(int(n) * (k1 - k0) * N
                         for n, (k0, k1) in zip(cl.clusters, cl.bounds, strict=True))
    dX, c = reuse_grad_input(cl, G, W)
    ref = np.empty((R, K))
    for (k0, k1), ids, n in zip(cl.bounds, cl.ids, cl.counts, strict=True):
        Gb = member_sums(ids, len(n), G)
        ref[:, k0:k1] = ((Gb @ W[k0:k1].T) / n[:, None])[ids]
    assert dX.dtype == np.float64
    assert_identical(dX, ref + 0.0)
    assert c.macs == sum(int(n) * (k1 - k0) * N
                         for n, (k0, k1) in zip(cl.clusters, cl.bounds, strict=True))
    # with a rounding spec: the division after the spec's rounding
    spec = fs.MatmulSpec(output=fs.FP16)
    dX16, _ = reuse_grad_input(cl, G, W, spec)
    for (k0, k1), ids, n in zip(cl.bounds, cl.ids, cl.counts, strict=True):
        Gb = member_sums(ids, len(n), G)
        want = (np.asarray(fs.matmul(Gb, W[k0:k1].T, spec), np.float64) / n[:, None])[ids]
        assert_identical(dX16[:, k0:k1], want)


FP16_ACC_SPECS = [fs.MatmulSpec(accumulator=fs.FP16),
                  fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, "toward_zero", block=2),
                                output=fs.FP16),
                  fs.MatmulSpec(input=fs.BF16, accumulator=fs.FP16, output=fs.FP32)]


@settings(max_examples=60)
@given(operands(max_r=12, max_k=10, max_n=4), st.sampled_from(FP16_ACC_SPECS),
       st.integers(1, 11), st.data())
def test_grad_weight_with_every_row_its_own_cluster_is_the_dense_product(XW, spec, L, data):
    X, W = XW
    R, N = X.shape[0], W.shape[1]
    G = data.draw(float_arrays((R, N)))
    cl = cluster(X, L, data.draw(st.integers(1, MAX_H)), groups=np.arange(R))
    dW, _ = reuse_grad_weight(cl, G, spec)
    assert_identical(dW, fs.matmul(X.T, G, spec), repr(spec))


def test_backward_stochastic_blocks_are_seeded_per_block():
    rng = np.random.default_rng(7)
    X, G, W = _grid(rng, (12, 7), -2, 2), rng.standard_normal((12, 3)), rng.standard_normal((7, 3))
    cl = cluster(X, 3, 2, seed=1, centroid_format=Q16_8)
    spec = fs.MatmulSpec(output=fs.BF16, output_rounding=STOCH)
    dW, _ = reuse_grad_weight(cl, G, spec, seed=99)
    dX, _ = reuse_grad_input(cl, G, W, spec, seed=99)
    for b, ((k0, k1), ids, n, C) in enumerate(zip(cl.bounds, cl.ids, cl.counts, cl.centroids,
                                                  strict=True)):
        Gb = member_sums(ids, len(n), G)
        assert_identical(dW[k0:k1], fs.matmul(C.T, Gb, spec, seed=block_seed(99, b)))
        want = np.asarray(fs.matmul(Gb, W[k0:k1].T, spec, seed=block_seed(99, b)), np.float64)
        assert_identical(dX[:, k0:k1], (want / n[:, None])[ids])
    again, _ = reuse_grad_weight(cl, G, spec, seed=99)
    assert_identical(again, dW)
    other, _ = reuse_grad_weight(cl, G, spec, seed=100)
    assert not np.array_equal(other, dW)


# -- 6. layers ----------------------------------------------------------------------------------
FD_H = 1e-6
FD_RTOL = 1e-6  # as tests/test_nn_layers.py: the reused forward is linear between code changes


def _fd_check(f, arr, analytic, rng, what, coords_limit=12):
    """Central differences of f at ``coords_limit`` random coordinates of arr (all of a
    smaller one) and along two random directions (every component at once)."""
    analytic = np.asarray(analytic, np.float64)
    assert analytic.shape == arr.shape
    flat = arr.reshape(-1)
    assert np.shares_memory(flat, arr)
    idx = np.arange(flat.size) if flat.size <= coords_limit else \
        np.sort(rng.choice(flat.size, coords_limit, replace=False))
    fd = numeric_grad(f, arr, idx, FD_H)
    num = np.array([fd[i] for i in idx])
    scale = max(1.0, float(np.abs(analytic).max()))
    err = float(np.abs(num - analytic.reshape(-1)[idx]).max()) / scale
    assert err < FD_RTOL, f"{what}: relative error {err:.3g}"
    base = arr.copy()
    for _ in range(2):
        d = rng.standard_normal(arr.shape)
        d /= np.linalg.norm(d)
        arr[...] = base + FD_H * d
        fp = f()
        arr[...] = base - FD_H * d
        fm = f()
        arr[...] = base
        n = (fp - fm) / (2 * FD_H)
        assert abs(n - float(np.sum(analytic * d))) / scale < FD_RTOL, f"{what} (direction)"


def _layer(kind, rng_seed=1):
    if kind == "linear":
        layer = nn.Linear(8, 3, rng=rng_seed)
    else:
        layer = nn.Conv2d(2, 3, 3, rng=rng_seed)
    layer.name = kind
    return layer


def _x(kind, rng):
    return rng.standard_normal((12, 8)) if kind == "linear" else \
        rng.standard_normal((2, 2, 5, 5))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_gradients_are_those_of_the_reused_forward(kind):
    rng = np.random.default_rng(21)
    layer = _layer(kind)
    layer.bias.value[:] = rng.standard_normal(3)
    layer.set_reuse(Reuse(3, 2) if kind == "linear" else Reuse(4, 2))
    x = _x(kind, rng)
    ctx = nn.Context(nn.Policy.exact())
    y = layer.forward(x, ctx)
    base_ids = [ids.copy() for ids in layer._clustering.ids]
    rc = ctx.counters[kind].reuse
    assert rc.calls == 1 and rc.remain_ratio < 0.6
    R = rng.standard_normal(y.shape)
    gx = layer.backward(R.copy(), ctx)
    gw = np.array(layer.weight.grad, copy=True)
    gb = np.array(layer.bias.grad, copy=True)

    def f():
        out = layer.forward(x, nn.Context(nn.Policy.exact()))
        for u, v in zip(layer._clustering.ids, base_ids, strict=True):
            assert np.array_equal(u, v), "a perturbation changed an LSH code: choose other data"
        return float(np.sum(np.asarray(out, np.float64) * R))

    _fd_check(f, x, gx, rng, f"{kind} input")
    _fd_check(f, layer.weight.value, gw, rng, f"{kind} weight")
    _fd_check(f, layer.bias.value, gb, rng, f"{kind} bias")
    # the reused forward is not the dense one (the test would be vacuous otherwise)
    layer.set_reuse(None)
    assert not np.allclose(layer.forward(x, nn.Context(nn.Policy.exact())), y)


def _rounded_layer(kind, policy, rng):
    layer = _layer(kind, 3)
    init = nn.Context(policy, seed=0, step=0, phase=2)
    for p in layer.parameters():
        p.value = init.round("weights", p.value, "init", p.name)
    if layer.bias is not None:
        layer.bias.value = init.round("weights", rng.uniform(-0.5, 0.5, 3), "init", "b")
    return layer


def _run_layer(layer, x, grad, policy, reuse):
    layer.set_reuse(reuse)
    ctx = nn.Context(policy, seed=3, step=2)
    xr = ctx.round("activations", x, "input")  # as Sequential does
    y = layer.forward(xr, ctx)
    gx = layer.backward(ctx.round("errors", grad, "loss"), ctx)
    return y, gx, layer.weight.grad.copy(), layer.bias.grad.copy(), ctx


POLICIES = [nn.Policy.float32(), nn.Policy.fixed(16, 12)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_exact_input_grad_is_the_dense_input_grad(policy, kind):
    rng = np.random.default_rng(22)
    layer = _rounded_layer(kind, policy, rng)
    x = rng.uniform(-1, 1, (12, 8) if kind == "linear" else (2, 2, 5, 5))
    grad = rng.uniform(-1, 1, (12, 3) if kind == "linear" else (2, 3, 3, 3))
    y1, gx1, gw1, _, ctx = _run_layer(layer, x, grad, policy, Reuse(3, 2, input_grad="exact"))
    assert ctx.counters[kind].reuse.remain_ratio < 1
    y0, gx0, gw0, _, _ = _run_layer(layer, x, grad, policy, None)
    assert_identical(gx1, gx0, "input gradient")
    assert not np.array_equal(y1, y0) and not np.array_equal(gw1, gw0)  # reuse did act
    # the centroid input gradient is another one
    _, gxc, _, _, _ = _run_layer(layer, x, grad, policy, Reuse(3, 2))
    assert not np.array_equal(gxc, gx0)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_every_row_its_own_cluster_is_the_dense_layer(policy, kind):
    rng = np.random.default_rng(23)
    layer = _rounded_layer(kind, policy, rng)
    if kind == "linear":  # the input scope: every sample its own group
        x, grad, reuse = rng.uniform(-1, 1, (5, 8)), rng.uniform(-1, 1, (5, 3)), \
            Reuse(3, 4, scope="input")
    else:  # 32 hyperplanes on distinct random patches
        x, grad, reuse = rng.uniform(-1, 1, (2, 2, 5, 5)), rng.uniform(-1, 1, (2, 3, 3, 3)), \
            Reuse(6, MAX_H)
    y1, gx1, gw1, gb1, ctx = _run_layer(layer, x, grad, policy, reuse)
    assert ctx.counters[kind].reuse.remain_ratio == 1.0
    y0, gx0, gw0, gb0, _ = _run_layer(layer, x, grad, policy, None)
    assert_identical(y1, y0, "forward")
    assert_identical(gw1, gw0, "weight gradient")
    assert_identical(gb1, gb0, "bias gradient")
    if kind == "linear":  # G W^T / 1, block by block: the dense product's dot products
        assert_identical(gx1, gx0, "input gradient")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_counters_record_the_reuse(kind):
    rng = np.random.default_rng(24)
    policy = nn.Policy.fixed(16, 12, "nearest_even")
    layer = _rounded_layer(kind, policy, rng)
    x = rng.uniform(-1, 1, (12, 8) if kind == "linear" else (2, 2, 5, 5))
    grad = rng.uniform(-1, 1, (12, 3) if kind == "linear" else (2, 3, 3, 3))
    _, _, _, _, ctx = _run_layer(layer, x, grad, policy, Reuse(3, 2))
    rc = ctx.counters[kind].reuse
    rows, K, O = (12, 8, 3) if kind == "linear" else (18, 18, 3)
    nb = -(-K // 3)
    assert rc.calls == 1 and rc.rows == rows * nb and rc.dense_path == 0
    assert rc.remain_ratio == rc.clusters / rc.rows < 1
    assert rc.dense_macs == rows * K * O and 0 < rc.macs < rc.dense_macs
    assert rc.hash_ops == rows * K * 2 and rc.centroid_adds == rows * K
    assert rc.gather_adds == rows * O * nb
    assert rc.hits == rc.rows - rc.clusters
    assert rc.backward_dense_macs == 2 * rows * K * O
    assert 0 < rc.backward_macs < rc.backward_dense_macs
    d = ctx.counters[kind].as_dict()
    assert d["reuse.remain_ratio"] == rc.remain_ratio and d["reuse.calls"] == 1
    # an accumulator chain: the product is dense, and counted so
    pol32 = nn.Policy.float32("fma_chain")
    layer32 = _rounded_layer(kind, pol32, rng)
    _, _, _, _, ctx32 = _run_layer(layer32, x, grad, pol32, Reuse(3, 2))
    rc32 = ctx32.counters[kind].reuse
    assert rc32.dense_path == 1 and rc32.macs == rc32.dense_macs
    # no reuse, no reuse counts
    _, _, _, _, ctx0 = _run_layer(layer, x, grad, policy, None)
    assert ctx0.counters[kind].reuse.calls == 0
    assert not any(k.startswith("reuse.") for k in ctx0.counters[kind].as_dict())


# -- 7. the cross-batch table -------------------------------------------------------------------
def test_cross_batch_table_reuses_centroids_and_products():
    rng = np.random.default_rng(25)
    X, W = _grid(rng, (20, 9)), _grid(rng, (9, 3), k=2)
    R, nb = 20, 3
    t, key = ReuseTable(), object()
    kw = dict(seed=4, table=t, centroid_format=Q16_8)
    Y1, s1 = reuse_matmul(X, W, 3, 2, weights_key=key, **kw)
    assert s1.table_hits == 0 and s1.path == "reuse" and len(t) == s1.clusters.sum()
    assert s1.macs == sum(int(n) * 3 * 3 for n in s1.clusters)
    Y2, s2 = reuse_matmul(X, W, 3, 2, weights_key=key, **kw)
    assert s2.table_hits == R * nb and s2.macs == 0 and s2.hits == R * nb
    assert_identical(Y2, Y1)
    Y3, s3 = reuse_matmul(X, W, 3, 2, weights_key=object(), **kw)
    assert s3.table_hits == R * nb and s3.macs == s1.macs > 0
    assert_identical(Y3, Y1)
    # without a weights key the products are never reused
    _, s4 = reuse_matmul(X, W, 3, 2, **kw)
    _, s5 = reuse_matmul(X, W, 3, 2, **kw)
    assert s5.macs == s1.macs
    # the result with a table is still the product of the reconstructed matrix
    X2 = np.vstack([2 * X, -X[:5]])
    Y6, s6 = reuse_matmul(X2, W, 3, 2, weights_key=key, **kw)
    assert_identical(Y6, fs.matmul(s6.clustering.reconstruct(), W))


def test_stored_centroids_are_kept_and_round_trip():
    rng = np.random.default_rng(26)
    X = _grid(rng, (16, 8))
    t = ReuseTable()
    c1 = cluster(X, 4, 3, seed=2, table=t, centroid_format=Q16_8)
    n = len(t)
    assert n == c1.clusters.sum() and "clusters=" in repr(t)
    # 2X has the codes of X (the projections scale by 2): every row takes a stored centroid,
    # which later members do not change
    c2 = cluster(2 * X, 4, 3, seed=2, table=t, centroid_format=Q16_8)
    assert c2.table_hits == 16 * 2 and len(t) == n
    for a, b in zip(c1.centroids, c2.centroids, strict=True):
        assert_identical(a, b)
    # new codes (-X flips every bit of a nonzero projection) are added
    X3 = np.vstack([X[:4], -X])
    saved = {k: v.copy() for k, v in t.state_dict().items()}
    assert all(k.endswith((".codes", ".centroids")) for k in saved)
    buf = io.BytesIO()  # through npz, as a checkpoint does
    np.savez(buf, **saved)
    buf.seek(0)
    with np.load(buf) as z:
        t2 = ReuseTable()
        t2.load_state_dict({k: z[k] for k in z.files})
    assert len(t2) == n
    c3 = cluster(X3, 4, 3, seed=2, table=t, centroid_format=Q16_8)
    c3b = cluster(X3, 4, 3, seed=2, table=t2, centroid_format=Q16_8)
    assert len(t) == len(t2) > n and c3.table_hits == c3b.table_hits >= 4 * 2
    for name in ("ids", "codes", "counts", "centroids"):
        for a, b in zip(getattr(c3, name), getattr(c3b, name), strict=True):
            assert_identical(a, b, name)
    t.clear()
    assert len(t) == 0 and t.state_dict() == {}


def test_set_reuse_keeps_or_empties_the_table():
    rng = np.random.default_rng(27)
    policy = nn.Policy.fixed(16, 12, "nearest_even")
    conv = _rounded_layer("conv", policy, rng)
    x = fs.quantize(rng.uniform(-1, 1, (2, 2, 5, 5)), Q16_12)

    def fill():
        conv.forward(x, nn.Context(policy))
        assert len(conv.reuse_table) > 0
        return conv.reuse_table

    conv.set_reuse(Reuse(6, 3, scope="cross_batch"))
    tab = fill()
    n = len(tab)
    conv.set_reuse(Reuse(6, 3, scope="cross_batch", input_grad="exact"))
    assert conv.reuse_table is tab and len(tab) == n
    for changed in (Reuse(6, 4, scope="cross_batch"), Reuse(5, 4, scope="cross_batch")):
        old = fill()
        conv.set_reuse(changed)
        assert conv.reuse_table is not old and len(conv.reuse_table) == 0
    fill()
    conv.set_reuse(Reuse(5, 4, scope="batch"))
    assert conv.reuse_table is None
    conv.set_reuse(Reuse(5, 4, scope="cross_batch"))
    assert len(conv.reuse_table) == 0
    conv.set_reuse(None)
    assert conv.reuse is None and conv.reuse_table is None
    with pytest.raises(TypeError, match="fixedsim.reuse.Reuse or None"):
        conv.set_reuse("L=3,H=2")
    # training passes use the table: the second batch takes the first batch's centroids
    conv.set_reuse(Reuse(6, 3, scope="cross_batch"))
    ctx1, ctx2 = nn.Context(policy, step=0), nn.Context(policy, step=1)
    conv.forward(x, ctx1)
    conv.forward(x, ctx2)
    rows = 2 * 3 * 3 * 3  # rows times blocks
    assert ctx1.counters["conv"].reuse.table_hits == 0
    assert ctx2.counters["conv"].reuse.table_hits == rows


def test_layer_evaluation_reuses_stored_products():
    rng = np.random.default_rng(28)
    policy = nn.Policy.fixed(16, 12, "nearest_even")
    conv = _rounded_layer("conv", policy, rng)
    conv.set_reuse(Reuse(6, 3, scope="cross_batch"))
    x = fs.quantize(rng.uniform(-1, 1, (2, 2, 5, 5)), Q16_12)
    ctxs = [nn.Context(policy, step=i, training=False, phase=1) for i in range(2)]
    ys = [conv.forward(x, c) for c in ctxs]
    assert_identical(ys[1], ys[0])
    first, second = (c.counters["conv"].reuse for c in ctxs)
    assert first.macs > 0 and second.table_hits == first.rows
    assert second.macs == 0  # "with the stored product when the weights have not changed"


def test_evaluation_never_extends_the_training_table():
    """Test data must not reach the centroids training uses: evaluation has its own table,
    emptied by ``evaluate`` before each evaluation."""
    from fixedsim.nn.train import evaluate

    rng = np.random.default_rng(29)
    policy = nn.Policy.fixed(16, 12, "nearest_even")
    conv = _rounded_layer("conv", policy, rng)
    conv.set_reuse(Reuse(6, 3, scope="cross_batch"))
    x = fs.quantize(rng.uniform(-1, 1, (2, 2, 5, 5)), Q16_12)
    conv.forward(x, nn.Context(policy, step=0, training=True))
    before = conv.reuse_table.state_dict()
    assert len(conv.reuse_table) > 0
    x_test = fs.quantize(rng.uniform(-1, 1, (3, 2, 5, 5)), Q16_12)
    conv.forward(x_test, nn.Context(policy, step=0, training=False, phase=1))
    after = conv.reuse_table.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert_identical(after[k], before[k])
    assert len(conv.reuse_eval_table) > 0
    model = nn.Sequential(conv, nn.Flatten())
    model.layers[0].name = "conv"  # Sequential renames it; keep the tables' layer
    x_other = fs.quantize(rng.uniform(-1, 1, (1, 2, 5, 5)), Q16_12)
    evaluate(model, policy, x_other, np.zeros(1, np.int64), batch_size=1)
    alone = len(conv.reuse_eval_table)
    evaluate(model, policy, x_test, np.zeros(3, np.int64), batch_size=3)
    n = len(conv.reuse_eval_table)
    evaluate(model, policy, x_other, np.zeros(1, np.int64), batch_size=1)
    assert n > alone  # so that a table kept from the previous evaluation would show
    assert len(conv.reuse_eval_table) == alone  # emptied first, not the union


# -- 8. schedules -------------------------------------------------------------------------------
def test_parse_reuse_forms():
    for text in ("", "none", "dense", "  "):
        s = parse_reuse(text)
        assert isinstance(s, Constant) and s.current() is None
    s = parse_reuse("L=25,H=8")
    assert isinstance(s, Constant) and s.current() == Reuse(25, 8)
    assert parse_reuse("L=25,H=8,scope=input,input_grad=exact").current() == \
        Reuse(25, 8, "input", "exact")
    s = parse_reuse("adaptive:L=75,H=4;L=25,H=8;dense:window=20:min_delta=0.05")
    assert isinstance(s, Adaptive)
    assert s.stages == [Reuse(75, 4), Reuse(25, 8), None]
    assert (s.window, s.min_delta, s.current()) == (20, 0.05, Reuse(75, 4))
    s = parse_reuse("cr-off:L=25,H=6:window=3")
    assert isinstance(s, ClusterReuseOff)
    assert (s.window, s.min_delta) == (3, 0.01)
    assert s.current() == Reuse(25, 6, scope="cross_batch")
    assert parse_reuse("cr-off:L=25,H=6,scope=input").off == Reuse(25, 6, scope="batch")
    r = Reuse.parse("L=25,H=8,scope=input")
    assert str(r) == "L=25,H=8,scope=input,input_grad=centroid"
    assert Reuse.parse(str(r)) == r and Reuse(**r.to_dict()) == r


@pytest.mark.parametrize("text,match", [
    ("L=25", "H missing"),
    ("H=3", "L missing"),
    ("L=x,H=2", "L must be an int"),
    ("L=2,H=2,L=3", "L given twice"),
    ("L=2,H=2,foo=1", "expected KEY=VALUE"),
    ("L=2;H=2", "L must be an int"),
    ("L=0,H=2", "Reuse L must be an int >= 1"),
    ("L=2,H=33", r"Reuse H must be an int in \[1, 32\]"),
    ("L=2,H=0", r"Reuse H must be an int in \[1, 32\]"),
    ("L=2,H=2,scope=global", "Reuse scope must be one of"),
    ("L=2,H=2,input_grad=none", "Reuse input_grad must be one of"),
    ("adaptive:L=2,H=2:window=abc", "expected window=INT or min_delta=FLOAT"),
    ("adaptive:L=2,H=2:steps=3", "expected window=INT or min_delta=FLOAT"),
    ("adaptive:L=2,H=2:window", "expected window=INT or min_delta=FLOAT"),
    ("adaptive:", "L and H missing"),
    ("cr-off:L=2,H=2:window=0", "window must be an int >= 1"),
    ("cr-off:L=2,H=2:min_delta=-0.1", "min_delta must be >= 0"),
    ("cr-off:dense", "expected KEY=VALUE"),
    ("sometimes:L=2,H=2", "expected '', 'L=..,H=..', 'adaptive:...' or 'cr-off:...'"),
])
def test_parse_reuse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_reuse(text)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="reuse must be a string"):
        parse_reuse(5)
    with pytest.raises(TypeError, match="expects a string"):
        Reuse.parse(None)
    with pytest.raises(ValueError, match="non-empty list of Reuse or None"):
        Adaptive([])
    with pytest.raises(ValueError, match="non-empty list of Reuse or None"):
        Adaptive(["L=2,H=2"])
    with pytest.raises(ValueError, match="needs a Reuse setting"):
        ClusterReuseOff(None)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        Adaptive([None], window=True)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        TrainConfig(reuse="cr-off:L=2,H=2:window=0")
    with pytest.raises(ValueError, match="reuse_layers"):
        TrainConfig(reuse_layers="pool")


def test_nan_min_delta_is_rejected():
    with pytest.raises(ValueError, match="min_delta"):
        parse_reuse("cr-off:L=2,H=2:min_delta=nan")


def ref_plateaus(losses, window, min_delta):
    """Steps at which the windowed loss stops improving: the mean of each full window (a
    float64 sum in step order over the count) against the previous one, compared afresh
    after every plateau."""
    out, prev, s, n = [], None, 0.0, 0
    for step, loss in enumerate(losses):
        s += float(loss)
        n += 1
        if n < window:
            continue
        mean, s, n = s / n, 0.0, 0
        if prev is None or (prev - mean) >= min_delta * abs(prev):
            prev = mean
            continue
        prev = None
        out.append(step)
    return out


LOSSES = st.lists(st.one_of(st.floats(0.01, 5.0), st.sampled_from([1.0, 2.0, 1.5])),
                  min_size=0, max_size=40)


@settings(max_examples=150)
@given(LOSSES, st.integers(1, 5), st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5]),
       st.integers(1, 4))
def test_adaptive_moves_on_exactly_at_plateaus(losses, window, min_delta, nstages):
    stages = [Reuse(10 * (nstages - i), 2 + i) for i in range(nstages - 1)] + [None]
    s = Adaptive(stages, window=window, min_delta=min_delta)
    plateaus = ref_plateaus(losses, window, min_delta)
    moves = plateaus[:nstages - 1]
    got = [step for step, loss in enumerate(losses) if s.observe(step, loss)]
    assert got == moves
    assert s.current() == stages[len(moves)]
    assert s.changes == [(m, str(stages[i + 1])) for i, m in enumerate(moves)]
    c = ClusterReuseOff(Reuse(25, 6), window=window, min_delta=min_delta)
    got = [step for step, loss in enumerate(losses) if c.observe(step, loss)]
    assert got == plateaus[:1]
    assert c.current().scope == ("batch" if plateaus else "cross_batch")
    assert (c.current().L, c.current().H, c.current().input_grad) == (25, 6, "centroid")


def test_plateau_threshold_is_relative_and_inclusive():
    # windows of 2: means 2.0, 1.5 (improves by exactly 25 %: not a plateau), then 1.2
    # (improves by 20 % < 25 %: a plateau at step 5)
    s = Adaptive([Reuse(8, 2), Reuse(4, 4), None], window=2, min_delta=0.25)
    got = [s.observe(i, v) for i, v in enumerate([2.0, 2.0, 1.5, 1.5, 1.2, 1.2])]
    assert got == [False] * 5 + [True] and s.current() == Reuse(4, 4)
    # after a change the next window is a fresh baseline: no change at step 7
    assert [s.observe(i, 1.2) for i in (6, 7)] == [False, False]
    assert [s.observe(i, 1.2) for i in (8, 9)] == [False, True] and s.current() is None
    # the last stage stays
    assert not any(s.observe(i, 5.0) for i in range(10, 30))
    # a negative loss: relative to |prev|
    s = Adaptive([Reuse(8, 2), None], window=1, min_delta=0.1)
    assert [s.observe(i, v) for i, v in enumerate([-1.0, -1.1, -1.15])] == [False, False, True]
    # ClusterReuseOff switches once
    c = ClusterReuseOff(Reuse(8, 2), window=1, min_delta=0.5)
    assert [c.observe(i, 1.0) for i in range(6)] == [False, True, False, False, False, False]
    assert c.changes == [(1, str(Reuse(8, 2, scope="batch")))]
    assert Constant(Reuse(8, 2)).observe(0, 1.0) is False


@settings(max_examples=100)
@given(LOSSES, st.integers(0, 40), st.integers(1, 4), st.sampled_from(["adaptive", "cr-off"]))
def test_schedule_state_round_trip(losses, cut, window, kind):
    cut = min(cut, len(losses))

    def make():
        if kind == "adaptive":
            return Adaptive([Reuse(20, 2), Reuse(10, 4), Reuse(5, 6), None], window, 0.1)
        return ClusterReuseOff(Reuse(10, 4), window, 0.1)

    whole = make()
    want = [whole.observe(i, v) for i, v in enumerate(losses)]
    first = make()
    got = [first.observe(i, v) for i, v in enumerate(losses[:cut])]
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    resumed = make()
    resumed.load_state_dict(state)
    got += [resumed.observe(i, v) for i, v in enumerate(losses[cut:], start=cut)]
    assert got == want
    assert resumed.current() == whole.current() and resumed.changes == whole.changes
    assert resumed.state_dict() == whole.state_dict()


# -- 9. training --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_images():
    return helpers.tiny_images()


def _reuse_config(**kw):
    return helpers.tiny_lenet_config(**{"reuse": "cr-off:L=25,H=6:window=3:min_delta=0.5",
                                        **kw})


def test_training_with_reuse_writes_reuse_csv_and_resumes_bit_for_bit(tiny_images, tmp_path):
    cfg, pol = _reuse_config(), nn.Policy.fixed(16, 12)
    whole = train(cfg, pol, tmp_path / "whole", progress=False, data=tiny_images)
    rows = list(csv.DictReader(open(tmp_path / "whole" / "reuse.csv")))
    steps = 2 * 4
    assert len(rows) == steps * 2 == len(whole.reuse)  # one row per step and conv layer
    assert [(int(r["step"]), r["layer"]) for r in rows] == \
        [(s, name) for s in range(steps) for name in ("0.conv2d", "3.conv2d")]
    assert [int(r["epoch"]) for r in rows] == [1] * 8 + [2] * 8
    for r in rows:
        assert 0 < float(r["remain_ratio"]) <= 1
        assert int(r["dense_macs"]) > 0 and int(r["hash_ops"]) > 0
        assert 0 <= int(r["macs"]) < int(r["dense_macs"])
    # cluster reuse on, then off after the loss stopped improving (windows of 3 steps)
    settings_seen = [r["setting"] for r in rows]
    assert settings_seen[0] == "L=25,H=6,scope=cross_batch,input_grad=centroid"
    assert settings_seen[-1] == "L=25,H=6,scope=batch,input_grad=centroid"
    # the switch comes in epoch 2, from a window that started in epoch 1: the resumed run
    # below needs the schedule's state from the checkpoint to make it at the same step
    switch = next(i for i, r in enumerate(rows) if "scope=batch" in r["setting"])
    assert int(rows[switch]["epoch"]) == 2 and int(rows[switch]["step"]) >= 5
    assert all(int(r["table_hits"]) > 0 for r in rows[2:switch])  # after the first step
    assert all(int(r["table_hits"]) == 0 for r in rows[switch:])
    for h in whole.history:
        assert 0 < h["reuse.remain_ratio"] < 1 and h["reuse.calls"] > 0
    assert "reuse.remain_ratio" in next(csv.DictReader(open(tmp_path / "whole" /
                                                             "history.csv")))
    # stopped after epoch 1 and resumed: the same bits and the same reuse.csv
    part = train(cfg, pol, tmp_path / "split", progress=False, data=tiny_images,
                 stop_after_epoch=1)
    assert len(part.history) == 1
    with np.load(tmp_path / "split" / CHECKPOINT) as z:
        assert any(k.startswith("reuse/0.conv2d/") for k in z.files)
    rest = train(cfg, pol, tmp_path / "split", resume=True, progress=False, data=tiny_images)
    for k, p in whole.model.named_parameters().items():
        q = rest.model.named_parameters()[k]
        assert p.value.dtype == q.value.dtype and p.value.tobytes() == q.value.tobytes(), k
    assert (tmp_path / "whole" / "reuse.csv").read_bytes() == \
        (tmp_path / "split" / "reuse.csv").read_bytes()
    assert rest.reuse == whole.reuse


def test_training_without_reuse_writes_no_reuse_csv(tiny_images, tmp_path):
    res = train(_reuse_config(reuse="", epochs=1), nn.Policy.fixed(16, 12), tmp_path / "r",
                progress=False, data=tiny_images)
    assert not (tmp_path / "r" / "reuse.csv").exists() and res.reuse == []
    assert "reuse.remain_ratio" not in res.history[0]


# -- 10. bad input ------------------------------------------------------------------------------
def test_bad_input_is_named():
    X, W = np.ones((4, 3)), np.ones((3, 2))
    with pytest.raises(ValueError, match="reuse L must be an int >= 1, got 0"):
        reuse_matmul(X, W, 0, 4)
    with pytest.raises(ValueError, match=r"reuse H must be an int in \[1, 32\], got 0"):
        reuse_matmul(X, W, 2, 0)
    with pytest.raises(ValueError, match=r"reuse H must be an int in \[1, 32\], got 33"):
        reuse_matmul(X, W, 2, 33)
    with pytest.raises(ValueError, match="reuse L must be an int"):
        reuse_matmul(X, W, 2.0, 4)
    with pytest.raises(ValueError, match="reuse H must be an int"):
        cluster(X, 2, True)
    with pytest.raises(ValueError, match="reuse seed must be an int >= 0"):
        cluster(X, 2, 2, seed=-1)
    with pytest.raises(ValueError, match="Reuse L must be an int >= 1"):
        Reuse(0, 4)
    with pytest.raises(ValueError, match=r"Reuse H must be an int in \[1, 32\]"):
        Reuse(2, 33)
    with pytest.raises(ValueError, match=r"Reuse H must be an int in \[1, 32\]"):
        Reuse(2, 0)
    with pytest.raises(ValueError, match="Reuse scope must be one of"):
        Reuse(2, 2, scope="image")
    with pytest.raises(ValueError, match="Reuse input_grad must be one of"):
        Reuse(2, 2, input_grad="dense")
    Xn = X.copy()
    Xn[1, 2] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or infinity"):
        reuse_matmul(Xn, W, 2, 2)
    with pytest.raises(ValueError, match="X contains NaN or infinity"):
        reuse_matmul(np.where(Xn != Xn, np.inf, Xn), W, 2, 2)
    with pytest.raises(ValueError, match="X contains NaN or infinity.*fixed-point"):
        reuse_matmul(Xn, W, 2, 2, spec=fs.MatmulSpec(output=Q16_8))
    with pytest.raises(ValueError, match=r"groups must be 4 ints in \[0, 2\*\*58\)"):
        reuse_matmul(X, W, 2, 4, groups=np.arange(3))
    with pytest.raises(ValueError, match="groups must be 4 ints"):
        reuse_matmul(X, W, 2, 4, groups=np.arange(4.0))
    with pytest.raises(ValueError, match="groups must be 4 ints"):
        reuse_matmul(X, W, 2, 4, groups=np.array([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="groups must be 4 ints"):
        reuse_matmul(X, W, 2, 4, groups=np.arange(4).reshape(2, 2))
    with pytest.raises(ValueError, match="groups .* and a cross-batch table cannot be combined"):
        reuse_matmul(X, W, 2, 4, groups=np.arange(4), table=ReuseTable())
    cl = cluster(np.ones((5, 3)), 2, 2)
    with pytest.raises(ValueError, match="the clustering is of another matrix shape"):
        reuse_matmul(X, W, 2, 2, clustering=cl)
    with pytest.raises(ValueError, match="the clustering is of another matrix shape"):
        reuse_matmul(np.ones((5, 4)), np.ones((4, 2)), 2, 2, clustering=cl)
    with pytest.raises(ValueError, match="X must have shape"):
        reuse_matmul(np.ones((2, 4, 3)), W, 2, 2)
    with pytest.raises(ValueError, match="shapes do not match"):
        reuse_matmul(X, np.ones((4, 2)), 2, 2)
    with pytest.raises(TypeError, match="spec must be a MatmulSpec"):
        reuse_matmul(X, W, 2, 2, spec="exact")
    with pytest.raises(TypeError, match="centroid_format must be a fixedsim format or None"):
        reuse_matmul(X, W, 2, 2, centroid_format="fp16")
    with pytest.raises(ValueError, match="X must have shape"):
        cluster(np.ones(3), 2, 2)
    with pytest.raises(ValueError, match="grad_y must have 4 rows"):
        reuse_grad_weight(cluster(X, 2, 2), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"grad_y must be \(4, N\) and W \(3, N\)"):
        reuse_grad_input(cluster(X, 2, 2), np.ones((4, 2)), np.ones((2, 2)))


def test_a_given_clustering_is_used():
    rng = np.random.default_rng(29)
    X, W = _grid(rng, (10, 6)), _grid(rng, (6, 2))
    cl = cluster(X, 3, 2, seed=5, centroid_format=Q16_8)
    Y, stats = reuse_matmul(X, W, 3, 2, seed=5, centroid_format=Q16_8)
    Y2, stats2 = reuse_matmul(X, W, 99, 1, clustering=cl)  # L, H and seed of cl, not these
    assert stats2.clustering is cl
    # no hashing was done by this call, so none is counted
    assert (stats2.hash_ops, stats2.centroid_adds, stats2.table_hits) == (0, 0, 0)
    assert stats.hash_ops == cl.hash_ops == 10 * 6 * 2
    assert (stats2.macs, stats2.remain_ratio) == (stats.macs, stats.remain_ratio)
    assert_identical(Y2, Y)
