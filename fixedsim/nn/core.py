"""What every layer shares: parameters, the numerics context of a step, per-layer counters.

A :class:`Context` carries the :class:`~fixedsim.nn.Policy`, the run seed and the step, and
derives every random stream from them: the draw of a stochastic rounding depends only on
``(seed, phase, step, layer, purpose)``, so a run resumed from a checkpoint at step ``s``
continues bit for bit, and results do not depend on thread counts.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from .. import counters as _counters
from ..matmul import MatmulSpec
from ..quantize import child_seed
from ..rounding import Rounding
from .policy import Policy

__all__ = ["Parameter", "Module", "Context", "LayerCounters"]


class Parameter:
    """A trainable tensor: its value (held in the policy's weight role) and its gradient.

    Attributes
    ----------
    name : str
    value : numpy.ndarray
    grad : numpy.ndarray or None
        Set by the layer's backward pass (in the weight-gradient role).
    """

    __slots__ = ("name", "value", "grad")

    def __init__(self, name: str, value: np.ndarray):
        self.name = name
        self.value = value
        self.grad = None

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={self.value.shape}, dtype={self.value.dtype})"


@dataclasses.dataclass
class LayerCounters:
    """Counts of one layer: its matrix products and the roundings into each role.

    Attributes
    ----------
    products : fixedsim.counters.Counters
        Every matrix product of the layer (forward and backward), with MACs and which kernel ran.
    roles : dict of str to fixedsim.counters.StageCounts
        Roundings into each role (``"activations"``, ``"errors"``, ...) by this layer.
    forward_seconds, backward_seconds : float
        Wall time of the layer's forward and backward passes (measured by
        :class:`~fixedsim.nn.Sequential`).
    reuse : fixedsim.counters.ReuseCounts
        What Adaptive Deep Reuse did in the layer (all zero without reuse).
    approx : fixedsim.counters.ApproxCounts
        What column-row sampling did in the layer (all zero without it).
    """

    products: _counters.Counters = dataclasses.field(default_factory=_counters.Counters)
    roles: dict = dataclasses.field(default_factory=dict)
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    reuse: _counters.ReuseCounts = dataclasses.field(default_factory=_counters.ReuseCounts)
    approx: _counters.ApproxCounts = dataclasses.field(default_factory=_counters.ApproxCounts)

    def count_role(self, role: str, qs) -> None:
        if qs is None:
            return
        s = self.roles.setdefault(role, _counters.StageCounts())
        s += _counters.StageCounts(roundings=qs.size, inexact=qs.inexact, overflow=qs.overflow,
                                   underflow=qs.underflow, subnormal=qs.subnormal, nan=qs.nan)

    def __iadd__(self, other: LayerCounters) -> LayerCounters:
        self.products += other.products
        self.forward_seconds += other.forward_seconds
        self.backward_seconds += other.backward_seconds
        self.reuse += other.reuse
        self.approx += other.approx
        for k, v in other.roles.items():
            self.roles.setdefault(k, _counters.StageCounts()).__iadd__(v)
        return self

    def as_dict(self) -> dict:
        """Flat dict: ``macs``, ``products.accumulator.overflow``, ``activations.overflow``, ..."""
        d = {f"products.{k}" if k not in ("macs", "calls") else k: v
             for k, v in self.products.as_dict().items()}
        for role, s in sorted(self.roles.items()):
            for f in dataclasses.fields(s):
                d[f"{role}.{f.name}"] = getattr(s, f.name)
        if self.reuse.calls:
            d.update({f"reuse.{k}": v for k, v in self.reuse.as_dict().items()})
        if self.approx.calls:
            d.update({f"approx.{k}": v for k, v in self.approx.as_dict().items()})
        d["forward_seconds"] = self.forward_seconds
        d["backward_seconds"] = self.backward_seconds
        return d


def merge_counters(into: dict, new: dict) -> None:
    """Add the per-layer counters ``new`` (``{layer: LayerCounters}``) into ``into``."""
    for k, v in new.items():
        into.setdefault(k, LayerCounters()).__iadd__(v)


class Context:
    """The numerics of one forward/backward pass: policy, random streams, counters.

    Parameters
    ----------
    policy : Policy
    seed : int, default 0
        The run seed; every stochastic rounding and dropout mask derives from it.
    step : int, default 0
        Optimizer step (training) or batch number (evaluation).
    training : bool, default True
        Dropout and batch statistics act in training only.
    phase : int, default 0
        Separates the random streams of training (0) and evaluation (1) steps.

    Attributes
    ----------
    counters : dict of str to LayerCounters
        Filled by the layers, keyed by layer name.
    """

    def __init__(self, policy: Policy, seed: int = 0, step: int = 0, training: bool = True,
                 phase: int = 0):
        if not isinstance(policy, Policy):
            raise TypeError(f"Context policy must be a fixedsim.nn.Policy, got {policy!r}")
        for name, v in (("seed", seed), ("step", step), ("phase", phase)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"Context {name} must be an int >= 0, got {v!r}")
        self.policy = policy
        self.seed = int(seed)
        self.step = int(step)
        self.phase = int(phase)
        self.training = bool(training)
        self.counters: dict[str, LayerCounters] = {}

    def key(self, layer: str, purpose: str) -> int:
        """The 64-bit seed of one random stream: a function of (seed, phase, step, layer,
        purpose) only."""
        return child_seed(self.seed, self.phase, self.step, zlib.crc32(layer.encode()),
                          zlib.crc32(purpose.encode()))

    def run_key(self, layer: str, purpose: str) -> int:
        """A 64-bit seed of (seed, layer, purpose) only: the same at every step (the
        hyperplanes of a layer's reuse hashing, which must not change between batches)."""
        return child_seed(self.seed, zlib.crc32(layer.encode()), zlib.crc32(purpose.encode()))

    def layer_counters(self, layer: str) -> LayerCounters:
        return self.counters.setdefault(layer, LayerCounters())

    def round(self, role: str, x, layer: str, purpose: str | None = None) -> np.ndarray:
        """Round ``x`` into the policy's ``role``, counting the roundings for ``layer``."""
        r = getattr(self.policy, role)
        if r.fmt is None:
            return np.asarray(x, dtype=np.float64)
        seed = self.key(layer, purpose or role) if r.stochastic else None
        out, qs = r.apply(x, seed, stats=True)
        self.layer_counters(layer).count_role(role, qs)
        return out

    def add_into(self, role: str, a, b, layer: str, purpose: str,
                 count_as: str | None = None) -> np.ndarray:
        """``a + b`` rounded once into ``role`` (exactly, as :func:`fixedsim.add`), seeded by
        ``key(layer, purpose)`` and counted for ``count_as`` (default ``layer``)."""
        from ..arith import add

        r = getattr(self.policy, role)
        # Fast path: when float64 holds every sum exactly (TwoSum error zero, all finite),
        # one quantize of the sums is the single rounding fs.add makes, bit for bit. An exact
        # zero sum takes its sign from the rounding mode (IEEE), so DOWN goes to fs.add.
        checked = _add_checked(a, b)
        if checked is None:
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            s = a64 + b64
            if r.fmt is None:
                return s
            bb = s - a64
            bad = not (np.isfinite(s).all() and not ((a64 - (s - bb)) + (b64 - bb)).any())
            zeros = not s.all()
        else:
            s, bad, zeros = checked
            if r.fmt is None:
                return s
        seed = self.key(layer, purpose) if r.stochastic else None
        exact = not bad and not (r.rounding is Rounding.DOWN and zeros)
        if exact:
            out, qs = r.apply(s, seed, stats=True)
        else:
            out, qs = add(a, b, r.fmt, r.rounding, r.overflow, seed=seed,
                          random_bits=r.random_bits, stats=True)
        self.layer_counters(count_as or layer).count_role(role, qs)
        return out

    def product(self, fn, spec: MatmulSpec, layer: str, purpose: str, *args, **kw):
        """Run a product function of :mod:`fixedsim.matmul` under ``spec``, seeded and counted."""
        seed = self.key(layer, purpose) if spec.stochastic else 0
        out, c = fn(*args, spec=spec, seed=seed, stats=True, **kw)
        self.layer_counters(layer).products += c
        return out

    def round_operand(self, spec: MatmulSpec, x, layer: str, purpose: str) -> np.ndarray:
        """``x`` rounded as ``spec.input`` rounds an operand (unchanged when it is None)."""
        if spec.input is None:
            return x
        from ..quantize import quantize

        seed = (self.key(layer, purpose) if spec.input_rounding is Rounding.STOCHASTIC
                else None)
        out, qs = quantize(x, spec.input, spec.input_rounding, seed=seed,
                           random_bits=spec.random_bits, stats=True)
        self.layer_counters(layer).count_role("operands", qs)
        return out


def _add_checked(a, b):
    """``(a + b in float64, any sum inexact or not finite, any sum zero)`` by one pass of
    :func:`fixedsim.jit.sums.add_checked` when ``a`` is a float32 or float64 array and ``b``
    is a float array of ``a``'s shape or one that broadcasts along leading and trailing axes
    only (a bias: ``(C,)`` against ``(N, C)``, ``(1, C, 1, 1)`` against ``(N, C, H, W)``);
    None otherwise (numpy then computes it)."""
    from ..jit.sums import add_checked

    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            and a.dtype in (np.float32, np.float64) and b.dtype.kind == "f"
            and b.ndim <= a.ndim and a.size):
        return None
    bs = (1,) * (a.ndim - b.ndim) + b.shape
    axes = [i for i, n in enumerate(bs) if n != 1]
    if not axes:
        first, last = 0, -1
    else:
        first, last = axes[0], axes[-1]
        if any(bs[i] != a.shape[i] for i in range(first, last + 1)):
            return None
    P = int(np.prod(a.shape[:first], dtype=np.int64))
    C = int(np.prod(a.shape[first:last + 1], dtype=np.int64))
    s = np.empty(a.shape, np.float64)
    bad, zeros = add_checked(np.ascontiguousarray(a).reshape(P, C, -1),
                             np.ascontiguousarray(b, np.float64).reshape(C),
                             s.reshape(P, C, -1))
    return s, bool(bad), bool(zeros)


class Module:
    """A layer: ``forward(x, ctx)`` and a hand-written ``backward(grad_y, ctx)``.

    ``forward`` keeps what ``backward`` needs; ``backward`` returns the error of the input
    and sets ``grad`` of every parameter. ``name`` is set by the model that holds the layer and
    keys its random streams and counters.
    """

    name = "layer"

    def parameters(self) -> list[Parameter]:
        return []

    def forward(self, x, ctx: Context):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, grad_y, ctx: Context):  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, x, ctx: Context):
        return self.forward(x, ctx)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"
