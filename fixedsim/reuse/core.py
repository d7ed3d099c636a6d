"""The reuse primitive: LSH clustering of sub-vectors and products computed once per cluster.

Semantics (docs/reuse.md). For ``Y = X W`` with ``X`` of shape ``(R, K)``:

1. ``spec.input`` rounds ``X`` and ``W`` as :func:`fixedsim.matmul` does (same draws).
2. The ``K`` columns are cut into blocks of ``L`` (the last one may be shorter). In block
   ``b`` every row's sub-vector is hashed with ``H`` random hyperplanes: bit ``h`` of its code
   is 1 when the dot product with hyperplane ``h`` is > 0. The hyperplanes are standard normal,
   drawn from ``SeedSequence([seed, k0, k1, H])`` (``k0:k1`` the block's columns).
3. Rows of a block with the same code (and the same group, when ``groups`` is given) form a
   cluster, numbered in order of their first row. Its centroid is the mean of its members
   (summed in float64 in row order, divided by the count in float64), rounded once, to nearest
   even, into ``centroid_format`` (default ``spec.input``; ``None`` keeps the float64 mean).
4. ``Xt`` is ``X`` with every sub-vector replaced by its centroid, and the result is
   ``matmul(Xt, W, spec)`` bit for bit: reuse changes the operand, the spec keeps its meaning.
   A cluster of one row is that row exactly, so with every row its own cluster the result is
   the dense product, bit for bit.

Where the spec's sum is exact (no product rounding, no accumulator: wide accumulation and one
rounding, Gupta's hardware; or float data with exact accumulation into a float output; not
DOWN rounding into float64, where the sign of an exact zero depends on how the sum cancels) the
product is computed per cluster, ``centroid_b @ W_b``, once, and given to every member: that is
where the multiply-accumulates are saved. Under an accumulator chain every output's rounded
running sum depends on each product in order, so nothing can be shared without changing the
numerics; the product of ``Xt`` is then computed densely and counted as such (``path ==
"dense"``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import counters as _counters
from ..formats import FP32, FixedFormat, FloatFormat
from ..jit import lsh as _lsh
from ..matmul import MatmulSpec, matmul
from ..matmul import engine as _engine
from ..quantize import _as_float_array, child_seed, quantize
from ..rounding import Rounding

__all__ = ["Reuse", "ReuseStats", "ReuseTable", "Clustering", "cluster", "hyperplanes",
           "reuse_matmul", "reuse_grad_weight", "reuse_grad_input", "MAX_H"]

#: The largest number of hyperplanes (codes are int64 with room for a group index).
MAX_H = 32

SCOPES = ("input", "batch", "cross_batch")
INPUT_GRADS = ("centroid", "exact")


def _int(v, name, low, high=None):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low or (
            high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {rng}, got {v!r}")
    return int(v)


@dataclasses.dataclass(frozen=True)
class Reuse:
    """The reuse setting of a Conv2d or Linear layer.

    Parameters
    ----------
    L : int
        Sub-vector length: the ``K`` columns of the layer's input matrix are hashed in blocks
        of ``L`` (for a convolution ``K = C * kh * kw``, in (channel, row, column) order).
    H : int
        Hyperplanes per block, 1 to :data:`MAX_H`: at most ``2**H`` clusters per block.
    scope : {"batch", "input", "cross_batch"}
        ``"input"``: clusters never mix rows of two images (two samples for Linear);
        ``"batch"``: clusters span the mini-batch; ``"cross_batch"``: as ``"batch"``, and the
        centroids are kept in a :class:`ReuseTable`, so that a row of a later batch whose code
        was seen before takes the stored centroid (cluster reuse, "CR"), with the stored
        product when the weights have not changed since (evaluation).
    input_grad : {"centroid", "exact"}
        The input gradient: through the centroids (the gradient of the reused forward:
        every member of a cluster gets the cluster's summed output error, divided by its
        size, times ``W``) or exact (the dense ``dY W^T``, as if there were no reuse).

    Examples
    --------
    >>> from fixedsim.reuse import Reuse
    >>> r = Reuse.parse("L=25,H=8,scope=input")
    >>> r
    Reuse(L=25, H=8, scope='input', input_grad='centroid')
    >>> str(r)
    'L=25,H=8,scope=input,input_grad=centroid'
    """

    L: int
    H: int
    scope: str = "batch"
    input_grad: str = "centroid"

    def __post_init__(self):
        _int(self.L, "Reuse L", 1)
        _int(self.H, "Reuse H", 1, MAX_H)
        if self.scope not in SCOPES:
            raise ValueError(f"Reuse scope must be one of {SCOPES}, got {self.scope!r}")
        if self.input_grad not in INPUT_GRADS:
            raise ValueError(f"Reuse input_grad must be one of {INPUT_GRADS}, "
                             f"got {self.input_grad!r}")

    def __str__(self):
        return f"L={self.L},H={self.H},scope={self.scope},input_grad={self.input_grad}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, text: str) -> Reuse:
        """From ``"L=25,H=8[,scope=batch][,input_grad=centroid]"`` (the form ``str`` gives)."""
        if not isinstance(text, str):
            raise TypeError(f"Reuse.parse expects a string, got {text!r}")
        kw = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in ("L", "H", "scope", "input_grad"):
                raise ValueError(f"reuse setting {text!r}: expected KEY=VALUE with KEY one of "
                                 f"L, H, scope, input_grad; got {part!r}")
            if key in kw:
                raise ValueError(f"reuse setting {text!r}: {key} given twice")
            val = val.strip()
            if key in ("L", "H"):
                try:
                    val = int(val)
                except ValueError:
                    raise ValueError(f"reuse setting {text!r}: {key} must be an int, "
                                     f"got {val!r}") from None
            kw[key] = val
        missing = [k for k in ("L", "H") if k not in kw]
        if missing:
            raise ValueError(f"reuse setting {text!r}: {' and '.join(missing)} missing")
        return cls(**kw)


def hyperplanes(seed: int, k0: int, k1: int, H: int) -> np.ndarray:
    """The ``(k1 - k0, H)`` standard normal hyperplanes of the block of columns ``k0:k1``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(k0), int(k1), int(H)]))
    return rng.standard_normal((k1 - k0, H))


