"""Column-row sampling of a matrix product (Adelman, Levy, Hakimi, Silberstein, NeurIPS 2021).

Semantics (docs/approx.md). ``A B = sum over i of A[:, i] B[i, :]``: the product is a sum of
``K`` outer products, one per column-row pair ``i`` of the inner dimension. A sampled product
keeps ``k`` of them:

1. Pair weights ``w_i = ||A[:, i]|| * ||B[i, :]||`` (Euclidean norms, float64, of the operands
   as given: before ``spec.input`` rounds them). A pair of weight 0 contributes nothing and is
   never drawn by the random methods.
2. The pairs kept and their scales, by ``method``:

   - ``"crs"`` (Drineas, Kannan and Mahoney 2006): ``k`` draws, i.i.d., pair ``i`` with
     probability ``p_i = w_i / sum(w)``; a pair drawn ``c_i`` times is kept once with the
     scale ``c_i / (k p_i)`` (repeated draws accumulate). Unbiased.
   - ``"bernoulli"`` (Bernoulli-CRS, Adelman et al.): pair ``i`` kept independently with
     probability ``p_i = min(1, mu w_i)``, ``mu`` the one value for which ``sum(p_i) = k``
     (pairs whose share ``k w_i / sum(w)`` exceeds 1 are kept for certain and the rest share
     what remains; with no such pair ``p_i = k w_i / sum(w)``); when ``k`` is at least the
     number of pairs of nonzero weight, every one of them is kept with ``p_i = 1``. Scale
     ``1 / p_i``. Unbiased; the number kept varies, its mean is ``k``.
   - ``"topk"``: the ``k`` pairs of largest weight (ties to the lower index), unscaled.
     Deterministic and biased.

   Draws come from ``numpy.random.default_rng(seed)``: ``crs`` calls ``Generator.choice(K, k,
   p=p)`` once, ``bernoulli`` calls ``Generator.random(K)`` once and keeps ``u_i < p_i``. The
   same seed and operands give the same pairs, bit for bit.
3. The kept pairs, in increasing index order (the order of the inner dimension is kept, so an
   accumulator chain sees the kept products in their original order), form ``A_s`` (the kept
   columns of ``A``, each multiplied by its scale in float64: one rounding to float64) and
   ``B_s`` (the kept rows of ``B``, unscaled). The result is ``fixedsim.matmul(A_s, B_s, spec)``
   bit for bit: the scaled operand is rounded by ``spec.input`` like any operand, and the
   product, its accumulation and its output rounding are the spec's.

With ``"topk"`` and ``k = K`` the result is the dense ``matmul(A, B, spec)`` bit for bit; so it is
with ``"bernoulli"`` and ``k = K`` when no pair has weight 0 (every ``p_i`` is 1, every scale
1). ``"crs"`` draws with replacement, so even ``k = K`` keeps only about 63% of the distinct
pairs: it is unbiased, never exact.

Operands whose every pair has weight 0 (an all-zero ``A`` or ``B``): the random methods keep
nothing and the result is ``matmul`` of an empty inner dimension, zeros; ``"topk"`` keeps its
``k`` pairs (their products are zeros).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import counters as _counters
from ..matmul import MatmulSpec, conv2d, matmul
from ..quantize import _as_float_array

__all__ = ["METHODS", "PRODUCTS", "Approx", "ApproxStats", "Selection", "keep_count",
           "parse_approx", "select", "sampled_matmul", "sampled_conv2d"]

#: The sampling methods.
METHODS = ("crs", "bernoulli", "topk")
#: The products of a Linear or Conv2d layer a setting may sample.
PRODUCTS = ("forward", "grad_input", "grad_weight")


def keep_count(keep, K: int, what: str = "keep") -> int:
    """The number of pairs ``k`` that ``keep`` asks for out of ``K``.

    An int is a count, 1 to ``K``; a float is a fraction in (0, 1], giving
    ``max(1, floor(keep * K + 1/2))`` (nearest, halves up). A ValueError says which rule failed.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be an int count of pairs or a float fraction in (0, 1], "
                         f"got {keep!r}")
    if isinstance(keep, (int, np.integer)):
        if not 1 <= keep <= K:
            raise ValueError(f"{what} = {keep} pairs is out of range: the inner dimension has "
                             f"K = {K} pairs, so a count must be in [1, {K}] (or give a "
                             f"fraction in (0, 1])")
        return int(keep)
    if not (math.isfinite(keep) and 0 < keep <= 1):
        raise ValueError(f"{what} fraction must be in (0, 1], got {keep!r} (an int gives a "
                         f"count of pairs)")
    if K < 1:
        raise ValueError(f"{what}: the inner dimension is empty (K = 0), nothing to sample")
    return max(1, math.floor(float(keep) * K + 0.5))


