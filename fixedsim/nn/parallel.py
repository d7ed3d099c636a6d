"""Emulated data parallelism: a modelled ring all-reduce whose every partial sum is rounded.

:func:`ring_allreduce` sums the arrays of ``N`` workers the way the standard ring all-reduce
does (reduce-scatter over ``N - 1`` steps, then all-gather over ``N - 1`` steps), with each
worker's contribution first rounded into the communication format and every partial sum
rounded into it again, in the ring's exact order (docs/parallel.md). The training loop uses it
when ``TrainConfig.workers > 1`` (:func:`fixedsim.nn.train.train`).

The model, for ``N`` workers holding arrays ``x_0 .. x_{N-1}`` of ``L`` elements each:

1. **cast**: worker ``w`` rounds its array (times ``scale``, in float64) into the format;
2. the flattened array is cut into ``N`` contiguous chunks, chunk ``c`` holding elements
   ``[lo_c, hi_c)`` (``numpy.array_split``: the first ``L mod N`` chunks have one element more);
3. **reduce-scatter**, ring steps ``s = 0 .. N-2``: worker ``i`` sends its chunk
   ``(i - s) mod N`` to worker ``i + 1 (mod N)``, which adds it to its own copy of that chunk
   with **one rounding** into the format (:func:`fixedsim.add`). Chunk ``c`` is therefore
   summed in the order ``((x_c + x_{c+1}) + x_{c+2}) + ... + x_{c-1}`` (indices mod N), each
   ``+`` rounded, and ends fully reduced on worker ``c - 1 (mod N)``;
4. **all-gather**, ring steps ``s = 0 .. N-2``: worker ``i`` sends chunk ``(i + 1 - s) mod N``
   to worker ``i + 1``, which overwrites its copy (no arithmetic, no rounding: the values sent
   are the rounded ones);
5. every worker then holds the same array (checked bit for bit); it is divided by ``scale``
   in float64 (exact for a power of two, barring float64 underflow).

Stochastic rounding draws from streams that depend only on ``seed`` and the place of the
rounding: the cast of worker ``w`` from ``child_seed(seed, 0, w)`` (element ``i`` of the
worker's flattened array gets draw ``i``), the addition of ring step ``s`` on chunk ``c`` from
``child_seed(seed, s + 1, c)`` (element ``lo_c + j`` gets draw ``j``). No stream depends on which
process computes what, so workers spread over processes would give the same bits.

With one worker there is no communication: the result is the cast alone (the array rounded
once into the format), so that the result is always a value of the format (times
``1 / scale``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib

import numpy as np

from ..arith import add
from ..formats import FixedFormat, FloatFormat, parse_format
from ..quantize import _check_random_bits, child_seed, quantize, resolve_overflow
from ..rounding import Overflow, Rounding
from .core import Context, merge_counters

__all__ = ["AllReduce", "AllReduceStats", "ring_allreduce", "parse_allreduce", "chunk_bounds",
           "upper_triangle", "from_upper_triangle",
           "WorkerContext", "data_parallel_pass", "worker_pass"]


@dataclasses.dataclass(frozen=True)
class AllReduceStats:
    """What one :func:`ring_allreduce` did.

    Attributes
    ----------
    workers : int
    size : int
        Elements per worker's array.
    casts : int
        Roundings of the workers' arrays into the format (``workers * size``).
    additions : int
        Rounded additions of the reduce-scatter (``(workers - 1) * size``).
    inexact, overflow, underflow, subnormal, nan : int
        Over the casts and additions together, as :class:`fixedsim.QuantStats` counts them:
        ``overflow`` counts every rounding whose value lay beyond the format's range, so the
        overflow rule applied (saturated, wrapped, or sent to infinity); an infinity that only
        propagates through later additions is not counted again. Without a format (float64
        sums) there are no casts, and only ``overflow`` (finite operands whose float64 sum is
        infinite) and ``nan`` are counted.
    bytes_per_worker : int
        Bytes the busiest worker sends: ``2 * (workers - 1)`` chunks (reduce-scatter and
        all-gather) at the format's width, ``ceil(bits / 8)`` bytes per element (64 bits
        without a format).
    """

    workers: int
    size: int
    casts: int = 0
    additions: int = 0
    inexact: int = 0
    overflow: int = 0
    underflow: int = 0
    subnormal: int = 0
    nan: int = 0
    bytes_per_worker: int = 0

    @property
    def roundings(self) -> int:
        """Casts plus additions: every rounding into the format."""
        return self.casts + self.additions

    def stage_counts(self):
        """The counts as a :class:`fixedsim.counters.StageCounts` (a training role's row)."""
        from ..counters import StageCounts

        return StageCounts(roundings=self.roundings, inexact=self.inexact,
                           overflow=self.overflow, underflow=self.underflow,
                           subnormal=self.subnormal, nan=self.nan)


def chunk_bounds(size: int, workers: int) -> list:
    """``[(lo_c, hi_c) for c in range(workers)]``: the contiguous chunks of a flattened array
    of ``size`` elements, as ``numpy.array_split`` cuts them (the first ``size % workers``
    chunks one element longer).

    Examples
    --------
    >>> chunk_bounds(10, 4)
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    q, r = divmod(size, workers)
    out, lo = [], 0
    for c in range(workers):
        hi = lo + q + (1 if c < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _element_bits(fmt) -> int:
    return 64 if fmt is None else int(fmt.width)


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"ring_allreduce: scale must be a finite number > 0 (the loss-scale "
                         f"factor applied before the cast and removed after), got {scale!r}")
    return float(scale)


def _inputs(arrays):
    if isinstance(arrays, np.ndarray):
        if arrays.ndim < 1:
            raise ValueError("ring_allreduce: arrays must hold one array per worker (a "
                             "sequence, or an array whose first axis is the worker), got a "
                             "scalar")
        xs = list(arrays)
    else:
        try:
            xs = [np.asarray(a) for a in arrays]
        except TypeError:
            raise TypeError(f"ring_allreduce: arrays must be a sequence of arrays, one per "
                            f"worker, got {type(arrays).__name__}") from None
    if not xs:
        raise ValueError("ring_allreduce: at least one worker's array is needed (workers >= 1),"
                         " got none")
    shape = xs[0].shape
    for w, x in enumerate(xs):
        if x.shape != shape:
            raise ValueError(f"ring_allreduce: every worker's array must have the same shape; "
                             f"worker 0 has {shape}, worker {w} has {x.shape}")
        if x.dtype.kind not in "fiub":
            raise TypeError(f"ring_allreduce: worker {w}'s array must hold real numbers, got "
                            f"dtype {x.dtype}")
    return xs, shape


def _add(a, b, fmt, rounding, overflow, seed, random_bits):
    """``a + b`` rounded once into ``fmt`` with its stats, as :func:`fixedsim.add` computes it.

    Where float64 holds every sum exactly (the TwoSum error is zero and all are finite: the
    rule whenever the operands' exponents are close, as partial sums of one gradient's
    entries mostly are), one :func:`fixedsim.quantize` of the float64 sums is that single
    rounding, with the same draws (element ``i``, key of ``seed``); otherwise, and for an
    exact zero under DOWN (whose sign IEEE makes negative), :func:`fixedsim.add` does it.
    """
    from .core import _add_checked

    checked = _add_checked(a, b)
    if checked is not None:
        total, bad, zeros = checked
        if not bad and not (rounding is Rounding.DOWN and zeros):
            return quantize(total, fmt, rounding, overflow, seed=seed, random_bits=random_bits,
                            stats=True)
    return add(a, b, fmt, rounding, overflow, seed=seed, random_bits=random_bits, stats=True)


def ring_allreduce(arrays, fmt, rounding=Rounding.NEAREST_EVEN, overflow=None, *, seed=0,
                   scale=1.0, random_bits=None):
    """Sum the workers' arrays by a ring all-reduce in the communication format ``fmt``.

    Parameters
    ----------
    arrays : sequence of array_like, or numpy.ndarray
        One array per worker (all of one shape), or an array whose first axis is the worker.
        ``N = len(arrays)`` workers.
    fmt : FixedFormat, FloatFormat, str or None
        The communication format (a name is parsed by :func:`fixedsim.formats.parse_format`).
        None: float64 buffers, each partial sum rounded to nearest even in float64 (plain
        NumPy addition, in the ring's order).
    rounding : Rounding or str, default NEAREST_EVEN
        Rounding of the casts and of every partial sum.
    overflow : Overflow or str, optional
        As for :func:`fixedsim.quantize` (None: SATURATE for fixed point and "fn" floats,
        INFINITY for IEEE floats). Overflows are counted in the stats, never silent.
    seed : int, default 0
        Key of the STOCHASTIC streams (see the module docstring); ignored by other modes.
    scale : float, default 1.0
        Loss-scale factor: each array is multiplied by it (in float64) before the cast and the
        result divided by it (in float64) after; exact when a power of two (barring float64
        under- or overflow). Lets FP8 and FP16 hold small gradients. The cast rounds the
        float64 product: a product below float64's smallest subnormal (``2**-1074``) is
        already 0 there, and that loss is not counted among the events.
    random_bits : int, optional
        STOCHASTIC only, as for :func:`fixedsim.quantize`.

    Returns
    -------
    result : numpy.ndarray
        The reduced array (every worker's copy: they are checked to be equal bit for bit), the
        shape of one input; dtype ``fmt.dtype`` (float64 without a format or with a scale).
    stats : AllReduceStats

    Raises
    ------
    ValueError
        No arrays, arrays of different shapes, a scale that is not a finite number > 0, an
        unknown format name, a negative seed (stochastic rounding); the rules of
        :func:`fixedsim.quantize` (WRAP on a float format, NaN into a fixed-point format,
        ``random_bits`` with a deterministic mode).
    TypeError
        An array of non-real dtype; a seed that is not an int (stochastic rounding).

    Examples
    --------
    >>> import numpy as np
    >>> x = [np.array([2**-8, 2**-8]), np.array([2**-8, 1.0]), np.array([1.0, 2**-8])]
    >>> y, st = ring_allreduce(x, "BF16")   # chunk 0 adds the small terms first, chunk 1 not
    >>> y, st.additions, st.inexact, st.bytes_per_worker
    (array([1.0078125, 1.       ], dtype=float32), 4, 2, 6)
    >>> ring_allreduce(x, None)[0] - 1      # float64 keeps every bit
    array([0.0078125, 0.0078125])
    """
    xs, shape = _inputs(arrays)
    n = len(xs)
    if fmt is not None:
        fmt = parse_format(fmt)
        if not isinstance(fmt, (FixedFormat, FloatFormat)):  # pragma: no cover - parse_format
            raise TypeError(f"ring_allreduce: fmt must be a format, got {fmt!r}")
        rounding = Rounding.coerce(rounding, what="rounding")
        overflow = resolve_overflow(fmt, overflow)
        _check_random_bits(rounding, random_bits)
    elif (Rounding.coerce(rounding, what="rounding") is not Rounding.NEAREST_EVEN
          or overflow is not None or random_bits is not None):
        raise ValueError("ring_allreduce: without a format (fmt=None: float64 sums) the "
                         "rounding is float64's nearest even; give a format to choose "
                         "rounding, overflow or random_bits")
    scale = _check_scale(scale)
    stochastic = fmt is not None and rounding is Rounding.STOCHASTIC
    if stochastic and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"ring_allreduce: seed must be an int >= 0 (the key of the stochastic "
                        f"roundings), got {type(seed).__name__} {seed!r}")
    if stochastic and seed < 0:
        raise ValueError(f"ring_allreduce: seed must be an int >= 0 (the key of the stochastic "
                         f"roundings), got {seed}")
    size = int(np.prod(shape, dtype=np.int64))
    dtype = np.float64 if fmt is None else fmt.dtype
    bufs = np.empty((n, size), dtype)
    counts = dict.fromkeys(("inexact", "overflow", "underflow", "subnormal", "nan"), 0)

    def tally(qs):
        for k in counts:
            counts[k] += getattr(qs, k)

    for w, x in enumerate(xs):
        v = x.reshape(-1)
        if scale != 1.0:
            v = v.astype(np.float64) * scale
        if fmt is None:
            bufs[w] = v
            counts["nan"] += int(np.isnan(bufs[w]).sum())
            continue
        bufs[w], qs = quantize(v, fmt, rounding, overflow,
                               seed=child_seed(seed, 0, w) if stochastic else None,
                               random_bits=random_bits, stats=True)
        tally(qs)
    bounds = chunk_bounds(size, n)
    for s in range(n - 1):  # reduce-scatter
        for i in range(n):
            c, r = (i - s) % n, (i + 1) % n
            lo, hi = bounds[c]
            if lo == hi:
                continue
            if fmt is None:
                a, b = bufs[r, lo:hi], bufs[i, lo:hi]
                with np.errstate(invalid="ignore", over="ignore"):
                    t = a + b
                counts["overflow"] += int((np.isinf(t) & np.isfinite(a) & np.isfinite(b)).sum())
                counts["nan"] += int(np.isnan(t).sum())
                bufs[r, lo:hi] = t
                continue
            bufs[r, lo:hi], qs = _add(bufs[r, lo:hi], bufs[i, lo:hi], fmt, rounding, overflow,
                                      child_seed(seed, s + 1, c) if stochastic else None,
                                      random_bits)
            tally(qs)
    for s in range(n - 1):  # all-gather: copies of the reduced chunks
        for i in range(n):
            c, r = (i + 1 - s) % n, (i + 1) % n
            lo, hi = bounds[c]
            bufs[r, lo:hi] = bufs[i, lo:hi]
    words = bufs.view(np.uint64 if dtype == np.float64 else np.uint32)
    if not (words == words[0]).all():  # pragma: no cover - the ring's invariant
        raise RuntimeError("ring_allreduce: the workers' copies differ after the all-gather")
    out = bufs[0].reshape(shape)
    if scale != 1.0:
        out = out.astype(np.float64) / scale
    sizes = [hi - lo for lo, hi in bounds]
    # worker i sends chunk (i - s) in the reduce-scatter and (i + 1 - s) in the all-gather
    sent = max(sum(sizes[(i - s) % n] + sizes[(i + 1 - s) % n] for s in range(n - 1))
               for i in range(n))
    stats = AllReduceStats(workers=n, size=size, casts=n * size if fmt is not None else 0,
                           additions=(n - 1) * size, **counts,
                           bytes_per_worker=sent * math.ceil(_element_bits(fmt) / 8))
    return out, stats


@dataclasses.dataclass(frozen=True)
class AllReduce:
    """A communication setting of the training loop's all-reduce (``TrainConfig.allreduce``).

    Parameters
    ----------
    fmt : FixedFormat, FloatFormat or None
        The communication format; None: float64 sums.
    rounding : Rounding, default NEAREST_EVEN
    overflow : Overflow or None
    scale : float, default 1.0
        Loss-scale factor of the all-reduce alone (see :func:`ring_allreduce`).
    """

    fmt: FixedFormat | FloatFormat | None = None
    rounding: Rounding = Rounding.NEAREST_EVEN
    overflow: Overflow | None = None
    scale: float = 1.0

    def reduce(self, arrays, seed: int = 0):
        """:func:`ring_allreduce` of ``arrays`` under this setting."""
        return ring_allreduce(arrays, self.fmt, self.rounding, self.overflow, seed=seed,
                              scale=self.scale)

    def __str__(self):
        if self.fmt is None:
            return "float64"
        s = repr(self.fmt)
        if self.rounding is not Rounding.NEAREST_EVEN:
            s += f":{self.rounding.name.lower()}"
        if self.overflow is not None:
            s += f":overflow={self.overflow.name.lower()}"
        if self.scale != 1.0:
            s += f":scale={self.scale:g}"
        return s


_ALLREDUCE_RULE = ("FORMAT[:ROUNDING][:scale=S][:overflow=RULE], FORMAT a format name (fp32, "
                   "bf16, fp16, fp8_e4m3, fp8_e5m2, Q<16,8>, ...) or float64, e.g. 'bf16', "
                   "'fp8_e5m2:scale=1024', 'Q<16,12>:stochastic'")


def parse_allreduce(text) -> AllReduce | None:
    """The :class:`AllReduce` a setting string names; None for ``""`` (the default).

    ``FORMAT[:ROUNDING][:scale=S][:overflow=RULE]``: ``FORMAT`` a name
    :func:`fixedsim.formats.parse_format` reads, or ``float64`` (no communication format:
    float64 sums); ``ROUNDING`` a :class:`fixedsim.Rounding` name (default nearest_even);
    ``S`` a loss-scale factor > 0; ``RULE`` saturate, wrap or infinity.

    Raises
    ------
    ValueError
        An unknown format, rounding or option, naming the rule.

    Examples
    --------
    >>> parse_allreduce("bf16")
    AllReduce(fmt=BF16, rounding=Rounding.NEAREST_EVEN, overflow=None, scale=1.0)
    >>> str(parse_allreduce("fp8_e5m2:scale=1024")), str(parse_allreduce("Q<16,12>:stochastic"))
    ('FP8_E5M2:scale=1024', 'Q<16,12>:stochastic')
    """
    if not isinstance(text, str):
        raise ValueError(f"allreduce must be a string {_ALLREDUCE_RULE} (or '' for none), got "
                         f"{text!r}")
    if not text.strip():
        return None
    head, *opts = [p.strip() for p in text.split(":")]
    try:
        fmt = None if head.lower() in ("float64", "fp64") else parse_format(head)
    except ValueError as err:
        raise ValueError(f"allreduce {text!r}: {err}; the setting is {_ALLREDUCE_RULE}") \
            from None
    rounding, overflow, scale = Rounding.NEAREST_EVEN, None, 1.0
    for opt in opts:
        key, eq, value = opt.partition("=")
        try:
            if not eq:
                rounding = Rounding.coerce(key, what="allreduce rounding")
            elif key == "scale":
                scale = _check_scale(float(value))
            elif key == "overflow":
                overflow = Overflow.coerce(value, what="allreduce overflow")
            else:
                raise ValueError(f"unknown option {key!r}")
        except (TypeError, ValueError) as err:
            raise ValueError(f"allreduce {text!r}: {err}; the setting is {_ALLREDUCE_RULE}") \
                from None
    if fmt is None and (rounding is not Rounding.NEAREST_EVEN or overflow is not None):
        raise ValueError(f"allreduce {text!r}: float64 sums round to nearest even; a rounding "
                         f"or overflow rule needs a format ({_ALLREDUCE_RULE})")
    if fmt is not None:
        try:
            resolve_overflow(fmt, overflow)
        except ValueError as err:
            raise ValueError(f"allreduce {text!r}: {err}") from None
    return AllReduce(fmt, rounding, overflow, scale)


class WorkerContext(Context):
    """The :class:`~fixedsim.nn.Context` of one emulated worker: its random streams (stochastic
    roundings, dropout masks) are keyed by ``(seed, phase, step, layer, purpose, worker)``, so
    that workers draw independently of each other and of the process that runs them."""

    def __init__(self, policy, seed: int = 0, step: int = 0, training: bool = True,
                 phase: int = 0, *, worker: int = 0):
        super().__init__(policy, seed=seed, step=step, training=training, phase=phase)
        if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)) or worker < 0:
            raise ValueError(f"WorkerContext worker must be an int >= 0, got {worker!r}")
        self.worker = int(worker)

    def key(self, layer: str, purpose: str) -> int:
        return child_seed(self.seed, self.phase, self.step, zlib.crc32(layer.encode()),
                          zlib.crc32(purpose.encode()), self.worker)


def _layer_of(param: str) -> str:
    """``"0.conv2d"`` of the parameter ``"0.conv2d.weight"``."""
    return param.rsplit(".", 1)[0]


def worker_pass(model, lossf, x, y, policy, *, seed: int, step: int, worker: int, batch: int,
                scale: float = 1.0, phase: int = 0):
    """One worker's share of a training step: forward pass, loss and backward pass on its
    shard ``(x, y)`` under its :class:`WorkerContext`, the loss gradient divided by the global
    ``batch`` size. A function of its arguments only (the model's parameters and buffers, the
    shard, the policy, the seed, the step and the worker index), so it gives the same bits in
    any process.

    Returns
    -------
    grads : dict of str to numpy.ndarray
        Each parameter's gradient (in the policy's ``weight_grads`` role).
    logits : numpy.ndarray
    loss : float
        The shard's summed loss (its mean times its rows).
    counters : dict of str to LayerCounters
    """
    wctx = WorkerContext(policy, seed=seed, step=step, training=True, phase=phase,
                         worker=worker)
    out = model.forward(x, wctx)
    loss = lossf(out, y, wctx) * len(y)
    model.backward(lossf.backward(wctx, scale, batch=batch), wctx)
    grads = {name: p.grad for name, p in model.named_parameters().items()}
    return grads, np.asarray(out), loss, wctx.counters


def data_parallel_pass(model, lossf, x, y, ctx: Context, workers: int,
                       allreduce: AllReduce | None, scale: float = 1.0, kfac=None):
    """One training step's forward and backward passes over ``workers`` emulated workers,
    the gradients summed by :func:`ring_allreduce` into every parameter's ``grad``.

    The batch ``x`` (``B`` rows) is cut into ``workers`` contiguous shards
    (``numpy.array_split``: equal when ``workers`` divides ``B``). Worker ``w`` runs the
    forward pass, the loss and the backward pass on its shard under a :class:`WorkerContext`
    (its own random streams), with the loss gradient divided by the global ``B``
    (``SoftmaxCrossEntropy.backward(batch=B)``), so that the sum over the workers of their
    gradients is the gradient of the mean loss over the batch. BatchNorm statistics are those
    of each worker's shard; the running statistics kept are worker 0's (as a framework that
    broadcasts rank 0's buffers). Workers run one after another in this process; nothing
    they compute depends on that order (each starts from the same parameters and buffers).

    Then, parameter by parameter (in the model's order), the workers' gradients are summed by
    ``allreduce`` (None: float64 sums in the ring's order), seeded by
    ``ctx.key(name, "allreduce")``, and the result is the parameter's ``grad``. The counts go
    to ``ctx.counters`` (the workers' counters, and the role ``"allreduce"`` of each layer).

    Parameters
    ----------
    model : fixedsim.nn.Sequential
    lossf : fixedsim.nn.SoftmaxCrossEntropy
    x, y : numpy.ndarray
        The global batch and its labels (integers, or the target distributions of a mixed
        batch: :func:`fixedsim.nn.mixup.mix_batch`), split by rows.
    ctx : Context
        The step's context (seed, step, policy).
    workers : int
    allreduce : AllReduce or None
    scale : float
        The policy's loss scale (multiplies the loss gradient).
    kfac : fixedsim.nn.KFAC, optional
        The run's K-FAC optimizer. On the steps where it gathers statistics
        (:meth:`~fixedsim.nn.KFAC.gathers_statistics`), each worker computes its shard's
        Kronecker factors right after its backward pass (:meth:`~fixedsim.nn.KFAC.
        batch_factors` with the global ``B``: each weighted by ``shard / B``, so that their
        sum is the global batch's factor), under a :class:`WorkerContext` of its own; the
        factors' upper triangles (:func:`upper_triangle`, as SP-NGD sends them) are summed
        by the same ``allreduce`` (seeded by ``ctx.key("kfac.<factor>", "allreduce")``,
        counted in the layer's ``"allreduce"`` role and in the bytes), mirrored into
        symmetric matrices (:func:`from_upper_triangle`) and set as the optimizer's
        :attr:`~fixedsim.nn.KFAC.reduced_factors`, which its next step folds into the
        running averages. On other steps nothing is sent and
        ``reduced_factors`` is None.

    Returns
    -------
    logits : numpy.ndarray
        The workers' logits, in batch order.
    loss : float
        The mean loss over the batch.
    bytes_per_worker : int
        Bytes the busiest worker sent, over all parameters.
    """
    ar = allreduce if allreduce is not None else AllReduce()
    b = len(y)
    bounds = chunk_bounds(b, workers)
    params = model.named_parameters()
    bufs = model.buffers() if hasattr(model, "buffers") else {}
    start = {k: v.copy() for k, v in bufs.items()}
    kept = None
    grads = {name: [] for name in params}
    gather = kfac is not None and kfac.gathers_statistics()
    if kfac is not None:
        kfac.reduced_factors = None
    factors = [None] * len(bounds)
    logits, total = [], 0.0
    for w, (lo, hi) in enumerate(bounds):
        if lo == hi:  # a last batch shorter than the worker count: nothing to compute
            for name, p in params.items():
                grads[name].append(np.zeros(p.value.shape))
            continue
        for k, v in bufs.items():
            v[...] = start[k]
        g, out, loss, counters = worker_pass(model, lossf, x[lo:hi], y[lo:hi], ctx.policy,
                                             seed=ctx.seed, step=ctx.step, worker=w, batch=b,
                                             scale=scale, phase=ctx.phase)
        total += loss
        for name in params:
            grads[name].append(g[name])
        logits.append(out)
        if kept is None:
            kept = {k: v.copy() for k, v in bufs.items()}
        merge_counters(ctx.counters, counters)
        if gather:  # the worker's factors, from the layers' kept shard input and error
            fctx = WorkerContext(ctx.policy, seed=ctx.seed, step=ctx.step, training=True,
                                 phase=ctx.phase, worker=w)
            factors[w] = kfac.batch_factors(fctx, scale, batch=b)
            merge_counters(ctx.counters, fctx.counters)
    for k, v in bufs.items():
        v[...] = kept[k]
    sent = 0
    for name, p in params.items():
        p.grad, st = ar.reduce(grads[name], seed=ctx.key(name, "allreduce"))
        sent += _count(ctx, _layer_of(name), st)
    if gather:
        sent += _reduce_factors(kfac, factors, ar, ctx)
    return np.concatenate(logits), total / b, sent


def _count(ctx: Context, layer: str, st: AllReduceStats) -> int:
    """Count an all-reduce in ``layer``'s role ``"allreduce"``; the bytes the busiest worker
    sent."""
    from ..counters import StageCounts

    ctx.layer_counters(layer).roles.setdefault("allreduce", StageCounts()).__iadd__(
        st.stage_counts())
    return st.bytes_per_worker


def upper_triangle(m) -> np.ndarray:
    """The upper triangles (diagonal included) of the square matrices on the last two axes of
    ``m``, row by row: shape ``(..., n (n + 1) / 2)``, ``[m00, m01, .., m0n-1, m11, ..]``.

    What a symmetric Kronecker factor sends in SP-NGD's all-reduce (docs/parallel.md): half
    the elements, and a result symmetric by construction (:func:`from_upper_triangle`)."""
    m = np.asarray(m)
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"upper_triangle: square matrices on the last two axes are needed, "
                         f"got shape {m.shape}")
    rows, cols = np.triu_indices(m.shape[-1])
    return m[..., rows, cols]


def from_upper_triangle(t, n: int) -> np.ndarray:
    """The symmetric ``n x n`` matrices whose upper triangles :func:`upper_triangle` packed
    into the last axis of ``t``; each off-diagonal value is written to both of its places."""
    t = np.asarray(t)
    rows, cols = np.triu_indices(n)
    if t.shape[-1:] != rows.shape:
        raise ValueError(f"from_upper_triangle: the last axis must hold n (n + 1) / 2 = "
                         f"{rows.size} values for n = {n}, got shape {t.shape}")
    out = np.empty(t.shape[:-1] + (n, n), t.dtype)
    out[..., rows, cols] = t
    out[..., cols, rows] = t
    return out


def _reduce_factors(kfac, factors, ar: AllReduce, ctx: Context) -> int:
    """Sum the workers' K-FAC factors (``factors[w]``: :meth:`KFAC.batch_factors` of worker
    ``w``, None for an empty shard: zeros) by ``ar``, key by key in :meth:`batch_factors`'
    order, each as its packed upper triangles (:func:`upper_triangle`; the factors are
    symmetric, and SP-NGD sends only the triangle); set the symmetric results as
    ``kfac.reduced_factors``; return the bytes the busiest worker sent."""
    some = next(f for f in factors if f is not None)
    reduced, sent = {}, 0
    for key, first in some.items():
        n = first.shape[-1]
        parts = [np.zeros(first.shape[:-2] + (n * (n + 1) // 2,)) if f is None
                 else upper_triangle(f[key]) for f in factors]
        out, st = ar.reduce(parts, seed=ctx.key(f"kfac.{key}", "allreduce"))
        reduced[key] = from_upper_triangle(np.asarray(out, np.float64), n)
        sent += _count(ctx, key.partition(".")[2], st)
    kfac.reduced_factors = reduced
    return sent