def _same_key(a, b) -> bool:
    """Weights keys match: the same object, or tuples whose arrays are the same objects and
    whose other items are equal."""
    if a is b:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return all(x is y or (not isinstance(x, np.ndarray) and not isinstance(y, np.ndarray)
                              and x == y) for x, y in zip(a, b, strict=True))
    return False


def _positions(stored, codes):
    """Positions of ``codes`` in the sorted codes of ``stored = (codes, rows)`` (-1 where
    absent, or everywhere when ``stored`` is None)."""
    if stored is None or not len(stored[0]):
        return np.full(codes.shape, -1, np.int64)
    pos = np.minimum(np.searchsorted(stored[0], codes), len(stored[0]) - 1)
    return np.where(stored[0][pos] == codes, pos, -1)


def _merged(stored, codes, rows):
    """``stored = (sorted codes, rows)`` (or None) with new ``codes`` and their ``rows``."""
    if stored is not None:
        codes = np.concatenate([stored[0], codes])
        rows = np.concatenate([stored[1], rows])
    order = np.argsort(codes, kind="stable")
    return codes[order], np.ascontiguousarray(rows[order])


class ReuseTable:
    """Clusters kept across batches (the cross-batch scope, cluster reuse "CR").

    For each block of columns (and set of hyperplanes) it holds the codes seen so far and the
    centroid first formed for each; a stored centroid is not updated by later members. It also
    keeps the per-cluster products computed with the last weights it saw (``weights_key``, an
    object compared by identity), which later batches reuse while the weights are unchanged.

    Use one table per layer; :meth:`clear` forgets everything. ``state_dict`` /
    ``load_state_dict`` round-trip the centroids bit for bit (checkpoints).
    """

    def __init__(self):
        self._blocks: dict = {}   # (seed, H, k0, k1) -> (sorted codes, centroids)
        self._results: dict = {}  # (seed, H, k0, k1, sub0, sub1, scale, scaled) -> (codes, T)
        self._weights_key = None

    def __len__(self):
        return sum(len(c) for c, _ in self._blocks.values())

    def __repr__(self):
        return f"ReuseTable(blocks={len(self._blocks)}, clusters={len(self)})"

    def clear(self) -> None:
        self._blocks.clear()
        self._results.clear()
        self._weights_key = None

    def _lookup(self, key, codes):
        """Positions of ``codes`` in the table's block ``key`` (-1 where absent)."""
        stored = self._blocks.get(key)
        return _positions(stored, codes), stored

    def _add(self, key, codes, centroids):
        self._blocks[key] = _merged(self._blocks.get(key), codes, centroids)

    def _check_weights(self, weights_key):
        if weights_key is None or not _same_key(weights_key, self._weights_key):
            self._results.clear()
            self._weights_key = weights_key
        return weights_key is not None

    def state_dict(self) -> dict:
        """Arrays ``"K0_K1_SEED_H.codes"`` and ``".centroids"`` (results are not kept)."""
        out = {}
        for (seed, H, k0, k1), (codes, cents) in self._blocks.items():
            out[f"{k0}_{k1}_{seed}_{H}.codes"] = codes
            out[f"{k0}_{k1}_{seed}_{H}.centroids"] = cents
        return out

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        for name, arr in state.items():
            if name.endswith(".codes"):
                k0, k1, seed, H = (int(v) for v in name[:-6].split("_"))
                self._blocks[(seed, H, k0, k1)] = (
                    np.asarray(arr, np.int64),
                    np.asarray(state[name[:-6] + ".centroids"], np.float64))