@dataclasses.dataclass
class Selection:
    """The pairs one sampled product keeps.

    Attributes
    ----------
    kept : numpy.ndarray of int64
        The distinct pair indices kept, increasing.
    counts : numpy.ndarray of int64
        How many times each kept pair was drawn (``"crs"``; 1 for the other methods).
    scale : numpy.ndarray of float64
        The factor each kept pair's column of ``A`` is multiplied by.
    probabilities : numpy.ndarray of float64 or None
        ``p_i`` of every pair (``"crs"``: per draw, summing to 1; ``"bernoulli"``: of being
        kept, summing to ``k``); None for ``"topk"``.
    k : int
        Pairs asked for (draws for ``"crs"``).
    K : int
        Pairs available.
    """

    kept: np.ndarray
    counts: np.ndarray
    scale: np.ndarray
    probabilities: np.ndarray | None
    k: int
    K: int


# -- the text form of the settings (Approx, GradApprox, Rescale) ---------------------------------
def parse_keep(keep_text: str, label: str, text: str, rule: str):
    """``KEEP`` of a setting's text: a float when it has a decimal point or an exponent, else
    an int; a ValueError naming ``rule`` otherwise."""
    try:
        return float(keep_text) if any(ch in keep_text for ch in ".eE") else int(keep_text)
    except ValueError:
        raise ValueError(f"{label} {text!r}: KEEP must be {rule}, got {keep_text!r}") from None


def parse_options(parts, options: dict, kw: dict, label: str, text: str, form: str) -> None:
    """The ``KEY=VALUE`` parts of a setting's text into ``kw``: ``options`` maps each KEY to
    (field name, type, what a value must be); an unknown or repeated KEY is a ValueError
    quoting ``form``."""
    for part in parts:
        key, _, val = part.partition("=")
        name, kind, what = options.get(key.strip(), (None, None, None))
        if name is None or name in kw:
            raise ValueError(f"{label} {text!r}: expected {form}")
        try:
            kw[name] = kind(val)
        except ValueError:
            raise ValueError(f"{label} {text!r}: {key} must be {what}, got {val!r}") from None


