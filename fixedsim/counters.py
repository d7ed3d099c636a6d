"""Operation and event counters of the emulated arithmetic.

Every :func:`fixedsim.matmul` and :func:`fixedsim.conv2d` call counts, exactly, its
multiply-accumulates, the roundings done at each stage (inputs, products, accumulator, output)
and what they did (inexact, overflow, underflow, subnormal, NaN), and which kernel ran. The
counts of a call are returned with ``stats=True``, and added to every active :func:`record`
block::

    with fixedsim.counters.record() as c:
        y = fixedsim.matmul(a, b, spec)
    print(c.macs, c.accumulator.overflow, c.paths)

What a call counts depends on who reads it:

- nothing (no ``stats=True``, no :func:`record` block): the counts are invisible, and the
  kernels skip the work that only counts (results are the same, bit for bit);
- ``stats=True`` or ``record()``: the counts whose cost does not grow with the number of
  multiply-accumulates, exactly: calls, MACs, the roundings of every stage, the events of the
  input and output roundings (saturations at the output among them) and the kernels that ran.
  The events of the per-step stages, product, alignment (a :class:`~fixedsim.BlockFMA`'s
  terms cut to each block's window) and accumulator (a step's inexact sum, overflow,
  underflow, subnormal), are then ``None``: not counted;
- ``stats="steps"`` or ``record(steps=True)``: every event of every stage, per-step ones
  included, exactly. Counting an FMA chain's inexact steps costs more than the chain itself
  (an FP32 chain on float32 data runs about 10x slower counted), so it is asked for.

Training records what ``stats=True`` gives unless it runs in a ``record(steps=True)`` block
(``fixedsim train --count-steps``, a study's ``count_steps = true``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import ClassVar

import numpy as np

from .jit import quant as _q

__all__ = ["StageCounts", "Counters", "ReuseCounts", "ApproxCounts", "record"]

_FIELDS = ("roundings", "inexact", "overflow", "underflow", "subnormal", "nan")


@dataclasses.dataclass
class StageCounts:
    """Roundings done by one stage, and what they did.

    Attributes
    ----------
    roundings : int
        Rounding operations performed (one per element quantized, per product rounded, per
        accumulator block added, per output element).
    inexact : int
        Roundings whose result differs from the exact value.
    overflow : int
        Roundings whose result was out of range, so the overflow rule applied (saturations,
        wraps, or results sent to infinity).
    underflow : int
        Nonzero exact values rounded to zero.
    subnormal : int
        Results that are nonzero subnormal numbers.
    nan : int
        Results that are NaN.

    The event counts (all but ``roundings``) are None where they were not counted (the
    product and accumulator stages unless per-step events were asked for: see the module
    docstring); a sum with None is None.
    """

    roundings: int = 0
    inexact: int | None = 0
    overflow: int | None = 0
    underflow: int | None = 0
    subnormal: int | None = 0
    nan: int | None = 0

    @classmethod
    def from_flags(cls, flags: np.ndarray, roundings: int) -> StageCounts:
        """From a kernel's event counts (columns ``fixedsim.jit.quant.F_*``)."""
        return cls(roundings=int(roundings), inexact=int(flags[_q.F_INEXACT]),
                   overflow=int(flags[_q.F_OVERFLOW]), underflow=int(flags[_q.F_UNDERFLOW]),
                   subnormal=int(flags[_q.F_SUBNORMAL]), nan=int(flags[_q.F_NAN]))

    def __iadd__(self, other: StageCounts) -> StageCounts:
        for f in _FIELDS:
            x, y = getattr(self, f), getattr(other, f)
            setattr(self, f, None if x is None or y is None else x + y)
        return self

    def forget_events(self) -> None:
        """Mark the event counts as not counted (None); ``roundings`` stays."""
        for f in _FIELDS[1:]:
            setattr(self, f, None)


_STAGES = ("input", "product", "alignment", "accumulator", "output")