@dataclasses.dataclass
class Clustering:
    """The clusters of every block of a matrix ``X`` of shape ``(rows, K)``.

    Attributes
    ----------
    bounds : list of (int, int)
        The columns ``k0:k1`` of each block.
    ids : list of numpy.ndarray of int64, shape (rows,)
        The cluster of each row, per block (clusters numbered by first row).
    centroids : list of numpy.ndarray, shape (clusters, k1 - k0)
        float64 values (exactly those of ``centroid_format`` when it is set).
    counts : list of numpy.ndarray of int64
        Rows per cluster, per block.
    codes : list of numpy.ndarray of int64
        The hash code of each cluster, per block.
    table_hits : int
        Row sub-vectors that took a centroid kept from an earlier batch.
    hash_ops : int
        Multiply-adds of the projections, ``rows * K * H``.
    seed, H : int
        The hyperplanes used.
    """

    bounds: list
    ids: list
    centroids: list
    counts: list
    codes: list
    rows: int
    K: int
    seed: int
    H: int
    table_hits: int = 0
    hash_ops: int = 0
    _table_keys: list = dataclasses.field(default_factory=list)

    @property
    def clusters(self) -> np.ndarray:
        """Clusters per block."""
        return np.array([len(c) for c in self.counts], np.int64)

    @property
    def remain_ratio(self) -> float:
        """``r_c``: clusters over rows, summed over the blocks."""
        if self.rows == 0 or not self.bounds:
            return 1.0
        return float(self.clusters.sum() / (self.rows * len(self.bounds)))

    def reconstruct(self) -> np.ndarray:
        """``Xt``: every sub-vector replaced by its cluster's centroid, shape (rows, K)."""
        Xt = np.empty((self.rows, self.K), np.float64)
        for (k0, k1), ids, c in zip(self.bounds, self.ids, self.centroids, strict=True):
            Xt[:, k0:k1] = c[ids]
        return Xt

    def member_sums(self, G: np.ndarray, fmt=None) -> list:
        """``[sum of G's rows over each cluster's members]`` per block: float64, row order,
        then rounded once to nearest even into ``fmt`` when it is given."""
        G = np.ascontiguousarray(G, np.float64)
        out = []
        for ids, counts in zip(self.ids, self.counts, strict=True):
            s = np.full((len(counts), G.shape[1]), -0.0)  # -0.0 + x == x, signs included
            _lsh.cluster_sums(G, 0, ids, s)
            out.append(_round_centroids(s, fmt))
        return out


def _round_centroids(c, fmt):
    if fmt is None:
        return c
    q = quantize(c, fmt, Rounding.NEAREST_EVEN)
    return np.asarray(q, np.float64)