def build_setting(cls, kw: dict, label: str, text: str):
    """``cls(**kw)``, its ValueError prefixed with the text it was parsed from."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise ValueError(f"{label} {text!r}: {e}") from None


def optional_setting(cls, text):
    """``""`` or None: None; a string: ``cls.parse(text)``; an instance of ``cls``: itself."""
    if text is None or isinstance(text, cls):
        return text
    if isinstance(text, str) and not text.strip():
        return None
    return cls.parse(text)


#: The ``KEY=VALUE`` options of an :class:`Approx` setting's text.
_APPROX_OPTIONS = {"seed": ("seed", int, "an int"), "eps": ("epsilon", float, "a float in [0, 1]")}


@dataclasses.dataclass(frozen=True)
class Approx:
    """The column-row sampling setting of a Conv2d or Linear layer.

    Parameters
    ----------
    method : {"crs", "bernoulli", "topk"}
    keep : int or float
        Pairs kept per sampled product: a count (int >= 1, at most the product's inner
        dimension) or a fraction in (0, 1] (:func:`keep_count`).
    products : tuple of str
        Which of the layer's products are sampled, among ``"forward"`` (pairs: input
        features / input channels; the backward pass is then the gradient of the sampled
        forward: weight and input gradients of the kept pairs only), ``"grad_input"``
        (pairs: output features / output channels of ``dY W^T``) and ``"grad_weight"``
        (pairs: the examples of the mini-batch in ``X^T dY``). Adelman et al. sample the
        forward product (the default); docs/approx.md says why.
    seed : int, default 0
        Mixed into the layer's random streams (which derive from the run seed, the step, the
        layer and the product), so that two settings can draw differently.
    epsilon : float, default 0.0
        Share of the probabilities spread uniformly over the pairs of nonzero weight
        (:func:`select`); 0 is the paper's rule. Adelman et al.'s reference code mixes 0.1, so
        that pairs of small norm still get drawn (and their weights gradients) and the scales
        stay bounded.

    Examples
    --------
    >>> from fixedsim.approx import Approx
    >>> a = Approx.parse("bernoulli:0.5:forward+grad_weight")
    >>> a
    Approx(method='bernoulli', keep=0.5, products=('forward', 'grad_weight'), seed=0, epsilon=0.0)
    >>> str(a)
    'bernoulli:0.5:forward+grad_weight'
    >>> str(Approx.parse("crs:0.5:eps=0.1"))
    'crs:0.5:forward:eps=0.1'
    """

    method: str = "crs"
    keep: float = 0.5
    products: tuple = ("forward",)
    seed: int = 0
    epsilon: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Approx method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)) or (
                isinstance(k, (int, np.integer)) and k < 1) or (
                isinstance(k, (float, np.floating)) and not (math.isfinite(k) and 0 < k <= 1)):
            raise ValueError(f"Approx keep must be an int count >= 1 or a float fraction in "
                             f"(0, 1], got {k!r}")
        prods = (self.products,) if isinstance(self.products, str) else tuple(self.products)
        bad = [p for p in prods if p not in PRODUCTS]
        if bad or not prods or len(set(prods)) != len(prods):
            raise ValueError(f"Approx products must be distinct names among "
                             f"{', '.join(PRODUCTS)} (at least one), got {self.products!r}")
        object.__setattr__(self, "products", tuple(p for p in PRODUCTS if p in prods))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or \
                self.seed < 0:
            raise ValueError(f"Approx seed must be an int >= 0, got {self.seed!r}")
        _epsilon(self.epsilon, "Approx epsilon")
        object.__setattr__(self, "epsilon", float(self.epsilon))

    def __str__(self):
        s = f"{self.method}:{self.keep}:{'+'.join(self.products)}"
        return (s + (f":seed={self.seed}" if self.seed else "")
                + (f":eps={self.epsilon!r}" if self.epsilon else ""))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["products"] = list(self.products)
        return d

    @classmethod
    def parse(cls, text: str) -> Approx:
        """From ``"METHOD:KEEP[:PRODUCT[+PRODUCT...]][:seed=N][:eps=E]"`` (the form ``str``
        gives): ``KEEP`` with a decimal point or an exponent is a fraction, else a count
        (``"crs:0.5:forward"``, ``"topk:16:forward+grad_weight"``, ``"crs:0.5:eps=0.1"``)."""
        if not isinstance(text, str):
            raise TypeError(f"Approx.parse expects a string, got {text!r}")
        parts = [p.strip() for p in text.strip().split(":")]
        form = "METHOD:KEEP[:PRODUCT[+PRODUCT...]][:seed=N][:eps=E]"
        if len(parts) < 2 or len(parts) > 5 or not all(parts):
            raise ValueError(f"approx setting {text!r}: expected {form}, e.g. "
                             f"'crs:0.5:forward'")
        method, rest = parts[0], parts[2:]
        keep = parse_keep(parts[1], "approx setting", text,
                          "a count (int) or a fraction (float in (0, 1])")
        kw = {"method": method, "keep": keep}
        if rest and "=" not in rest[0]:
            kw["products"] = tuple(p.strip() for p in rest.pop(0).split("+"))
        parse_options(rest, _APPROX_OPTIONS, kw, "approx setting", text, form)
        return build_setting(cls, kw, "approx setting", text)


def parse_approx(text) -> Approx | None:
    """``""`` or None: no sampling; a string: :meth:`Approx.parse`; an :class:`Approx`: itself."""
    return optional_setting(Approx, text)


def _bernoulli_probabilities(w: np.ndarray, k: int) -> np.ndarray:
    """``p_i = min(1, mu w_i)`` with ``sum(p) = k`` (all nonzero pairs at 1 when ``k`` is at
    least their number)."""
    nz = w > 0
    if k >= int(nz.sum()):
        return nz.astype(np.float64)
    ws = np.sort(w)[::-1]
    suffix = np.cumsum(ws[::-1])[::-1]  # suffix[t] = sum of ws[t:]
    t = np.arange(k)
    mu = (k - t) / suffix[:k]
    # the smallest t (pairs kept for certain) whose remaining scale keeps pair t below 1
    ok = mu * ws[:k] <= 1.0
    t0 = int(np.argmax(ok))
    p = np.minimum(1.0, mu[t0] * w)
    p[np.argsort(-w, kind="stable")[:t0]] = 1.0
    return p


def _epsilon(eps, what="epsilon") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) or \
            not 0 <= eps <= 1:
        raise ValueError(f"{what} must be a number in [0, 1], got {eps!r}")
    return float(eps)


def select(weights, keep, method: str = "crs", rng=None, epsilon: float = 0.0) -> Selection:
    """The pairs kept out of ``len(weights)`` and their scales (step 2 of the module notes).

    Parameters
    ----------
    weights : array_like of float, shape (K,)
        Nonnegative finite pair weights ``w_i``.
    keep : int or float
        A count of pairs (1 to K) or a fraction in (0, 1] (:func:`keep_count`).
    method : {"crs", "bernoulli", "topk"}
    rng : numpy.random.Generator, int or None
        The draws (``numpy.random.default_rng(rng)``); not used by ``"topk"``.
    epsilon : float in [0, 1], default 0
        Mix the probabilities with the uniform ones over the pairs of nonzero weight:
        ``(1 - epsilon) p + epsilon u``, ``u_i = 1 / nnz`` for ``"crs"`` and
        ``min(k, nnz) / nnz`` for ``"bernoulli"`` (the sums stay 1 and ``k``; pairs of weight
        0 keep probability 0). The scales use the mixed probabilities, so the estimate stays
        unbiased. Not used by ``"topk"``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; the methods are "
                         f"{', '.join(METHODS)}")
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("select: weights must be a 1-D array of finite values >= 0")
    K = w.size
    k = keep_count(keep, K)
    epsilon = _epsilon(epsilon)
    if method == "topk":
        kept = np.sort(np.argsort(-w, kind="stable")[:k]).astype(np.int64)
        return Selection(kept, np.ones(k, np.int64), np.ones(k), None, k, K)
    rng = np.random.default_rng(rng)
    total = w.sum()
    if total == 0:
        empty = np.zeros(0, np.int64)
        return Selection(empty, empty.copy(), np.zeros(0), np.zeros(K), k, K)
    if method == "crs":
        p = w / total
        if epsilon:
            nz = w > 0
            p = (1 - epsilon) * p + epsilon * nz / nz.sum()
        draws = rng.choice(K, size=k, p=p)
        counts = np.bincount(draws, minlength=K)
        kept = np.flatnonzero(counts).astype(np.int64)
        c = counts[kept].astype(np.int64)
        return Selection(kept, c, c / (k * p[kept]), p, k, K)
    p = _bernoulli_probabilities(w, k)
    if epsilon:
        nz = w > 0
        n = int(nz.sum())
        p = (1 - epsilon) * p + epsilon * min(k, n) / n * nz
    u = rng.random(K)
    kept = np.flatnonzero(u < p).astype(np.int64)
    return Selection(kept, np.ones(kept.size, np.int64), 1.0 / p[kept], p, k, K)