@dataclasses.dataclass
class Counters:
    """Counts of one or more matrix products.

    Attributes
    ----------
    calls : int
        Number of :func:`fixedsim.matmul`/:func:`fixedsim.conv2d` calls counted.
    macs : int
        Multiply-accumulates of the products (``M * N * K`` per matrix product, batches
        included), whichever kernel computed them.
    input, product, accumulator, output : StageCounts
        The roundings of each stage.
    alignment : StageCounts
        The alignment of a :class:`~fixedsim.BlockFMA`'s terms (every product, and the running
        sum each block starts from) to the block's window, a cut toward zero: ``roundings``
        counts the terms (zeros included), ``inexact`` the nonzero terms that lost bits,
        ``underflow`` those cut to zero; the other events are 0. A per-step stage: its events
        are counted only when per-step events are asked for. All 0 for other accumulators.
    paths : dict
        How many calls each kernel served (``"exact_blas"``, ``"fp32_chain"``,
        ``"fp32_chain64"``, ``"float_chain"``, ``"fixed_chain"``, ``"exact_filtered"``,
        ``"general"``); ``"exact_filtered_general"``: output elements that path handed to the
        general kernel; and ``"reference"``: output elements computed exactly in Python
        because no kernel could prove its result.
    """

    calls: int = 0
    macs: int = 0
    input: StageCounts = dataclasses.field(default_factory=StageCounts)
    product: StageCounts = dataclasses.field(default_factory=StageCounts)
    alignment: StageCounts = dataclasses.field(default_factory=StageCounts)
    accumulator: StageCounts = dataclasses.field(default_factory=StageCounts)
    output: StageCounts = dataclasses.field(default_factory=StageCounts)
    paths: dict = dataclasses.field(default_factory=dict)

    #: Whether anything reads this call's events (set per call by :mod:`fixedsim.matmul`):
    #: when not, a kernel may leave them uncounted.
    _read: ClassVar[bool] = True
    #: Whether the per-step events (product and accumulator stages) are asked for: when not,
    #: a kernel skips counting them and the call reports them as None.
    _steps: ClassVar[bool] = True

    def __iadd__(self, other: Counters) -> Counters:
        self.calls += other.calls
        self.macs += other.macs
        for s in _STAGES:
            getattr(self, s).__iadd__(getattr(other, s))
        for k, v in other.paths.items():
            self.paths[k] = self.paths.get(k, 0) + v
        return self

    def __add__(self, other: Counters) -> Counters:
        out = Counters()
        out += self
        out += other
        return out

    def as_dict(self) -> dict:
        """Flat dict (``"accumulator.overflow"`` ...), e.g. for a CSV row."""
        d = {"calls": self.calls, "macs": self.macs}
        for s in _STAGES:
            for f in _FIELDS:
                d[f"{s}.{f}"] = getattr(getattr(self, s), f)
        for k, v in sorted(self.paths.items()):
            d[f"paths.{k}"] = v
        return d


@dataclasses.dataclass
class ReuseCounts:
    """What Adaptive Deep Reuse did in a layer (:mod:`fixedsim.reuse`), summed over calls.

    Attributes
    ----------
    calls : int
        Reused forward products.
    rows : int
        Row sub-vectors clustered (rows times blocks, summed over calls).
    clusters : int
        Clusters formed (summed over blocks and calls); ``remain_ratio = clusters / rows``.
    macs, dense_macs : int
        Forward multiply-accumulates performed, and those of the dense layer.
    backward_macs, backward_dense_macs : int
        The same for the backward products (weight and input gradients).
    hash_ops : int
        Multiply-adds of the hashing projections (rows times K times H).
    centroid_adds, gather_adds : int
        Additions forming centroid sums, and adding per-cluster results into outputs.
    hits : int
        Row sub-vectors whose forward product was computed for another.
    table_hits : int
        Row sub-vectors that took a centroid kept from an earlier batch (cross-batch scope).
    dense_path : int
        Forward calls whose spec (an accumulator chain) made the product dense.
    """

    calls: int = 0
    rows: int = 0
    clusters: int = 0
    macs: int = 0
    dense_macs: int = 0
    backward_macs: int = 0
    backward_dense_macs: int = 0
    hash_ops: int = 0
    centroid_adds: int = 0
    gather_adds: int = 0
    hits: int = 0
    table_hits: int = 0
    dense_path: int = 0

    @property
    def remain_ratio(self) -> float:
        """``clusters / rows`` (1.0 when nothing was clustered)."""
        return self.clusters / self.rows if self.rows else 1.0

    def add_stats(self, st) -> None:
        """Add one :class:`fixedsim.reuse.ReuseStats`."""
        self.calls += 1
        self.rows += st.rows * st.blocks
        self.clusters += int(st.clusters.sum())
        self.macs += st.macs
        self.dense_macs += st.dense_macs
        self.hash_ops += st.hash_ops
        self.centroid_adds += st.centroid_adds
        self.gather_adds += st.gather_adds
        self.hits += st.hits
        self.table_hits += st.table_hits
        self.dense_path += st.path == "dense"

    def __iadd__(self, other: ReuseCounts) -> ReuseCounts:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["remain_ratio"] = self.remain_ratio
        return d