def cluster(X, L: int, H: int, *, seed: int = 0, groups=None, table: ReuseTable | None = None,
            centroid_format=None) -> Clustering:
    """Hash and cluster the rows of ``X`` block by block (steps 2 and 3 of the module notes).

    Parameters
    ----------
    X : array_like, shape (rows, K)
        Finite values.
    L, H : int
        Sub-vector length and hyperplanes per block.
    seed : int
        Seeds the hyperplanes (:func:`hyperplanes`).
    groups : array_like of int, shape (rows,), optional
        Rows of different groups never share a cluster (the ``"input"`` scope: the image of
        each im2col row).
    table : ReuseTable, optional
        Cross-batch scope: rows whose code the table holds take its centroid; new clusters are
        added to it. Not with ``groups``.
    centroid_format : format, optional
        The format the centroids are rounded into (to nearest even); None keeps the float64
        mean.

    Returns
    -------
    Clustering
    """
    X = _as_float_array(X, "X")
    if X.ndim != 2:
        raise ValueError(f"cluster: X must have shape (rows, K), got {X.shape}")
    R, K = X.shape
    L = _int(L, "reuse L", 1)
    H = _int(H, "reuse H", 1, MAX_H)
    seed = _int(seed, "reuse seed", 0)
    if centroid_format is not None and not isinstance(centroid_format,
                                                      (FixedFormat, FloatFormat)):
        raise TypeError(f"centroid_format must be a fixedsim format or None, "
                        f"got {centroid_format!r}")
    if not np.isfinite(X).all():
        raise ValueError("cluster: X contains NaN or infinity; LSH codes and centroids of "
                         "such rows are meaningless")
    if groups is not None:
        if table is not None:
            raise ValueError("cluster: groups (the input scope) and a cross-batch table "
                             "cannot be combined")
        groups = np.asarray(groups)
        if groups.shape != (R,) or groups.dtype.kind not in "iu" or (
                R and (groups.min() < 0 or groups.max() >= 2**(62 - H))):
            raise ValueError(f"cluster: groups must be {R} ints in [0, 2**{62 - H})")
        groups = groups.astype(np.int64)
    X64 = np.ascontiguousarray(X, np.float64)
    bounds = [(k0, min(K, k0 + L)) for k0 in range(0, K, L)]
    out = Clustering(bounds, [], [], [], [], R, K, seed, H, hash_ops=R * K * H)
    codes = np.empty(R, np.int64)
    for k0, k1 in bounds:
        _lsh.lsh_codes(X64, k0, hyperplanes(seed, k0, k1, H), codes)
        key = codes if groups is None else (groups << H) | codes
        ids = np.empty(R, np.int64)
        n = _lsh.first_ids(key, ids)
        first = np.full(n, R, np.int64)
        np.minimum.at(first, ids, np.arange(R))  # each cluster's first row
        ccodes = codes[first]
        counts = np.bincount(ids, minlength=n).astype(np.int64)
        sums = np.full((n, k1 - k0), -0.0)  # -0.0 + x == x: a one-row cluster is the row
        _lsh.cluster_sums(X64, k0, ids, sums)
        cents = _round_centroids(sums / counts[:, None], centroid_format)
        if table is not None:
            tkey = (seed, H, k0, k1)
            pos, stored = table._lookup(tkey, ccodes)
            old = pos >= 0
            if old.any():
                cents[old] = stored[1][pos[old]]
                out.table_hits += int(counts[old].sum())
            if (~old).any():
                table._add(tkey, ccodes[~old], cents[~old])
            out._table_keys.append(tkey)
        out.ids.append(ids)
        out.centroids.append(np.ascontiguousarray(cents))
        out.counts.append(counts)
        out.codes.append(ccodes)
    return out