@dataclasses.dataclass
class ApproxStats:
    """What one sampled product did.

    Attributes
    ----------
    method : str
    k, K : int
        Pairs asked for (draws for ``"crs"``) and pairs of the inner dimension.
    kept : numpy.ndarray of int64
        The distinct pairs used, increasing (for a convolution: input channels).
    counts : numpy.ndarray of int64
        Draws of each kept pair (``"crs"``: the multiplicity; 1 otherwise).
    scale : numpy.ndarray of float64
        Each kept pair's factor (``counts / (k p)``, ``1 / p`` or 1).
    probabilities : numpy.ndarray or None
        ``p_i`` of every pair; None for ``"topk"``.
    macs : int
        Multiply-accumulates performed: ``M * N * len(kept)`` for a matrix product (the
        product's counters).
    dense_macs : int
        Those of the dense product, ``M * N * K``.
    counters : fixedsim.counters.Counters
        The counters of the product of the kept pairs.
    """

    method: str
    k: int
    K: int
    kept: np.ndarray
    counts: np.ndarray
    scale: np.ndarray
    probabilities: np.ndarray | None
    macs: int
    dense_macs: int
    counters: _counters.Counters


def _norms(x, axis) -> np.ndarray:
    """Euclidean norms over ``axis`` in float64 (zero for an empty reduction)."""
    return np.sqrt(np.square(np.asarray(x, np.float64)).sum(axis=axis))


