"""Correctly rounded elementwise arithmetic in a format: add, sub, mul, div, fma.

Each result is the exact real result of the operation on the given operands, rounded **once**
into ``fmt`` with the chosen rounding and overflow rule, exactly as :func:`fixedsim.quantize`
rounds an exact value (see docs/numerics.md). Operands are taken as they are (quantize them
first to model operands in a format); they broadcast against each other like NumPy operands.

The kernels in :mod:`fixedsim.jit.arith` capture the exact result with error-free
transformations; the few elements they cannot prove exact are computed with
:mod:`fixedsim.reference` on fractions (same random draw), so every element is exact.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from . import reference
from .compiling import float64_out, read_only
from .formats import _to_float_toward_zero
from .jit import arith as _ka
from .jit import quant as _q
from .jit.rng import random_u64_array
from .quantize import (
    FLAG_COLUMNS,
    _as_exact_array,
    _check_format,
    _check_random_bits,
    _kernel_params,
    _placeholder,
    random_key,
    resolve_overflow,
    stats_from_counts,
)
from .rounding import Overflow, Rounding

__all__ = ["add", "sub", "mul", "div", "fma"]

_OPS = {"add": _ka.OP_ADD, "mul": _ka.OP_MUL, "div": _ka.OP_DIV, "fma": _ka.OP_FMA}


def _sign(v) -> float:
    """1.0 or -1.0: the sign of a float (-0.0 and -nan included) or of a nonzero Fraction."""
    if isinstance(v, Fraction):
        return 1.0 if v > 0 else -1.0
    return math.copysign(1.0, v)


def _special(op: str, x: float, y: float, z: float) -> float:
    """The IEEE 754 result when an operand is NaN or infinite, or a divisor is zero (the
    finite operands' magnitudes do not matter then, only their signs and whether they are 0).
    fma's product is exact, so finite factors make a finite product: ``fma(x, y, z)`` is
    ``z`` for an infinite or NaN ``z`` then, even where ``x * y`` would overflow float64."""
    with np.errstate(all="ignore"):
        x64, y64, z64 = np.float64(x), np.float64(y), np.float64(z)
        if op == "fma":
            if math.isfinite(x) and math.isfinite(y):
                return float(z)
            return float(x64 * y64 + z64)
        return float({"add": np.add, "mul": np.multiply, "div": np.divide}[op](x64, y64))


def _exact(op: str, x, y, z, rounding: Rounding):
    """The exact result: a Fraction, or a float for IEEE specials and signed zeros.

    Operands are floats, or Fractions (nonzero, finite) for values float64 cannot hold."""
    def finite(v):
        return isinstance(v, Fraction) or math.isfinite(v)

    if not all(finite(v) for v in (x, y, z)) or (op == "div" and y == 0):
        # a Fraction stands in as +-1.0: only its sign counts for a special result
        return _special(op, *(_sign(v) if isinstance(v, Fraction) else v for v in (x, y, z)))
    fx, fy = Fraction(x), Fraction(y)
    if op == "div":
        v = fx / fy
    elif op == "mul":
        v = fx * fy
    elif op == "add":
        v = fx + fy
    else:
        v = fx * fy + Fraction(z)
    if v != 0:
        return v
    # IEEE 754 signs of exact zeros
    if op in ("mul", "div"):
        return math.copysign(0.0, _sign(x) * _sign(y))
    s1 = _sign(x) * _sign(y) if op == "fma" else _sign(x)
    s2 = _sign(z) if op == "fma" else _sign(y)
    if s1 == s2:
        return math.copysign(0.0, s1)
    return -0.0 if rounding is Rounding.DOWN else 0.0


#: Use :func:`fixedsim.jit.arith.add_fixed_grid` where it applies (tests switch it off to
#: compare it with the general kernel).
_GRID_ADD = True


def _grid_params(op, fmt, overflow):
    """``(up, down, cmax, cmin)`` for the grid-aligned sum kernel, or None where it does not
    apply (not a sum, not a saturating fixed-point format, a quantum whose scalings are not
    finite powers of two)."""
    if not (_GRID_ADD and op == "add" and fmt.kind == "fixed"
            and overflow is Overflow.SATURATE and abs(fmt.frac_length) < 1000):
        return None
    f = fmt.frac_length
    return math.ldexp(1.0, f), math.ldexp(1.0, -f), float(fmt.max_code), float(fmt.min_code)


def _on_grid(v, up):
    """How many of ``v`` are integers once scaled by ``up`` (a sample decides the order of
    the operands of the grid-aligned sum kernel; each element is checked there)."""
    with np.errstate(all="ignore"):
        s = v * up
        return int(np.count_nonzero(s == np.floor(s)))


def _placeholders(op, fmt) -> tuple:
    """Operands whose exact result is ``fmt.max``, a value of ``fmt`` (zero is not a value of
    every format: E8M0), so its rounding has no event: the kernels compute these in the
    places of elements with operands that float64 cannot hold (the oracle rounds those)."""
    m = _placeholder(fmt)
    return {"add": (m, 0.0, 0.0), "mul": (m, 1.0, 1.0), "div": (m, 1.0, 1.0),
            "fma": (m, 1.0, 0.0)}[op]


def _operands(op, operands, negate_b, fmt):
    """``(shape, flat, held)``: the broadcast shape; three flat, read-only float64 arrays of
    the broadcast operands (``b`` twice for a two-operand op); and None, or, when an operand
    holds values float64 cannot hold (Python ints beyond 2**53, Fractions, Decimals), the flat
    indices of the elements that involve one and ``{index: (x, y, z)}`` their operands (floats
    and Fractions). At those indices ``flat`` holds operands whose result is ``fmt.max``
    with no event (:func:`_placeholders`); the oracle computes them."""
    arrs, exacts = [], []
    for v, name in zip(operands, "abc", strict=False):
        arr, exact = _as_exact_array(v, name)
        if exact is not None:  # the exact values, in an object array of the operand's shape
            ex = np.full(arr.size, None, dtype=object)
            ex[exact.index] = exact.value
            exact = ex.reshape(arr.shape)
        if negate_b and name == "b":  # negation is exact
            arr = np.negative(arr)
            if exact is not None:
                exact = np.array([None if e is None else -e for e in exact.reshape(-1)],
                                 dtype=object).reshape(exact.shape)
        arrs.append(arr)
        exacts.append(exact)
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrs))
    except ValueError:
        shapes = ", ".join(str(a.shape) for a in arrs)
        raise ValueError(f"{op}: operands do not broadcast together: shapes {shapes}") from None
    flat = []
    for a in arrs:  # read-only views, so read-only operands take the compiled signatures
        flat.append(read_only(np.broadcast_to(a, shape), np.float64).reshape(-1))
    if len(flat) == 2:
        flat.append(flat[1])
        exacts.append(exacts[1])
        arrs.append(arrs[1])
    if all(e is None for e in exacts):
        return shape, flat, None
    full = [np.broadcast_to(np.full(a.shape, None, dtype=object) if e is None else e,
                            shape).reshape(-1) for a, e in zip(arrs, exacts, strict=True)]
    held = np.flatnonzero(np.any([np.not_equal(f, None) for f in full], axis=0))
    rows = {int(i): tuple(float(f[i]) if e[i] is None else e[i]
                          for f, e in zip(flat, full, strict=True)) for i in held}
    flat = [f.copy() for f in flat]
    for f, p in zip(flat, _placeholders(op, fmt), strict=True):
        f[held] = p
        f.setflags(write=False)
    return shape, flat, (held, rows)


def _apply(op, operands, fmt, rounding, overflow, seed, random_bits, stats, negate_b=False):
    fmt = _check_format(fmt)
    rounding = Rounding.coerce(rounding, what="rounding")
    overflow = resolve_overflow(fmt, overflow)
    rbits = _check_random_bits(rounding, random_bits)
    shape, flat, held = _operands(op, operands, negate_b, fmt)
    P, U, D = _kernel_params(fmt, rounding, overflow, rbits)
    Psr = _kernel_params(fmt, Rounding.NEAREST_EVEN, overflow, rbits)[0]
    key = random_key(seed) if rounding is Rounding.STOCHASTIC else np.uint64(0)
    U = U.copy()
    U[_q.U_KEY] = key
    U.setflags(write=False)  # parameters are read-only everywhere: one compiled signature
    out = np.empty(shape, fmt.dtype)
    oflat = out.reshape(-1)
    precise = (fmt.word_length <= 51) if fmt.kind == "fixed" else (fmt.man_bits <= 50)
    if precise:
        # 2**51 quanta; beyond float64's range (a coarse quantum) nothing reaches it
        wrap_lim = (math.ldexp(1.0, 51 - fmt.frac_length) if 51 - fmt.frac_length < 1024
                    else math.inf) if fmt.kind == "fixed" else 0.0
        grid = _grid_params(op, fmt, overflow)
        # the kernels write float64 only (one compiled signature each, not one per container
        # dtype); a format held in float32 takes its values back exactly
        with float64_out(oflat) as o64:
            if grid is not None:  # a weight plus a step, say: see _ka.add_fixed_grid
                x, y = flat[0], flat[1]
                if _on_grid(y[:64], grid[0]) > _on_grid(x[:64], grid[0]):
                    x, y = y, x  # the kernel wants the grid operand first (a sum commutes)
                counts, slow = _ka.add_fixed_grid(x, y, o64, P, Psr, U, D, int(rounding),
                                                  rbits, *grid, wrap_lim)
            else:
                counts, slow = _ka.arith(_OPS[op], *flat, o64, P, Psr, U, D, int(rounding),
                                         rbits, wrap_lim)
        c = counts.sum(axis=0)
        slow_idx = np.flatnonzero(slow)
    else:  # more than 51 significant bits: no room for round-to-odd; exact arithmetic
        c = np.zeros(_q.N_FLAGS, np.int64)
        slow_idx = np.arange(oflat.size)
    if c[_q.F_INVALID]:
        raise ValueError(
            f"{op}: a result is NaN (or an infinity with WRAP), which "
            f"{'fixed-point format' if fmt.kind == 'fixed' else 'format (no NaN code)'} "
            f"{fmt!r} cannot represent"
        )
    if held is not None:  # elements whose operands float64 cannot hold: the oracle's
        slow_idx = np.union1d(slow_idx, held[0])
    if slow_idx.size:
        draws = None
        if rounding is Rounding.STOCHASTIC:
            draws = [random_u64_array(key, i, 1)[0] >> np.uint64(64 - rbits)
                     for i in slow_idx.tolist()]
        for j, i in enumerate(slow_idx.tolist()):
            ops = held[1].get(i) if held is not None else None
            x, y, z = ops if ops is not None else (float(f[i]) for f in flat)
            v = _exact(op, x, y, z, rounding)
            if fmt.kind == "fixed" and (v != v or (overflow is Overflow.WRAP
                                                   and isinstance(v, float)
                                                   and math.isinf(v))):
                raise ValueError(f"{op}: a result is NaN (or an infinity with WRAP), which "
                                 f"fixed-point format {fmt!r} cannot represent")
            res, fl = reference.round_to_format(
                v, fmt, rounding, overflow, flags=True,
                draw=None if draws is None else int(draws[j]),
                random_bits=random_bits)
            oflat[i] = res if isinstance(res, float) else _to_float_toward_zero(res)
            for name, col in FLAG_COLUMNS:
                c[col] += fl[name]
    if stats:
        return out, stats_from_counts(c, out.size)
    return out


_PARAMS = """
    fmt : FixedFormat or FloatFormat
        Format of the result.
    rounding : Rounding or str, default NEAREST_EVEN
        Applied once, to the exact result.
    overflow : Overflow or str, optional
        As for :func:`fixedsim.quantize` (None: SATURATE for fixed point and "fn" floats,
        INFINITY for IEEE floats).
    seed, random_bits
        STOCHASTIC rounding, as for :func:`fixedsim.quantize` (element ``i`` of the broadcast
        result gets draw ``i``).
    stats : bool, default False
        Also return a :class:`fixedsim.QuantStats` of the rounding.

    Returns
    -------
    numpy.ndarray
        The broadcast shape, dtype ``fmt.dtype``.

    Raises
    ------
    TypeError
        ``fmt`` is not a format; an operand element is not a real number (None, a string, a
        complex number: the message names the operand and the flat index).
    ValueError
        Operands that do not broadcast; a NaN result (or an infinity with WRAP) into a
        fixed-point format; the overflow and ``random_bits`` rules of
        :func:`fixedsim.quantize`.
"""


def add(a, b, fmt, rounding=Rounding.NEAREST_EVEN, overflow=None, *, seed=None,
        random_bits=None, stats=False):
    return _apply("add", (a, b), fmt, rounding, overflow, seed, random_bits, stats)


def sub(a, b, fmt, rounding=Rounding.NEAREST_EVEN, overflow=None, *, seed=None,
        random_bits=None, stats=False):
    return _apply("add", (a, b), fmt, rounding, overflow, seed, random_bits, stats,
                  negate_b=True)


def mul(a, b, fmt, rounding=Rounding.NEAREST_EVEN, overflow=None, *, seed=None,
        random_bits=None, stats=False):
    return _apply("mul", (a, b), fmt, rounding, overflow, seed, random_bits, stats)


def div(a, b, fmt, rounding=Rounding.NEAREST_EVEN, overflow=None, *, seed=None,
        random_bits=None, stats=False):
    return _apply("div", (a, b), fmt, rounding, overflow, seed, random_bits, stats)


def fma(a, b, c, fmt, rounding=Rounding.NEAREST_EVEN, overflow=None, *, seed=None,
        random_bits=None, stats=False):
    return _apply("fma", (a, b, c), fmt, rounding, overflow, seed, random_bits, stats)


def _doc(summary: str, operands: str, examples: str = "") -> str:
    return (f"{summary}\n\n    Parameters\n    ----------\n    {operands} : array_like\n"
            f"        Operands (broadcast together): real numbers of any kind\n"
            f"        :func:`fixedsim.quantize` takes, each its exact value (an int beyond\n"
            f"        2**53, a Fraction, a Decimal included).{_PARAMS}{examples}")


add.__doc__ = _doc("``a + b`` rounded once into ``fmt``.", "a, b", """
    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.add([1.0, 1.0], [2**-11, 3 * 2**-11], fs.FP16)     # ties to even
    array([1.       , 1.0019531], dtype=float32)
    >>> fs.add(60000.0, 10000.0, fs.FP16, "toward_zero")
    array(65504., dtype=float32)
""")
sub.__doc__ = _doc("``a - b`` rounded once into ``fmt`` (an exact zero is +0, or -0 rounding "
                   "DOWN).", "a, b")
mul.__doc__ = _doc("``a * b`` rounded once into ``fmt``.", "a, b", """
    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.mul(0.1, 3.0, fs.FixedFormat(8, 4), "up")
    array(0.3125, dtype=float32)
""")
div.__doc__ = _doc("``a / b`` rounded once into ``fmt`` (``x/0`` is an infinity, ``0/0`` NaN, "
                   "as IEEE).", "a, b", """
    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.div(1.0, 3.0, fs.BF16, "odd"), fs.div(1.0, 3.0, fs.BF16, "down")
    (array(0.33398438, dtype=float32), array(0.33203125, dtype=float32))
""")
fma.__doc__ = _doc("``a * b + c`` rounded once into ``fmt`` (no rounding of the product).",
                   "a, b, c", """
    Examples
    --------
    >>> import fixedsim as fs
    >>> x = 1 + 2**-8
    >>> fs.fma(x, x, -1.0, fs.FP16), fs.add(fs.mul(x, x, fs.FP16), -1.0, fs.FP16)
    (array(0.00782776, dtype=float32), array(0.0078125, dtype=float32))
""")