@dataclasses.dataclass
class ReuseStats:
    """What one reused product did.

    Attributes
    ----------
    remain_ratio : float
        ``r_c``: clusters / rows, over all blocks.
    rows, blocks : int
    clusters : numpy.ndarray
        Clusters per block.
    macs : int
        Multiply-accumulates performed by the product: ``sum over blocks of clusters * L_b * N``
        on the reuse path (less those whose result came from a table), ``rows * K * N`` on the
        dense path.
    dense_macs : int
        ``rows * K * N``, the dense layer's.
    hash_ops : int
        Multiply-adds of the hashing projections, ``rows * K * H`` (not in ``macs``).
    centroid_adds : int
        Additions that form the centroid sums, ``rows * K``.
    gather_adds : int
        Additions of per-cluster block results into the outputs, ``rows * N * blocks`` (reuse
        path).
    hits : int
        Row sub-vectors whose product was computed for another (``rows * blocks - clusters``,
        plus the clusters whose product came from a table).
    table_hits : int
        Row sub-vectors that took a centroid kept from an earlier batch.
    path : {"reuse", "dense"}
        Whether the product was computed per cluster or densely on the reconstructed matrix.
    counters : fixedsim.counters.Counters
        The product's counters (its ``macs`` are ``macs`` above).
    clustering : Clustering
        The clusters used (for the backward pass).
    """

    remain_ratio: float
    rows: int
    blocks: int
    clusters: np.ndarray
    macs: int
    dense_macs: int
    hash_ops: int
    centroid_adds: int
    gather_adds: int
    hits: int
    table_hits: int
    path: str
    counters: _counters.Counters
    clustering: Clustering | None = None


class _ClusterProduct:
    """The ``mm`` of :func:`fixedsim.matmul.engine.product` computed per cluster."""

    def __init__(self, cl: Clustering, B, table, weights_key):
        self.cl, self.B = cl, B
        self.reset()
        self.table = table if table is not None and table._check_weights(weights_key) else None

    def reset(self):
        """Forget the counts of a pass whose path then declined (its work is redone)."""
        self.used = False
        self.macs = 0
        self.result_hits = 0

    def __call__(self, scale, Bs, k0, k1):
        self.used = True
        R, N = self.cl.rows, Bs.shape[1]
        out = np.zeros((R, N))
        for b, (b0, b1) in enumerate(self.cl.bounds):
            s0, s1 = max(b0, k0), min(b1, k1)
            if s0 >= s1:
                continue
            C = self.cl.centroids[b][:, s0 - b0:s1 - b0]
            T = self._partial(b, C, scale, Bs, s0, s1)
            _lsh.gather_add(T, self.cl.ids[b], out)
        return out

    def _partial(self, b, C, scale, Bs, s0, s1):
        """``ldexp(C, scale) @ Bs[s0:s1]``, rows from the table where it holds them."""
        cl, n = self.cl, C.shape[0]
        rkey = None
        if self.table is not None and b < len(cl._table_keys):
            rkey = cl._table_keys[b] + (s0, s1, int(scale), Bs is not self.B)
            stored = self.table._results.get(rkey)
            if stored is not None:
                codes = cl.codes[b]
                pos = _positions(stored, codes)
                have = pos >= 0
                T = np.empty((n, Bs.shape[1]))
                T[have] = stored[1][pos[have]]
                miss = ~have
                if miss.any():
                    T[miss] = np.ldexp(C[miss], scale) @ Bs[s0:s1]
                    self.table._results[rkey] = _merged(stored, codes[miss], T[miss])
                self.macs += int(miss.sum()) * (s1 - s0) * Bs.shape[1]
                self.result_hits += int(have.sum())
                return T
        T = np.ldexp(C, scale) @ Bs[s0:s1]
        self.macs += n * (s1 - s0) * Bs.shape[1]
        if rkey is not None:
            self.table._results[rkey] = _merged(None, cl.codes[b], T)
        return T