def _operands(op, method, x, y, names, ndim, axes, form):
    """The two operands of ``op`` as float arrays, checked as ``form`` says: ``ndim``
    dimensions each with ``x.shape[axes[0]] == y.shape[axes[1]]``; then a known ``method``
    and finite values (their norms weigh the pairs)."""
    x = _as_float_array(x, names[0])
    y = _as_float_array(y, names[1])
    if x.ndim != ndim or y.ndim != ndim or x.shape[axes[0]] != y.shape[axes[1]]:
        raise ValueError(f"{op}: {form}, got {x.shape} and {y.shape}")
    if method not in METHODS:
        raise ValueError(f"{op}: unknown method {method!r}; the methods are "
                         f"{', '.join(METHODS)}")
    for v, name in zip((x, y), names, strict=True):
        if not np.isfinite(v).all():
            raise ValueError(f"{op}: {name} contains NaN or infinity; its norms, and so the "
                             "sampling probabilities, are meaningless")
    return x, y


def _stats(method, sel, counters, dense):
    return ApproxStats(method=method, k=sel.k, K=sel.K, kept=sel.kept, counts=sel.counts,
                       scale=sel.scale, probabilities=sel.probabilities, macs=counters.macs,
                       dense_macs=dense, counters=counters)


def sampled_matmul(a, b, keep, *, method: str = "crs", seed=None,
                   spec: MatmulSpec | None = None, product_seed=None, epsilon: float = 0.0):
    """``a @ b`` from a sample of its column-row pairs (module notes).

    Parameters
    ----------
    a : array_like, shape (M, K)
    b : array_like, shape (K, N)
    keep : int or float
        Pairs to keep: a count in [1, K] or a fraction in (0, 1] (:func:`keep_count`). For
        ``"crs"`` it is the number of draws.
    method : {"crs", "bernoulli", "topk"}, default "crs"
    seed : int, numpy.random.Generator or None
        The sampling draws: ``numpy.random.default_rng(seed)`` (None: fresh entropy, not
        reproducible).
    spec : MatmulSpec, optional
        The arithmetic of the product of the kept pairs (default ``MatmulSpec()``, as
        :func:`fixedsim.matmul`).
    product_seed : int, optional
        The seed of the spec's stochastic stages (``seed`` of :func:`fixedsim.matmul`).
    epsilon : float in [0, 1], default 0
        Uniform share mixed into the probabilities (:func:`select`); 0 is the paper's rule.

    Returns
    -------
    y : numpy.ndarray, shape (M, N)
        ``matmul(A_s, B_s, spec)``: ``A_s`` the kept columns of ``a`` times their scales,
        ``B_s`` the kept rows of ``b``.
    stats : ApproxStats
        ``kept`` holds the distinct pairs used, with ``counts`` their multiplicity.

    Examples
    --------
    >>> import numpy as np
    >>> from fixedsim.approx import sampled_matmul
    >>> a = np.array([[1.0, 0.0, 2.0, 0.5]])
    >>> b = np.array([[1.0], [5.0], [1.0], [1.0]])
    >>> y, st = sampled_matmul(a, b, 2, method="topk")
    >>> y, st.kept, st.macs, st.dense_macs      # pairs 0 and 2 have the largest norms
    (array([[3.]]), array([0, 2]), 2, 4)
    >>> y, st = sampled_matmul(a, b, 4, method="bernoulli", seed=0)
    >>> y, st.kept                              # pair 1 has norm product 0: never kept
    (array([[3.5]]), array([0, 2, 3]))
    """
    a, b = _operands("sampled_matmul", method, a, b, ("a", "b"), 2, (1, 0),
                     "a must be (M, K) and b (K, N) with the same K")
    M, K = a.shape
    N = b.shape[1]
    sel = select(_norms(a, 0) * _norms(b, 1), keep, method, seed, epsilon)
    a_s = a[:, sel.kept] * sel.scale if method != "topk" else a[:, sel.kept]
    y, c = matmul(a_s, b[sel.kept], spec, seed=product_seed, stats=True)
    return y, _stats(method, sel, c, M * N * K)


