"""Optimizers that round their state and the updated weights as the numerics policy says, and
learning-rate schedules.

An optimizer step reads each parameter's gradient (in the policy's ``weight_grads`` role,
possibly multiplied by a loss scale), computes in float64, and writes three kinds of result,
each rounded once into its role of the :class:`~fixedsim.nn.Policy`:

- the optimizer state (SGD's momentum buffer, Adam's moments) into ``momentum``;
- the step ``lr * direction`` into ``update``;
- the new weight ``w - step`` into ``weights``, with :func:`fixedsim.sub`: one correct rounding
  of the exact difference. With a STOCHASTIC ``weights`` role this is the stochastic rounding
  of the update of Gupta et al. (ICML 2015): an update far below the weight's quantum still
  moves the weight in expectation, where round-to-nearest would lose it.

A role whose format is None keeps the float64 value. Every stochastic rounding draws from
``ctx.key(f"optim.{name}", purpose)``, so it depends only on the run seed, the step and the
parameter's name: a run resumed from :meth:`Optimizer.state_dict` continues bit for bit.

Schedules (:class:`ConstantLR`, :class:`StepLR`, :class:`CosineLR`) map the base learning rate
and the (fractional) number of epochs done to the learning rate of the next step; the trainer
assigns it to :attr:`Optimizer.lr` before each step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from ..compiling import read_only
from ..formats import FP32, FixedFormat
from ..jit import quant as _q
from ..rounding import Overflow, Rounding
from .core import Context, Parameter
from .policy import _build, _check_keys

__all__ = [
    "Optimizer", "SGD", "Adam", "Schedule", "ConstantLR", "StepLR", "CosineLR",
    "parse_schedule", "schedule_from_dict", "spans_run", "PolyLR",
]

#: The LayerCounters key under which optimizer roundings are counted.
COUNTER_KEY = "optim"


def _number(v, what: str, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """``v`` as a finite float in the given range, else ValueError naming ``what``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a real number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{what} must be {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{what} must be {'<' if high_open else '<='} {high}, got {v!r}")
    return v


class Optimizer:
    """What SGD and Adam share: named parameters, the step count, rounding into roles.

    Parameters
    ----------
    params : dict of str to Parameter, or list of Parameter
        A dict (as :meth:`fixedsim.nn.Sequential.named_parameters` returns) keeps its names; a
        list names its parameters ``p0``, ``p1``, ... The names key the random streams and the
        state.
    lr : float
        The learning rate (>= 0). A public attribute: schedules set it before each step.

    Attributes
    ----------
    steps : int
        Steps taken (Adam's bias correction uses it).
    """

    #: Name in :meth:`to_dict`.
    kind = "optimizer"

    def __init__(self, params, lr):
        if isinstance(params, Parameter):
            raise ValueError("params must be a dict or list of Parameters, not one Parameter "
                             "(wrap it in a list)")
        if isinstance(params, Mapping):
            named = dict(params)
        elif isinstance(params, (list, tuple)):
            named = {f"p{i}": p for i, p in enumerate(params)}
        else:
            raise ValueError(f"params must be a dict of name -> Parameter or a list of "
                             f"Parameters, got {type(params).__name__}")
        if not named:
            raise ValueError("params is empty: nothing to optimize")
        seen = set()
        for name, p in named.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"parameter names must be non-empty strings, got {name!r}")
            if not isinstance(p, Parameter):
                raise ValueError(f"params[{name!r}] must be a fixedsim.nn.Parameter, got "
                                 f"{type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"params[{name!r}]: the same Parameter appears twice")
            seen.add(id(p))
        self.params: dict[str, Parameter] = named
        self.lr = lr
        self.steps = 0

    @property
    def lr(self) -> float:
        """The learning rate of the next step (a finite float >= 0)."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _number(value, "lr", low=0.0)

    # -- rounding helpers ---------------------------------------------------------------------
    @staticmethod
    def _seed(ctx: Context, role, name: str, purpose: str):
        return ctx.key(f"optim.{name}", purpose) if role.stochastic else None

    def _round(self, ctx: Context, role_name: str, x, name: str, purpose: str) -> np.ndarray:
        """float64 ``x`` rounded once into the policy's ``role_name`` (float64 if fmt is None)."""
        role = getattr(ctx.policy, role_name)
        if role.fmt is None:
            return np.asarray(x, dtype=np.float64)
        out, qs = role.apply(x, self._seed(ctx, role, name, purpose), stats=True)
        ctx.layer_counters(COUNTER_KEY).count_role(role_name, qs)
        return out

    @staticmethod
    def _check_grad(name: str, p: Parameter) -> None:
        if p.grad is None:
            raise ValueError(f"parameter {name!r} has no gradient (run backward before step)")
        g = np.asarray(p.grad)
        if g.shape != np.shape(p.value):
            raise ValueError(f"parameter {name!r}: gradient shape {g.shape} differs from the "
                             f"value's {np.shape(p.value)}")

    def _grad(self, name: str, p: Parameter, grad_scale: float) -> np.ndarray:
        self._check_grad(name, p)
        g = np.asarray(p.grad).astype(np.float64)
        return g if grad_scale == 1.0 else g / grad_scale

    def _fused_update(self, ctx: Context, name: str, p: Parameter, grad_scale: float) -> bool:
        """Update ``p`` in one pass where a kernel serves the policy bit for bit (subclasses);
        False leaves it to :meth:`_update`."""
        return False

    def _apply_step(self, ctx: Context, name: str, p: Parameter, step: np.ndarray) -> None:
        """``p.value = w - step`` rounded once into the weights role."""
        role = ctx.policy.weights
        w = np.asarray(p.value)
        if role.fmt is None:
            p.value = w.astype(np.float64) - step
        else:
            # w + (-step) is w - step in IEEE arithmetic, zero signs included; add_into
            # quantizes the float64 difference when it is exact (same bits and draws as
            # fs.sub), else calls fs.add.
            p.value = ctx.add_into("weights", w, -np.asarray(step), f"optim.{name}", "weights",
                                   count_as=COUNTER_KEY)

    def _check_step_args(self, ctx, grad_scale) -> float:
        if not isinstance(ctx, Context):
            raise TypeError(f"ctx must be a fixedsim.nn.Context, got {type(ctx).__name__}")
        return _number(grad_scale, "grad_scale", low=0.0, low_open=True)

    def step(self, ctx: Context, grad_scale: float = 1.0) -> None:
        """Update every parameter from its gradient divided by ``grad_scale``.

        Parameters
        ----------
        ctx : Context
            Gives the policy, the random streams (keyed by ``ctx.step``) and the counters
            (``ctx.counters["optim"]``).
        grad_scale : float, default 1.0
            The loss scale the gradients carry; divided out in float64 (exactly for a power of
            two, barring underflow).
        """
        grad_scale = self._check_step_args(ctx, grad_scale)
        for name, p in self.params.items():  # every gradient checked before any update
            self._check_grad(name, p)
        self.steps += 1
        for name, p in self.params.items():
            self._update_one(ctx, name, p, grad_scale)

    def _update_one(self, ctx: Context, name: str, p: Parameter, grad_scale: float) -> None:
        """Update ``p`` from its gradient: the one-pass kernel where it serves, else
        :meth:`_update`."""
        if not (_FUSED and self._fused_update(ctx, name, p, grad_scale)):
            self._update(ctx, name, p, self._grad(name, p, grad_scale))

    def _update(self, ctx, name, p, g):  # pragma: no cover - interface
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------------
    def _buffers(self) -> dict[str, dict[str, np.ndarray]]:
        """{prefix: {param name: array}} of every state buffer (subclasses)."""
        return {}

    def state_dict(self) -> dict:
        """The optimizer state as plain data: ``step`` (int), ``lr`` (float) and one array per
        parameter and buffer, keyed ``"<buffer>.<name>"`` (copies)."""
        d = {"step": int(self.steps), "lr": float(self.lr)}
        for prefix, bufs in self._buffers().items():
            for name, arr in bufs.items():
                d[f"{prefix}.{name}"] = np.array(arr, copy=True)
        return d

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output exactly (values and dtypes, bit for bit).

        Raises
        ------
        ValueError
            Missing or unknown keys, or a buffer whose shape does not match its parameter.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        for k in ("step", "lr"):
            if k not in state:
                raise ValueError(f"optimizer state lacks {k!r}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"optimizer state 'step' must be an int >= 0, got {step!r}")
        prefixes = list(self._buffers())
        loaded = {prefix: {} for prefix in prefixes}
        for key, v in state.items():
            if key in ("step", "lr"):
                continue
            prefix, name = _split_key(key, prefixes)
            if prefix is None or name not in self.params:
                raise ValueError(f"optimizer state: unknown key {key!r} for {type(self).__name__}"
                                 f" over parameters {sorted(self.params)}")
            arr = np.asarray(v)
            if arr.shape != np.shape(self.params[name].value):
                raise ValueError(f"optimizer state {key!r}: shape {arr.shape} differs from the "
                                 f"parameter's {np.shape(self.params[name].value)}")
            loaded[prefix][name] = np.array(arr, copy=True)
        for prefix, bufs in loaded.items():
            if step > 0 and len(bufs) != len(self.params):
                missing = sorted(set(self.params) - set(bufs))
                raise ValueError(f"optimizer state at step {step} lacks {prefix!r} buffers of "
                                 f"{missing}")
        lr = state["lr"]
        self.lr = lr
        self.steps = int(step)
        self._load_buffers(loaded)

    def _load_buffers(self, loaded):  # pragma: no cover - interface
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The hyperparameters as plain data (for run records)."""
        return {"name": self.kind, "lr": self.lr}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({len(self.params)} parameters, {args})"


def _split_key(key, prefixes):
    """('prefix', 'name') for ``key`` = 'prefix.name' with a known prefix, else (None, None)."""
    if not isinstance(key, str):
        return None, None
    for prefix in sorted(prefixes, key=len, reverse=True):
        if key.startswith(prefix + "."):
            return prefix, key[len(prefix) + 1:]
    return None, None


#: Let SGD update a parameter in one pass (:func:`fixedsim.jit.optim.sgd_step`) where it
#: serves the policy bit for bit; tests switch it off to compare with the separate passes.
_FUSED = True

#: The purposes (random streams) of the three roundings of an SGD step, in the kernel's rows.
_SGD_PURPOSES = ("momentum", "update", "weights")


def _fused_role(role, stored: bool):
    """``(kind, mode, random_bits, 2**f, 2**-f, max code, min code)`` of the kernel of
    :mod:`fixedsim.jit.optim` for ``role``, or None where it does not serve the role bit for
    bit. ``stored``: the result is kept in a float32 array (momentum, weights), so the role
    needs a float32 container and a format (None keeps float64)."""
    from ..jit import optim as _ko
    from ..quantize import _check_random_bits, resolve_overflow

    fmt = role.fmt
    if fmt is None:
        return None if stored else (_ko.NONE, 0, 0, 0.0, 0.0, 0.0, 0.0)
    overflow = resolve_overflow(fmt, role.overflow)
    if fmt == FP32 and role.rounding is Rounding.NEAREST_EVEN and overflow is Overflow.INFINITY:
        # the float32 conversion: quantize's "f32_cast" path; for w - step, round to odd at
        # 53 bits first, as fs.add does
        return (_ko.F32, 0, 0, 0.0, 0.0, 0.0, 0.0)
    if (isinstance(fmt, FixedFormat) and fmt.signed and overflow is Overflow.SATURATE
            and fmt.word_length <= 51 and 0 <= fmt.frac_length < 1000
            and fmt.dtype == np.float32):
        # quantize's "fixed_from_float" path (float64 input, counted) and fs.add's
        # grid-aligned sum (a saturating format of at most 51 bits)
        f = fmt.frac_length
        return (_ko.FIXED, int(role.rounding), _check_random_bits(role.rounding, role.random_bits),
                math.ldexp(1.0, f), math.ldexp(1.0, -f), float(fmt.max_code),
                float(fmt.min_code))
    return None


def _sgd_tables(policy):
    """``(kinds, grid, stochastic)`` of the roles momentum, update, weights for
    :func:`fixedsim.jit.optim.sgd_step`, or None when one role is not served."""
    rows = (_fused_role(policy.momentum, True), _fused_role(policy.update, False),
            _fused_role(policy.weights, True))
    if any(r is None for r in rows):
        return None
    kinds = np.array([r[:3] for r in rows], np.int64)
    grid = np.array([r[3:] for r in rows], np.float64)
    for a in (kinds, grid):
        a.setflags(write=False)
    stochastic = tuple(getattr(policy, n).stochastic for n in ("momentum", "update", "weights"))
    return kinds, grid, stochastic


def _add_params(role, key):
    """``(P, Psr, U, D)`` of :func:`fixedsim.jit.arith.arith_one` for a sum rounded into
    ``role``, as :func:`fixedsim.add` builds them (``key``: the role's random key)."""
    from ..quantize import _check_random_bits, _kernel_params, resolve_overflow

    overflow = resolve_overflow(role.fmt, role.overflow)
    rbits = _check_random_bits(role.rounding, role.random_bits)
    P, U, D = _kernel_params(role.fmt, role.rounding, overflow, rbits)
    Psr = _kernel_params(role.fmt, Rounding.NEAREST_EVEN, overflow, rbits)[0]
    U = U.copy()
    U[_q.U_KEY] = key
    U.setflags(write=False)
    return P, Psr, U, D


def _flat_read_only(a: np.ndarray) -> np.ndarray:
    """A read-only flat view (one compiled signature whatever the caller's flags)."""
    return read_only(np.ascontiguousarray(a).reshape(-1))


def _stats(size, row):
    from ..quantize import QuantStats

    return QuantStats(size=size, inexact=int(row[0]), rounded_up=int(row[1]),
                      overflow=int(row[2]), underflow=int(row[3]), subnormal=int(row[4]), nan=0)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum (PyTorch's convention), rounded by the policy.

    For each parameter with value ``w`` and gradient ``grad``, in float64:

    1. ``g = grad / grad_scale + weight_decay * w``;
    2. with momentum: ``v = mu * v + g`` computed in float64, then rounded into the
       ``momentum`` role (``v`` starts at zero, so the first step stores ``g``); the direction
       is ``g + mu * v`` (Nesterov) or ``v``; without momentum it is ``g``;
    3. ``step = lr * direction`` computed in float64, then rounded into the ``update`` role;
    4. ``w = w - step``, rounded once, from the exact difference, into the ``weights`` role
       (:func:`fixedsim.sub`): this is the rounding Gupta et al. make stochastic.

    Steps 2 and 3 round the float64 value of an expression whose exact value can need more
    than 53 bits (``mu`` and ``lr`` are float64 numbers); for roles of up to 24 significant
    bits the two roundings differ from one only when the float64 value lands exactly on a
    rounding boundary of the role. A role whose format is None keeps the float64 value.

    Where the roles are FP32 nearest even, saturating fixed point or (the step) unrounded, as
    in every preset, each parameter is updated in one pass of a Numba kernel
    (:func:`fixedsim.jit.optim.sgd_step`) that evaluates the same float64 expressions and
    makes the same roundings, random draws and counts as the steps above, bit for bit; other
    roles and non-finite values take the separate passes.

    Parameters
    ----------
    params : dict of str to Parameter, or list of Parameter
    lr : float
        >= 0.
    momentum : float, default 0.0
        ``mu`` in [0, 1).
    nesterov : bool, default False
        Nesterov momentum (needs ``momentum > 0``).
    weight_decay : float, default 0.0
        L2 penalty (>= 0) added to the gradient.

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> from fixedsim.nn.optim import SGD
    >>> p = fs.nn.Parameter("w", np.array([1.0, -0.5]))
    >>> p.grad = np.array([0.5, 0.25])
    >>> opt = SGD([p], lr=0.1, momentum=0.9)
    >>> opt.step(fs.nn.Context(fs.nn.Policy.exact()))
    >>> p.value
    array([ 0.95 , -0.525])

    Under Gupta et al.'s Q<16,14> with round-to-nearest, a step below half a quantum
    (``2**-15``) is lost; stochastic rounding keeps it in expectation:

    >>> pol = fs.nn.Policy.fixed(16, 14, "nearest_even")
    >>> p = fs.nn.Parameter("w", np.full(4, 0.5, np.float32))
    >>> p.grad = np.full(4, 2.0**-16, np.float32)
    >>> SGD([p], lr=1.0).step(fs.nn.Context(pol))
    >>> p.value
    array([0.5, 0.5, 0.5, 0.5], dtype=float32)
    >>> pol = fs.nn.Policy.fixed(16, 14, "stochastic")
    >>> p = fs.nn.Parameter("w", np.full(10000, 0.5, np.float32))
    >>> p.grad = np.full(10000, 2.0**-16, np.float32)
    >>> SGD([p], lr=1.0).step(fs.nn.Context(pol, seed=1))
    >>> bool(0.2 < np.mean(p.value == 0.5 - 2.0**-14) < 0.3)   # down one quantum w.p. 1/4
    True
    """

    kind = "sgd"

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum = _number(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov momentum requires momentum > 0")
        self.weight_decay = _number(weight_decay, "weight_decay", low=0.0)
        self.buffers: dict[str, np.ndarray] = {}

    def _fused_update(self, ctx, name, p, grad_scale):
        """The step of ``p`` in one pass of :func:`fixedsim.jit.optim.sgd_step`: the same
        float64 expressions, roundings, random draws and counts as :meth:`_update`, bit for
        bit. Serves roles FP32 nearest even, saturating fixed point (float32 container) and an
        unrounded update, for float32 weights, gradients and momentum; False (nothing done)
        otherwise, or when an element is not finite or a weight is off its grid."""
        from ..jit import optim as _ko
        from ..quantize import random_key

        tables = _sgd_tables(ctx.policy)
        w, gr = p.value, p.grad
        if (tables is None or not isinstance(w, np.ndarray) or not isinstance(gr, np.ndarray)
                or w.dtype != np.float32 or gr.dtype != np.float32 or w.size == 0):
            return False
        mu = self.momentum
        v = self.buffers.get(name) if mu else None
        if v is not None and not (isinstance(v, np.ndarray) and v.dtype == np.float32
                                  and v.shape == w.shape):
            return False
        kinds, grid, stochastic = tables
        keys = np.array([random_key(ctx.key(f"optim.{name}", purpose)) if st else 0
                         for purpose, st in zip(_SGD_PURPOSES, stochastic, strict=True)],
                        np.uint64)
        keys.setflags(write=False)
        hyper = np.array([self.lr, mu, self.weight_decay, grad_scale], np.float64)
        flags = np.array([mu != 0.0, v is not None, self.nesterov], np.int64)
        for a in (hyper, flags):
            a.setflags(write=False)
        wf = _flat_read_only(w)
        w_out = np.empty(w.shape, np.float32)
        v_out = np.empty(w.shape if mu else (0,), np.float32)
        counts, slow = _ko.sgd_step(_flat_read_only(gr), wf,
                                    wf if v is None else _flat_read_only(v),
                                    w_out.reshape(-1), v_out.reshape(-1), hyper, flags, kinds,
                                    grid, keys, *_add_params(ctx.policy.weights, keys[2]))
        if slow:
            return False
        lc = ctx.layer_counters(COUNTER_KEY)
        if mu:
            self.buffers[name] = v_out
            lc.count_role("momentum", _stats(w.size, counts[_ko.R_MOMENTUM]))
        if ctx.policy.update.fmt is not None:
            lc.count_role("update", _stats(w.size, counts[_ko.R_UPDATE]))
        lc.count_role("weights", _stats(w.size, counts[_ko.R_WEIGHTS]))
        p.value = w_out
        return True

    def _update(self, ctx, name, p, g):
        mu = self.momentum
        if self.weight_decay:
            g = g + self.weight_decay * np.asarray(p.value, np.float64)
        if mu:
            v = self.buffers.get(name)
            if v is None:
                v = np.zeros(g.shape)
            v = self._round(ctx, "momentum", mu * np.asarray(v, np.float64) + g, name,
                            "momentum")
            self.buffers[name] = v
            d = g + mu * np.asarray(v, np.float64) if self.nesterov else v
        else:
            d = g
        step = self._round(ctx, "update", self.lr * np.asarray(d, np.float64), name, "update")
        self._apply_step(ctx, name, p, step)

    def _buffers(self):
        return {"momentum": self.buffers} if self.momentum else {}

    def _load_buffers(self, loaded):
        self.buffers = dict(loaded.get("momentum", {}))

    def to_dict(self) -> dict:
        return {"name": self.kind, "lr": self.lr, "momentum": self.momentum,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015) with PyTorch's update rule, rounded by the policy.

    For each parameter, at step ``t`` (1, 2, ...), in float64:

    1. ``g = grad / grad_scale + weight_decay * w`` (L2 penalty, as ``torch.optim.Adam``; not
       AdamW's decoupled decay);
    2. ``m = b1 * m + (1 - b1) * g`` and ``v = b2 * v + (1 - b2) * g * g``, each evaluated in
       float64 and rounded once into the ``momentum`` role (zero at the start);
    3. ``step = lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)``, evaluated in
       float64 and rounded once into the ``update`` role;
    4. ``w = w - step``, rounded once into the ``weights`` role (:func:`fixedsim.sub`).

    Parameters
    ----------
    params : dict of str to Parameter, or list of Parameter
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
        Each in [0, 1).
    eps : float, default 1e-8
        >= 0.
    weight_decay : float, default 0.0
        >= 0.

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> from fixedsim.nn.optim import Adam
    >>> p = fs.nn.Parameter("w", np.array([1.0, -1.0]))
    >>> p.grad = np.array([3.0, -0.001])
    >>> opt = Adam({"w": p}, lr=0.01)
    >>> opt.step(fs.nn.Context(fs.nn.Policy.exact()))
    >>> p.value.round(6)          # the first step moves each weight by about lr
    array([ 0.99, -0.99])
    >>> sorted(opt.state_dict())
    ['adam.m.w', 'adam.v.w', 'lr', 'step']
    """

    kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = tuple(_number(b, f"betas[{i}]", low=0.0, high=1.0, high_open=True)
                           for i, b in enumerate(betas))
        self.eps = _number(eps, "eps", low=0.0)
        self.weight_decay = _number(weight_decay, "weight_decay", low=0.0)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def _update(self, ctx, name, p, g):
        b1, b2 = self.betas
        t = self.steps
        if self.weight_decay:
            g = g + self.weight_decay * np.asarray(p.value, np.float64)
        m = np.asarray(self.m.get(name, 0.0), np.float64)
        v = np.asarray(self.v.get(name, 0.0), np.float64)
        m = self._round(ctx, "momentum", b1 * m + (1.0 - b1) * g, name, "adam.m")
        v = self._round(ctx, "momentum", b2 * v + (1.0 - b2) * (g * g), name, "adam.v")
        self.m[name], self.v[name] = m, v
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        denom = np.sqrt(np.asarray(v, np.float64)) / math.sqrt(bc2) + self.eps
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = (self.lr / bc1) * np.asarray(m, np.float64) / denom
        step = self._round(ctx, "update", raw, name, "update")
        self._apply_step(ctx, name, p, step)

    def _buffers(self):
        return {"adam.m": self.m, "adam.v": self.v}

    def _load_buffers(self, loaded):
        self.m = dict(loaded["adam.m"])
        self.v = dict(loaded["adam.v"])

    def to_dict(self) -> dict:
        return {"name": self.kind, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}


# -- learning-rate schedules ------------------------------------------------------------------
class Schedule:
    """A learning-rate schedule: ``schedule(base_lr, epoch)`` is the learning rate of the step
    taken after ``epoch`` (fractional) epochs of training."""

    name = "schedule"

    def __call__(self, base_lr: float, epoch: float) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def to_dict(self) -> dict:
        """Plain data: ``name`` and the fields (:func:`schedule_from_dict` inverts it)."""
        return {"name": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def _check(base_lr, epoch):
        return _number(base_lr, "base_lr", low=0.0), _number(epoch, "epoch", low=0.0)


@dataclasses.dataclass(frozen=True)
class ConstantLR(Schedule):
    """The base learning rate throughout.

    Examples
    --------
    >>> from fixedsim.nn.optim import ConstantLR
    >>> ConstantLR()(0.1, 7.5)
    0.1
    """

    name = "constant"

    def __call__(self, base_lr, epoch):
        base_lr, _ = self._check(base_lr, epoch)
        return base_lr

    def __str__(self):
        return "constant"


@dataclasses.dataclass(frozen=True)
class StepLR(Schedule):
    """Multiply the learning rate by ``gamma`` every ``step_size`` whole epochs:
    ``base_lr * gamma ** floor(epoch / step_size)``.

    Parameters
    ----------
    step_size : int
        >= 1.
    gamma : float, default 0.1
        > 0.

    Examples
    --------
    >>> from fixedsim.nn.optim import StepLR
    >>> s = StepLR(5, 0.5)
    >>> [s(0.1, e) for e in (0, 4.99, 5, 10.2)]
    [0.1, 0.1, 0.05, 0.025]
    """

    step_size: int
    gamma: float = 0.1
    name = "step"

    def __post_init__(self):
        if (isinstance(self.step_size, bool) or not isinstance(self.step_size, (int, np.integer))
                or self.step_size < 1):
            raise ValueError(f"StepLR step_size must be an int >= 1, got {self.step_size!r}")
        object.__setattr__(self, "step_size", int(self.step_size))
        object.__setattr__(self, "gamma", _number(self.gamma, "StepLR gamma", low=0.0,
                                                  low_open=True))

    def __call__(self, base_lr, epoch):
        base_lr, epoch = self._check(base_lr, epoch)
        return base_lr * self.gamma ** math.floor(epoch / self.step_size)

    def __str__(self):
        return f"step:{self.step_size}:{_short(self.gamma)}"


class _Annealing(Schedule):
    """What :class:`CosineLR` and :class:`PolyLR` share (fields ``total_epochs``, ``min_lr``,
    ``warmup_epochs``): a linear warm-up from ``min_lr``, the class's decay (``_decay(base_lr,
    min_lr, s)``, ``s`` the fraction of the annealing done), ``min_lr`` from ``total_epochs``
    on, the result held in ``[min_lr, base_lr]``."""

    def _check_fields(self):
        what = type(self).__name__
        total = _number(self.total_epochs, f"{what} total_epochs", low=0.0, low_open=True)
        object.__setattr__(self, "total_epochs", total)
        object.__setattr__(self, "min_lr", _number(self.min_lr, f"{what} min_lr", low=0.0))
        object.__setattr__(self, "warmup_epochs",
                           _number(self.warmup_epochs, f"{what} warmup_epochs", low=0.0,
                                   high=total, high_open=True))

    def _decay(self, base_lr, lo, s):  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, base_lr, epoch):
        base_lr, epoch = self._check(base_lr, epoch)
        lo = self.min_lr
        if epoch >= self.total_epochs:
            return lo
        if epoch < self.warmup_epochs:
            lr = lo + (base_lr - lo) * (epoch / self.warmup_epochs)
        else:
            lr = self._decay(base_lr, lo, (epoch - self.warmup_epochs)
                             / (self.total_epochs - self.warmup_epochs))
        # exactly base_lr when annealing starts; never outside [min_lr, base_lr] by rounding
        return min(max(lr, min(lo, base_lr)), max(lo, base_lr))

    def _text(self, head: str) -> str:
        """``head`` followed by ``:MIN_LR[:WARMUP_EPOCHS]`` where they are not 0."""
        if self.min_lr or self.warmup_epochs:
            head += f":{_short(self.min_lr)}"
        if self.warmup_epochs:
            head += f":{_short(self.warmup_epochs)}"
        return head


@dataclasses.dataclass(frozen=True)
class CosineLR(_Annealing):
    """Linear warmup, then cosine annealing from the base learning rate down to ``min_lr``.

    For ``epoch < warmup_epochs`` the rate rises linearly from ``min_lr`` (at epoch 0) to
    ``base_lr``; then it is ``min_lr + (base_lr - min_lr) * (1 + cos(pi * s)) / 2`` with ``s``
    the fraction of the remaining ``total_epochs - warmup_epochs`` done (Loshchilov and
    Hutter's SGDR without restarts); from ``total_epochs`` on it stays ``min_lr``.

    Parameters
    ----------
    total_epochs : float
        > 0.
    min_lr : float, default 0.0
        >= 0.
    warmup_epochs : float, default 0.0
        In [0, total_epochs).

    Examples
    --------
    >>> from fixedsim.nn.optim import CosineLR
    >>> s = CosineLR(10)
    >>> [round(s(0.1, e), 6) for e in (0, 5, 10, 12)]
    [0.1, 0.05, 0.0, 0.0]
    >>> w = CosineLR(10, min_lr=0.001, warmup_epochs=1)
    >>> [round(w(0.1, e), 6) for e in (0, 0.5, 1, 10)]
    [0.001, 0.0505, 0.1, 0.001]
    """

    total_epochs: float
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    name = "cosine"

    def __post_init__(self):
        self._check_fields()

    def _decay(self, base_lr, lo, s):
        return base_lr - (base_lr - lo) * (0.5 * (1.0 - math.cos(math.pi * s)))

    def __str__(self):
        return self._text(f"cosine:{_short(self.total_epochs)}")


@dataclasses.dataclass(frozen=True)
class PolyLR(_Annealing):
    """Linear warm-up, then polynomial decay from the base learning rate down to ``min_lr``:
    ``min_lr + (base_lr - min_lr) * (1 - s) ** power``, ``s`` the fraction of the
    ``total_epochs - warmup_epochs`` after the warm-up done; from ``total_epochs`` on it stays
    ``min_lr``. The large-batch recipe of Osawa et al. (CVPR 2019, SP-NGD) decays the
    learning rate (and the damping) polynomially after a warm-up (docs/kfac.md).

    Parameters
    ----------
    total_epochs : float
        > 0.
    power : float, default 2.0
        > 0.
    min_lr : float, default 0.0
        >= 0.
    warmup_epochs : float, default 0.0
        In [0, total_epochs): the rate rises linearly from ``min_lr`` to ``base_lr``.

    Examples
    --------
    >>> from fixedsim.nn.optim import PolyLR
    >>> s = PolyLR(10, power=2)
    >>> [round(s(0.1, e), 6) for e in (0, 5, 10, 12)]
    [0.1, 0.025, 0.0, 0.0]
    >>> w = PolyLR(10, power=1, min_lr=0.001, warmup_epochs=1)
    >>> [round(w(0.1, e), 6) for e in (0, 0.5, 1, 5.5, 10)]
    [0.001, 0.0505, 0.1, 0.0505, 0.001]
    """

    total_epochs: float
    power: float = 2.0
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    name = "poly"

    def __post_init__(self):
        self._check_fields()
        object.__setattr__(self, "power", _number(self.power, "PolyLR power", low=0.0,
                                                  low_open=True))

    def _decay(self, base_lr, lo, s):
        return lo + (base_lr - lo) * (1.0 - s) ** self.power

    def __str__(self):
        return self._text(f"poly:{_short(self.total_epochs)}:{_short(self.power)}")


def _short(x: float) -> str:
    """The shortest text that parses back to ``x`` exactly (``10`` rather than ``10.0``)."""
    return str(int(x)) if x.is_integer() and abs(x) < 2 ** 53 else repr(x)


_SCHEDULES = {"constant": ConstantLR, "step": StepLR, "cosine": CosineLR, "poly": PolyLR}
_FORMS = ("constant, step:STEP_SIZE[:GAMMA], cosine[:TOTAL_EPOCHS|run[:MIN_LR[:WARMUP_EPOCHS]]], "
          "poly:TOTAL_EPOCHS[:POWER[:MIN_LR[:WARMUP_EPOCHS]]]")


def parse_schedule(text: str, epochs: int | None = None) -> Schedule:
    """A schedule from its command-line spelling.

    ``constant``; ``step:STEP_SIZE[:GAMMA]`` (GAMMA default 0.1);
    ``cosine:TOTAL_EPOCHS[:MIN_LR[:WARMUP_EPOCHS]]``; ``cosine`` alone, or ``run`` as
    TOTAL_EPOCHS (``cosine:run:0.001``), anneals over the run's ``epochs``, which must then be
    given; ``poly:TOTAL_EPOCHS[:POWER[:MIN_LR[:WARMUP_EPOCHS]]]`` (:class:`PolyLR`, POWER
    default 2). ``str(schedule)`` gives the spelling back (with the run's epochs written out).

    Parameters
    ----------
    text : str
    epochs : int, optional
        The run's epochs, for ``cosine`` over the run.

    Raises
    ------
    ValueError
        An unknown name, a wrong number of fields, or a bad value.

    Examples
    --------
    >>> from fixedsim.nn.optim import parse_schedule
    >>> parse_schedule("step:5:0.1")
    StepLR(step_size=5, gamma=0.1)
    >>> parse_schedule("cosine:10:0.001")
    CosineLR(total_epochs=10.0, min_lr=0.001, warmup_epochs=0.0)
    >>> parse_schedule("cosine", epochs=3)
    CosineLR(total_epochs=3.0, min_lr=0.0, warmup_epochs=0.0)
    >>> parse_schedule("linear:3")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown schedule 'linear:3'; expected constant, step:STEP_SIZE[:GAMMA], ...
    >>> parse_schedule("poly:30:2:0:5")
    PolyLR(total_epochs=30.0, power=2.0, min_lr=0.0, warmup_epochs=5.0)
    """
    if not isinstance(text, str):
        raise ValueError(f"schedule must be a string, got {text!r}")
    kind, *fields = text.strip().split(":")
    kind = kind.strip().lower()
    if kind not in _SCHEDULES:
        raise ValueError(f"unknown schedule {text!r}; expected {_FORMS}")
    nmax = {"constant": 0, "step": 2, "cosine": 3, "poly": 4}[kind]
    nmin = 0 if kind in ("constant", "cosine") else 1
    if not nmin <= len(fields) <= nmax:
        raise ValueError(f"schedule {text!r}: {kind} takes {nmin} to {nmax} ':'-separated "
                         f"fields, got {len(fields)}; expected {_FORMS}")
    try:
        if kind == "constant":
            return ConstantLR()
        if kind == "step":
            try:
                size = int(fields[0])
            except ValueError:
                raise ValueError(f"STEP_SIZE must be an integer, got {fields[0]!r}") from None
            return StepLR(size, *(_parse_float(f, "GAMMA") for f in fields[1:]))
        if kind == "poly":
            names = ("TOTAL_EPOCHS", "POWER", "MIN_LR", "WARMUP_EPOCHS")
            return PolyLR(*(_parse_float(f, n) for f, n in zip(fields, names, strict=False)))
        if not fields or fields[0].strip().lower() == "run":
            if epochs is None:
                raise ValueError("cosine over the run's epochs needs them: give the run's "
                                 "epochs, or TOTAL_EPOCHS (cosine:TOTAL_EPOCHS)")
            fields = [str(epochs), *fields[1:]]
        names = ("TOTAL_EPOCHS", "MIN_LR", "WARMUP_EPOCHS")
        return CosineLR(*(_parse_float(f, n) for f, n in zip(fields, names, strict=False)))
    except ValueError as err:
        raise ValueError(f"schedule {text!r}: {err}") from None


def spans_run(text: str) -> bool:
    """Whether the schedule spelled ``text`` anneals over the run's epochs (``cosine``,
    ``cosine:run...``), so that it changes with them.

    Examples
    --------
    >>> from fixedsim.nn.optim import spans_run
    >>> spans_run("cosine"), spans_run("cosine:run:0.001"), spans_run("cosine:3")
    (True, True, False)
    """
    kind, *fields = text.strip().split(":")
    return kind.strip().lower() == "cosine" and (not fields or fields[0].strip().lower() == "run")


def _parse_float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None


def schedule_from_dict(d: Mapping) -> Schedule:
    """Inverse of :meth:`Schedule.to_dict`.

    Examples
    --------
    >>> from fixedsim.nn.optim import CosineLR, schedule_from_dict
    >>> s = CosineLR(10, 0.001, 1.0)
    >>> schedule_from_dict(s.to_dict()) == s
    True
    """
    if not isinstance(d, Mapping) or d.get("name") not in _SCHEDULES:
        raise ValueError(f"schedule: expected a dict with 'name' one of "
                         f"{', '.join(_SCHEDULES)}, got {d!r}")
    cls = _SCHEDULES[d["name"]]
    kw = {k: v for k, v in d.items() if k != "name"}
    where = f"schedule {d['name']!r}"
    _check_keys(kw, {f.name for f in dataclasses.fields(cls)}, where)
    return _build(cls, where, **kw)