def reuse_matmul(X, W, L: int, H: int, *, seed: int = 0, spec: MatmulSpec | None = None,
                 groups=None, table: ReuseTable | None = None, weights_key=None,
                 centroid_format="spec", product_seed=None, clustering: Clustering | None = None):
    """``X @ W`` with the products of similar sub-vectors of ``X`` computed once.

    Parameters
    ----------
    X : array_like, shape (R, K)
        The input matrix (for a convolution, the im2col matrix).
    W : array_like, shape (K, N)
    L, H : int
        Sub-vector length and hyperplanes per block (:class:`Reuse`).
    seed : int, default 0
        Seeds the hyperplanes.
    spec : MatmulSpec, optional
        The arithmetic of the product (default exact, one rounding into float64).
    groups : array_like of int, shape (R,), optional
        Rows of different groups never share a cluster (the ``"input"`` scope).
    table : ReuseTable, optional
        The cross-batch scope: centroids (and products) kept from earlier calls.
    weights_key : object, optional
        With a table: an object that stands for ``W`` (compared by identity; a tuple matches
        a tuple whose arrays are the same objects and whose other items are equal); a table's
        stored products are reused only while the same key is passed.
    centroid_format : format or None, optional
        What the centroids are rounded into (to nearest even); None keeps the float64 mean.
        Default: ``spec.input`` when set, else FP32 when ``X`` is float32 (a centroid is
        stored like the data it stands for), else None.
    product_seed : int, optional
        The seed of the product's stochastic stages (default ``spec.seed``), as ``seed`` of
        :func:`fixedsim.matmul`.
    clustering : Clustering, optional
        Clusters found before (of the input-rounded ``X``); skips the hashing (and counts
        none: ``hash_ops``, ``centroid_adds`` and ``table_hits`` are 0).

    Returns
    -------
    Y : numpy.ndarray, shape (R, N)
        ``matmul(Xt, W, spec)`` bit for bit, ``Xt`` the reconstructed input (module notes).
    stats : ReuseStats
        Including ``stats.clustering``, the :class:`Clustering` used (for the backward pass).

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> from fixedsim.reuse import reuse_matmul
    >>> X = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.5], [1.0, 2.5], [-3.0, 1.0]])
    >>> Y, st = reuse_matmul(X, np.eye(2), L=2, H=4)
    >>> Y                                   # the four similar rows share one centroid
    array([[ 1.  ,  2.25],
           [ 1.  ,  2.25],
           [ 1.  ,  2.25],
           [ 1.  ,  2.25],
           [-3.  ,  1.  ]])
    >>> st.remain_ratio, st.macs, st.dense_macs, st.path
    (0.4, 8, 20, 'reuse')
    """
    spec, keys, rb, c = _engine.setup("reuse_matmul", spec, product_seed, True)
    X, W = _engine.check_operands(_as_float_array(X, "X"), _as_float_array(W, "W"))
    if X.ndim != 2:
        raise ValueError(f"reuse_matmul: X must have shape (R, K), got {X.shape}")
    _engine.check_finite_for_fixed(spec, X, W, "reuse_matmul", ("X", "W"))
    Xq = _engine.quantize_operand(X, spec.input, spec.input_rounding, rb, keys[0], c.input)
    Wq = _engine.quantize_operand(W, spec.input, spec.input_rounding, rb, keys[1], c.input)
    fmt = centroid_format
    if isinstance(fmt, str) and fmt == "spec":
        fmt = spec.input if spec.input is not None else (FP32 if X.dtype == np.float32
                                                          else None)
    hashed = clustering is None
    if hashed:
        clustering = cluster(Xq, L, H, seed=seed, groups=groups, table=table,
                             centroid_format=fmt)
    elif clustering.rows != X.shape[0] or clustering.K != X.shape[1]:
        raise ValueError("reuse_matmul: the clustering is of another matrix shape")
    cl = clustering
    R, K = Xq.shape
    N = Wq.shape[1]
    mm = _ClusterProduct(cl, Wq, table, weights_key)
    ba = _engine.Bits.of(np.concatenate([C.reshape(-1) for C in cl.centroids])) if K else None
    Y = _engine.product(((R, K), cl.reconstruct), Wq, spec, keys, rb, c, mm=mm, ba=ba)
    nb = len(cl.bounds)
    dense = R * K * N
    clusters = cl.clusters
    if mm.used:
        macs, path, gather = mm.macs, "reuse", R * N * nb
    else:
        macs, path, gather = dense, "dense", 0
    c.macs = macs
    _counters._publish(c)
    st = ReuseStats(remain_ratio=cl.remain_ratio, rows=R, blocks=nb, clusters=clusters,
                    macs=macs, dense_macs=dense, hash_ops=cl.hash_ops if hashed else 0,
                    centroid_adds=R * K if hashed else 0, gather_adds=gather,
                    hits=int(R * nb - clusters.sum()) + mm.result_hits,
                    table_hits=cl.table_hits if hashed else 0, path=path, counters=c,
                    clustering=cl)
    return Y, st