def sampled_conv2d(x, w, keep, *, method: str = "crs", seed=None,
                   spec: MatmulSpec | None = None, stride=1, padding=0, product_seed=None,
                   epsilon: float = 0.0):
    """``conv2d(x, w, spec)`` from a sample of its input channels.

    A pair is one input channel ``c``: the activations ``x[:, c]`` with the kernel slice
    ``w[:, c]`` (in the im2col lowering, the ``kh * kw`` columns of channel ``c`` of the
    input matrix and the same rows of the kernel matrix). Its weight is
    ``||x[:, c]|| * ||w[:, c]||`` (Frobenius norms, float64), as Adelman et al. weigh a
    channel; the methods, scales and draws are those of :func:`sampled_matmul`. The kept
    channels of ``x``, each multiplied by its scale (float64), and of ``w`` go through
    :func:`fixedsim.conv2d` with ``spec``: the K order (channel, row, column) of the kept
    channels is the dense one with the others left out.

    Returns
    -------
    y : numpy.ndarray, shape (N, O, Ho, Wo)
    stats : ApproxStats
        ``kept`` holds the input channels used; ``dense_macs`` the MACs of the dense
        convolution.
    """
    x, w = _operands("sampled_conv2d", method, x, w, ("x", "w"), 4, (1, 1),
                     "x must be (N, C, H, W) and w (O, C, kh, kw) with the same C")
    C = x.shape[1]
    sel = select(_norms(x, (0, 2, 3)) * _norms(w, (0, 2, 3)), keep, method, seed, epsilon)
    x_s = x[:, sel.kept]
    if method != "topk":
        x_s = x_s * sel.scale[None, :, None, None]
    w_s = w[:, sel.kept]
    if sel.kept.size == 0:  # no channel of nonzero weight: the dense shape, zeros
        y, c = conv2d(x[:, :1] * 0.0, w[:, :1] * 0.0, spec, stride, padding, seed=product_seed,
                      stats=True)
        c.macs = 0
    else:
        y, c = conv2d(x_s, w_s, spec, stride, padding, seed=product_seed, stats=True)
    dense = c.macs * C // sel.kept.size if sel.kept.size else _conv_macs(x.shape, w.shape, y)
    return y, _stats(method, sel, c, dense)


def _conv_macs(x_shape, w_shape, y) -> int:
    """MACs of the dense forward convolution: ``N * Ho * Wo * O * C * kh * kw``."""
    N, C = x_shape[:2]
    O, _, kh, kw = w_shape
    return int(N * y.shape[2] * y.shape[3] * O * C * kh * kw)