@dataclasses.dataclass
class ApproxCounts:
    """What column-row sampling or gradient approximation did in a layer
    (:mod:`fixedsim.approx`), summed over calls.

    Every product of a layer with a sampling setting is counted here (in training passes),
    sampled or not: the backward products of a sampled forward run over the kept pairs only.
    Under a gradient approximation (:class:`fixedsim.approx.GradApprox`) the backward
    products are counted as a sparse kernel performs them, ``pairs`` and ``kept`` count the
    error entries (or, for a stale weight gradient, the gradients due and computed); see
    docs/approx.md.

    Attributes
    ----------
    calls : int
        Products counted.
    sampled : int
        Products whose pairs were sampled.
    pairs, kept : int
        Pairs of the sampled products' inner dimensions, and pairs kept (distinct), summed.
    macs, dense_macs : int
        Forward multiply-accumulates performed, and those of the dense layer.
    backward_macs, backward_dense_macs : int
        The same for the weight- and input-gradient products.
    """

    calls: int = 0
    sampled: int = 0
    pairs: int = 0
    kept: int = 0
    macs: int = 0
    dense_macs: int = 0
    backward_macs: int = 0
    backward_dense_macs: int = 0

    @property
    def keep_ratio(self) -> float:
        """``kept / pairs`` (1.0 when nothing was sampled)."""
        return self.kept / self.pairs if self.pairs else 1.0

    def add(self, product: str, *, pairs: int, kept: int, macs: int, dense_macs: int) -> None:
        """Count one product (``"forward"``, ``"grad_input"`` or ``"grad_weight"``); ``pairs``
        0 for a product that was not sampled."""
        self.calls += 1
        self.sampled += pairs > 0
        self.pairs += pairs
        self.kept += kept
        if product == "forward":
            self.macs += macs
            self.dense_macs += dense_macs
        else:
            self.backward_macs += macs
            self.backward_dense_macs += dense_macs

    def __iadd__(self, other: ApproxCounts) -> ApproxCounts:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep_ratio"] = self.keep_ratio
        return d


_local = threading.local()


def _active() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def record(steps: bool = False):
    """Collect the :class:`Counters` of every matrix product in the block (this thread).

    Blocks nest: an inner block's counts also reach the outer ones.

    Parameters
    ----------
    steps : bool, default False
        Also count the per-step events (product and accumulator stages) of every call made
        in the block, inner blocks included; otherwise they are None (see the module
        docstring).

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16))
    >>> with fs.counters.record() as c:
    ...     _ = fs.matmul(np.ones((2, 3)), np.ones((3, 4)), spec)
    >>> c.calls, c.macs, c.accumulator.roundings, c.accumulator.inexact, c.paths
    (1, 24, 24, None, {'float_chain': 1})
    >>> with fs.counters.record(steps=True) as c:
    ...     _ = fs.matmul(np.full((2, 3), 0.1), np.ones((3, 4)), spec)
    >>> c.accumulator.roundings, c.accumulator.inexact
    (24, 24)
    """
    if not isinstance(steps, bool):
        raise TypeError(f"record: steps must be True or False, got {steps!r}")
    c = Counters()
    stack = _active()
    stack.append(c)
    steps_stack = _steps_active()
    steps_stack.append(steps)
    try:
        yield c
    finally:
        stack.remove(c)
        steps_stack.remove(steps)


def _steps_active() -> list:
    if not hasattr(_local, "steps"):
        _local.steps = []
    return _local.steps


def _recording() -> bool:
    """Whether a :func:`record` block is active in this thread."""
    return bool(_active())


def _recording_steps() -> bool:
    """Whether a :func:`record` block asking for per-step events is active in this thread."""
    return any(_steps_active())


def _publish(c: Counters) -> None:
    """Add ``c`` to every active :func:`record` block."""
    for r in _active():
        r += c