def _per_block_product(A_list, B_list, spec, seed):
    """One :func:`fixedsim.matmul` per block; block ``b`` seeded ``[seed, b]``."""
    outs, tot = [], _counters.Counters()
    for b, (A, B) in enumerate(zip(A_list, B_list, strict=True)):
        s = child_seed(int(seed or 0), b) if spec.stochastic else None
        y, c = matmul(A, B, spec, seed=s, stats=True)
        outs.append(y)
        tot += c
    return outs, tot


def reuse_grad_weight(cl: Clustering, grad_y, spec: MatmulSpec | None = None, *, seed=None,
                      sum_format=None):
    """Weight gradient of a reused product, over the clusters only.

    ``dW[k0:k1] = centroids_b^T @ G_b`` per block, ``G_b`` the output errors summed over each
    cluster's members (float64, row order): ``matmul(centroids_b.T, G_b, spec)``, ``K`` = the
    clusters in order of first row. It equals ``Xt^T dY`` (the gradient of the reused forward);
    with every row its own cluster it is ``matmul(X.T, dY, spec)`` for a deterministic spec.

    Parameters
    ----------
    cl : Clustering
        The forward pass's clusters.
    grad_y : array_like, shape (rows, N)
    spec : MatmulSpec, optional
    seed : int, optional
        Block ``b``'s stochastic stages are seeded from ``[seed, b]``.
    sum_format : format, optional
        The summed errors ``G_b`` are rounded to nearest even into it (None: kept in float64;
        a float32 machine would hold them in FP32).

    Returns
    -------
    dW : numpy.ndarray, shape (K, N)
    counters : fixedsim.counters.Counters
        MACs: ``sum of clusters * L_b * N``.
    """
    G = _as_float_array(grad_y, "grad_y")
    if G.shape[0] != cl.rows:
        raise ValueError(f"reuse_grad_weight: grad_y must have {cl.rows} rows, got {G.shape}")
    sums = cl.member_sums(G, sum_format)
    outs, c = _per_block_product([C.T for C in cl.centroids], sums,
                                 spec or MatmulSpec(), seed)
    dW = np.concatenate([np.asarray(o, np.float64) for o in outs], axis=0) if outs else \
        np.zeros((0, G.shape[1]))
    return dW.astype(np.result_type(*outs)) if outs else dW, c


def reuse_grad_input(cl: Clustering, grad_y, W, spec: MatmulSpec | None = None, *, seed=None,
                     sum_format=None):
    """Input gradient of a reused product through the centroids, over the clusters only.

    Every member of a cluster gets ``(G_b @ W_b^T) / n``, ``G_b`` the cluster's summed output
    errors (float64, row order) and ``n`` its size: ``matmul(G_b, W[k0:k1].T, spec) / n`` per
    block (the division in float64, after the spec's rounding, so that the product's operands
    stay those of the errors' format), then given to every member. This is the gradient of the
    reused forward with respect to ``X`` (the codes are locally constant). ``seed`` and
    ``sum_format`` as for :func:`reuse_grad_weight`.

    Returns
    -------
    dX : numpy.ndarray, shape (rows, K)
        float64.
    counters : fixedsim.counters.Counters
    """
    G = _as_float_array(grad_y, "grad_y")
    W = _as_float_array(W, "W")
    if G.shape[0] != cl.rows or W.shape != (cl.K, G.shape[1]):
        raise ValueError(f"reuse_grad_input: grad_y must be ({cl.rows}, N) and W ({cl.K}, N); "
                         f"got {G.shape} and {W.shape}")
    sums = cl.member_sums(G, sum_format)
    B = [np.ascontiguousarray(W[k0:k1].T) for k0, k1 in cl.bounds]
    outs, c = _per_block_product(sums, B, spec or MatmulSpec(), seed)
    dX = np.empty((cl.rows, cl.K))
    for (k0, k1), ids, n, o in zip(cl.bounds, cl.ids, cl.counts, outs, strict=True):
        dX[:, k0:k1] = (np.asarray(o, np.float64) / n[:, None])[ids]
    return dX, c
