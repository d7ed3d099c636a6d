"""Quantize arrays into a format, and convert between values and bit codes.

:func:`quantize` checks and explains; the kernels in :mod:`fixedsim.jit.quant` compute.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import math
import numbers
from fractions import Fraction

import numpy as np

from . import reference
from .blockformats import BlockFormat
from .compiling import float64_out, read_only
from .formats import FixedFormat, FloatFormat, _to_float_toward_zero
from .jit import quant as _q
from .jit import quant_fast as _qf
from .jit.rng import random_u64_array
from .rounding import Overflow, Rounding

__all__ = ["quantize", "to_bits", "from_bits", "QuantStats", "resolve_overflow", "random_key"]


@dataclasses.dataclass(frozen=True)
class QuantStats:
    """Event counts of one :func:`quantize` call.

    Attributes
    ----------
    size : int
        Number of elements.
    inexact : int
        Elements whose result differs from the input (overflows included).
    rounded_up : int
        Elements whose result is larger than the input (the upper neighbour was chosen).
    overflow : int
        Elements whose rounded value lay outside the range, so the overflow rule applied
        (saturated, wrapped or sent to infinity), infinite inputs saturated included.
    underflow : int
        Nonzero inputs whose result is zero.
    subnormal : int
        Results that are nonzero subnormal numbers (float formats).
    nan : int
        Results that are NaN.
    """

    size: int
    inexact: int
    rounded_up: int
    overflow: int
    underflow: int
    subnormal: int
    nan: int


#: (flag name of :func:`fixedsim.reference.round_to_format`, kernel event column) pairs.
FLAG_COLUMNS = (("inexact", _q.F_INEXACT), ("rounded_up", _q.F_UP), ("overflow", _q.F_OVERFLOW),
                ("underflow", _q.F_UNDERFLOW), ("subnormal", _q.F_SUBNORMAL), ("nan", _q.F_NAN))


def stats_from_counts(c: np.ndarray, size: int) -> QuantStats:
    """A :class:`QuantStats` from a kernel's event counts (columns ``fixedsim.jit.quant.F_*``)."""
    return QuantStats(size=int(size), inexact=int(c[_q.F_INEXACT]), rounded_up=int(c[_q.F_UP]),
                      overflow=int(c[_q.F_OVERFLOW]), underflow=int(c[_q.F_UNDERFLOW]),
                      subnormal=int(c[_q.F_SUBNORMAL]), nan=int(c[_q.F_NAN]))


def _check_format(fmt):
    if not isinstance(fmt, (FixedFormat, FloatFormat)):
        raise TypeError(
            f"fmt must be a fixedsim.FixedFormat or fixedsim.FloatFormat, got "
            f"{type(fmt).__name__} {fmt!r}"
        )
    return fmt


def resolve_overflow(fmt, overflow) -> Overflow:
    """Return the overflow rule for ``fmt``: the default when ``overflow`` is None, else checked.

    The default is SATURATE for fixed point and for formats without infinities ("fn"), and
    INFINITY for IEEE-style floats.

    Raises
    ------
    ValueError
        WRAP on a float format, INFINITY on a format without infinities.
    """
    if overflow is None:
        if isinstance(fmt, FloatFormat) and fmt.has_inf:
            return Overflow.INFINITY
        return Overflow.SATURATE
    overflow = Overflow.coerce(overflow, what="overflow")
    if overflow is Overflow.WRAP and isinstance(fmt, FloatFormat):
        raise ValueError(
            f"Overflow.WRAP is for fixed-point formats only (two's complement codes), got {fmt!r};"
            " use SATURATE or INFINITY"
        )
    if overflow is Overflow.INFINITY and not (isinstance(fmt, FloatFormat) and fmt.has_inf):
        raise ValueError(
            f"Overflow.INFINITY needs a format with infinities, and {fmt!r} has none; "
            "use SATURATE" + (" or WRAP" if isinstance(fmt, FixedFormat) else "")
        )
    return overflow


def _check_random_bits(rounding: Rounding, random_bits) -> int:
    if random_bits is None:
        return 64
    if rounding is not Rounding.STOCHASTIC:
        raise ValueError(
            f"random_bits applies to Rounding.STOCHASTIC only, got rounding={rounding!r}"
        )
    if isinstance(random_bits, bool) or not isinstance(random_bits, numbers.Integral):
        raise TypeError(f"random_bits must be an int in [1, 64], got {random_bits!r}")
    if not 1 <= random_bits <= 64:
        raise ValueError(
            f"random_bits must be in [1, 64] (the number of random bits added below the kept "
            f"bits), got {random_bits}"
        )
    return int(random_bits)


def random_key(seed) -> np.uint64:
    """The 64-bit key of the counter-based random stream for one call.

    ``seed`` may be an int (the same key every call: reproducible), a
    :class:`numpy.random.Generator` (a fresh key drawn from it each call, so successive calls
    differ yet a whole program is reproducible from the generator's seed), or None (fresh
    entropy from the operating system).
    """
    if isinstance(seed, np.random.Generator):
        return np.uint64(seed.integers(0, 2**64, dtype=np.uint64))
    if seed is None:
        return np.uint64(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"seed must be None, a non-negative int or a numpy.random.Generator, got "
            f"{type(seed).__name__} {seed!r}"
        )
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.uint64(seed_word(seed))


def seed_word(*words) -> int:
    """The first 64-bit word of ``numpy.random.SeedSequence(words)``: the one way fixedsim
    derives a key or a seed from integers (a seed, a step, a layer's CRC, a block index).

    :func:`random_key` is ``seed_word(seed)``; :func:`child_seed` its top 63 bits; a study's
    run seed its low 32 bits.

    Examples
    --------
    >>> seed_word(1, 2) == int(np.random.SeedSequence([1, 2]).generate_state(1, np.uint64)[0])
    True
    """
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0])


def child_seed(*words) -> int:
    """A non-negative int seed (63 bits) of the integers ``words``: ``seed_word(*words) >> 1``,
    for a stream that must be a function of those integers only (a layer's draws at a step, a
    block of a product)."""
    return seed_word(*words) >> 1


@functools.lru_cache(maxsize=512)
def _kernel_params(fmt, rounding: Rounding, overflow: Overflow, random_bits: int):
    P = np.zeros(_q.N_P, np.int64)
    U = np.zeros(_q.N_U, np.uint64)
    D = np.zeros(_q.N_D, np.float64)
    P[_q.P_MODE] = int(rounding)
    P[_q.P_OVF] = int(overflow)
    P[_q.P_RBITS] = random_bits
    if isinstance(fmt, FixedFormat):
        P[_q.P_KIND] = _q.KIND_FIXED
        P[_q.P_W] = fmt.word_length
        P[_q.P_SIGNED] = int(fmt.signed)
        P[_q.P_F] = fmt.frac_length
        U[_q.U_PMAX] = fmt.max_code
        U[_q.U_NMAG] = -fmt.min_code
        U[_q.U_MASK] = (1 << fmt.word_length) - 1
        D[_q.D_MAX] = fmt.max
        D[_q.D_MIN] = fmt.min
        D[_q.D_SCALE] = fmt.eps
    else:
        P[_q.P_KIND] = _q.KIND_FLOAT
        P[_q.P_M] = fmt.man_bits
        P[_q.P_EMIN] = fmt.emin
        P[_q.P_SUBN] = int(fmt.subnormals)
        P[_q.P_HASINF] = int(fmt.has_inf)
        P[_q.P_NONAN] = int(not fmt.has_nan)
        P[_q.P_NEGZERO] = int(fmt.has_negative_zero)
        P[_q.P_UNSIGNED] = int(not fmt.signed)
        P[_q.P_NOZERO] = int(not fmt.has_zero)
        D[_q.D_MAX] = fmt.max
        D[_q.D_MIN] = -fmt.max
        D[_q.D_MINNORM] = fmt.min_normal
    for a in (P, U, D):
        a.setflags(write=False)
    return P, U, D


#: Element types that float64 holds exactly whatever their value.
_FLOATISH = frozenset({float, bool, np.float64, np.float32, np.float16, np.bool_})

#: What an element of an input may be, for the error messages.
_REAL_RULE = "real numbers (float, int, bool, Fraction or Decimal, or arrays of them)"


@dataclasses.dataclass(frozen=True)
class _Exact:
    """Elements of an input that float64 cannot hold: their flat indices (increasing) and
    exact values (Fractions). The float array beside it holds 0.0 at those indices."""

    index: np.ndarray
    value: tuple

    def __len__(self) -> int:
        return len(self.value)


def _refuse_element(v, name, i):
    """The TypeError for an element ``v`` (flat index ``i``) that is not a real number."""
    if v is None:
        why = "None is not a number (replace missing values by NaN, or mask them)"
    elif isinstance(v, (complex, np.complexfloating)):
        why = f"{v!r} is complex (pass its real part if that is meant)"
    elif isinstance(v, (str, bytes)):
        why = f"{v!r} is a string (convert it to a number first)"
    elif isinstance(v, (list, tuple, np.ndarray)):
        why = f"it is a {type(v).__name__}: a ragged nested sequence is not an array"
    else:
        why = f"{type(v).__name__} {v!r} is not one"
    return TypeError(f"{name} must hold {_REAL_RULE}; at flat index {i}, {why}")


def _exact_scalar(v, name, i):
    """Element ``v`` as a float when float64 holds it exactly, else as its exact Fraction.

    NaN, infinities and signed zeros are floats. Refuses anything that is not a real number.
    """
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (numbers.Integral, np.integer)):
        n = int(v)
        if -(2**53) <= n <= 2**53:
            return float(n)
        try:
            f = float(n)
        except OverflowError:  # beyond float64's range
            return Fraction(n)
        return f if int(f) == n else Fraction(n)
    if isinstance(v, np.longdouble) and np.finfo(np.longdouble).nmant > 52:
        f = float(v)
        if math.isnan(f) or np.longdouble(f) == v:
            return f
        return Fraction(*v.as_integer_ratio())
    if isinstance(v, (float, np.floating)):
        return float(v)  # float16/32/64: exact
    if isinstance(v, decimal.Decimal):
        if v.is_nan():
            return math.copysign(math.nan, -1.0 if v.is_signed() else 1.0)
        if v.is_infinite() or v.is_zero():
            return math.copysign(math.inf if v.is_infinite() else 0.0,
                                 -1.0 if v.is_signed() else 1.0)
        v = Fraction(v)
    if isinstance(v, numbers.Rational):
        r = Fraction(v.numerator, v.denominator)
        try:
            f = float(r)  # correctly rounded (an int division)
        except OverflowError:
            return r
        return f if Fraction(f) == r else r
    raise _refuse_element(v, name, i)


def _exact_objects(arr: np.ndarray, name):
    """An object array as (float64 array, _Exact or None)."""
    flat = arr.reshape(-1)
    types = set(map(type, flat))
    if types <= _FLOATISH:
        return flat.astype(np.float64).reshape(arr.shape), None
    vals = np.zeros(flat.size, np.float64)
    index, exact = [], []
    for i, v in enumerate(flat):
        e = _exact_scalar(v, name, i)
        if isinstance(e, Fraction):
            index.append(i)
            exact.append(e)
        else:
            vals[i] = e
    return vals.reshape(arr.shape), (_Exact(np.array(index, np.int64), tuple(exact))
                                     if index else None)


def _exact_integers(arr: np.ndarray, name):
    """An integer array as (float64 array, _Exact or None): integers float64 cannot hold
    (beyond 2**53, not multiples of the float64 quantum there) kept exact."""
    conv = arr.astype(np.float64, order="C")  # C order: the flat indices are C order's
    if arr.dtype.itemsize < 8 or not arr.size:
        return conv, None
    flat, cflat = arr.reshape(-1), conv.reshape(-1)
    cand = np.flatnonzero(np.abs(cflat) >= 2.0**53)
    if not cand.size:
        return conv, None
    top = 2.0**63 if arr.dtype.kind == "i" else 2.0**64
    c = cflat[cand]
    with np.errstate(invalid="ignore"):
        back = np.where(np.abs(c) < top, c, 0).astype(arr.dtype)
    exact = (np.abs(c) < top) & (back == flat[cand])
    if arr.dtype.kind == "i":
        exact |= flat[cand] == np.iinfo(arr.dtype).min  # -2**63 is a float64
    bad = cand[~exact]
    if not bad.size:
        return conv, None
    cflat[bad] = 0.0
    return conv, _Exact(bad, tuple(Fraction(int(flat[i])) for i in bad))


def _exact_longdouble(arr: np.ndarray):
    """A long double array as (float64 array, _Exact or None)."""
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float64's range: kept exact
        conv = arr.astype(np.float64, order="C")
        bad = np.flatnonzero(((conv.astype(arr.dtype) != arr) & ~np.isnan(arr)).reshape(-1))
    if not bad.size:
        return conv, None
    flat = arr.reshape(-1)
    exact = tuple(Fraction(*flat[i].as_integer_ratio()) for i in bad)
    conv.reshape(-1)[bad] = 0.0
    return conv, _Exact(bad, exact)


def _as_exact_array(x, name="x"):
    """``x`` as ``(arr, exact)``: ``arr`` a C-contiguous float32 or float64 array (native byte
    order), ``exact`` None or an :class:`_Exact` listing the elements float64 cannot hold
    exactly (Python ints, Fractions, Decimals, long doubles), whose place in ``arr`` holds 0.0.

    Nothing is rounded: every element is either exactly in ``arr`` or exactly in ``exact``.
    Real numbers only: None, strings, complex numbers and other objects are refused with a
    TypeError naming the element. bools are the numbers 0 and 1, as in NumPy. A read-only
    array is returned as it is (the kernels take read-only views, see :func:`_run`).
    Lists and tuples are read element by element (as an object array), so a large integer
    in a list keeps its value as it does in an object array (NumPy's own conversion would
    round it to float64 beside a float).
    """
    if isinstance(x, np.ndarray):
        arr = np.asarray(x)  # subclasses (np.matrix) as plain arrays: reshape(-1) is 1-d
    elif isinstance(x, (list, tuple)):
        try:
            arr = np.array(x, dtype=object)
        except ValueError as err:  # ragged in a way NumPy cannot even hold as objects
            raise TypeError(f"{name} must be a rectangular array of {_REAL_RULE}; NumPy "
                            f"could not read it: {err}") from None
    else:
        arr = np.asarray(x)
    kind = arr.dtype.kind
    if kind == "f":
        if arr.dtype.itemsize <= 2:  # float16: exact in float32
            return arr.astype(np.float32, order="C"), None
        if arr.dtype.itemsize > 8 and np.finfo(arr.dtype).nmant > 52:
            return _exact_longdouble(arr)
        native = arr.dtype.newbyteorder("=") if not arr.dtype.isnative else arr.dtype
        if arr.dtype.isnative and arr.flags.c_contiguous:
            return arr, None
        return arr.astype(native, order="C"), None  # (np.ascontiguousarray makes 0-d 1-d)
    if kind == "b":
        return arr.astype(np.float64, order="C"), None
    if kind in "iu":
        return _exact_integers(arr, name)
    if kind == "O":
        return _exact_objects(arr, name)
    what = {"c": "complex numbers (pass the real part if that is meant)",
            "U": "strings", "S": "bytes", "M": "datetimes", "m": "timedeltas"}.get(
                kind, f"dtype {arr.dtype}")
    raise TypeError(f"{name} must hold {_REAL_RULE}; got an array of {what}")


def _placeholder(fmt) -> float:
    """A value every rounding into ``fmt`` keeps, with no event: it stands in the kernels'
    input for the elements the oracle rounds (zero is not a value of every format: E8M0)."""
    return float(fmt.max)


def _as_float_array(x, name="x") -> np.ndarray:
    """``x`` as a C-contiguous, writeable float32 or float64 array, converted exactly or
    refused: for the matrix products and the layers built on them, which take their operands
    as float64 values.

    The same inputs as :func:`_as_exact_array`; a value float64 cannot hold exactly (a
    Python int beyond 2**53, a Fraction, a Decimal, a long double) is refused with a
    ValueError, since rounding it to float64 and then to the spec's formats would round it
    twice. A read-only array is copied (once, O(size)), so that the kernels it reaches run
    their compiled signature instead of compiling one for read-only arrays.
    """
    arr, exact = _as_exact_array(x, name)
    if exact is not None:
        i, v = int(exact.index[0]), exact.value[0]
        shown = str(v) if v.denominator == 1 else f"Fraction({v.numerator}, {v.denominator})"
        if len(shown) > 60:  # about 2**e: e from the bit lengths (float(v) may overflow)
            e = abs(v.numerator).bit_length() - v.denominator.bit_length()
            shown = f"{'-' if v < 0 else ''}a value of about 2**{e}"
        raise ValueError(
            f"{name} holds {shown} at flat index {i} ({len(exact)} such values in all), which "
            "float64 cannot hold exactly; matrix products take their operands as float64 "
            "values (spec.input rounds them from there), so it would be rounded twice. Round "
            f"it once first: fixedsim.quantize({name}, fmt) rounds exact values correctly "
            "(fmt = spec.input, or fixedsim.FP64)")
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr


def _f32_bits(v: float) -> int:
    return int(np.float32(v).view(np.uint32))


def _f64_bits(v: float) -> int:
    return int(np.float64(v).view(np.int64))


@functools.lru_cache(maxsize=512)
def _fast_float_params(fmt: FloatFormat, rounding: Rounding, overflow: Overflow):
    maxbits = _f32_bits(fmt.max)
    if overflow is Overflow.SATURATE:
        pos = neg = infbits = maxbits
    else:  # the IEEE rule per mode, from the same function the general kernel uses
        pos = _f32_bits(_q.overflow_value(int(rounding), False, fmt.max))
        neg = _f32_bits(_q.overflow_value(int(rounding), True, fmt.max))
        infbits = 0x7F800000
    return (23 - fmt.man_bits, fmt.emin + 127, _f32_bits(fmt.min_subnormal), maxbits, pos, neg,
            infbits)


#: IEEE 754 binary32 (:data:`fixedsim.formats.FP32`), whose nearest-even rounding from float64
#: is the float32 conversion itself.
_BINARY32 = FloatFormat(8, 23)


def _fast_path(arr: np.ndarray, fmt, rounding: Rounding, overflow=None) -> str | None:
    """Which fast kernel can serve this call bit-identically to the general one, if any
    (``overflow``: the resolved Overflow; None stands for the format's default)."""
    if isinstance(fmt, FloatFormat):
        if fmt.dtype != np.float32 or not fmt.subnormals or fmt.inf_nan not in ("ieee", "fn") \
                or not fmt.signed:
            return None  # the fast kernels know IEEE and "fn" specials only
        if arr.dtype == np.float32:
            return "float_from_f32"
        if (fmt == _BINARY32 and rounding is Rounding.NEAREST_EVEN
                and overflow in (None, Overflow.INFINITY)):
            return "f32_cast"  # the float64 -> float32 conversion is the model's rounding
        # round to odd at float32 precision first: needs 2 spare bits and quanta >= 2**-147
        if rounding is not Rounding.STOCHASTIC and fmt.man_bits <= 21 \
                and fmt.emin - fmt.man_bits >= -147:
            return "float_from_f64"
        return None
    f = fmt.frac_length
    # x * 2**f must be exact in float64 (no underflow; overflow only to inf from float64
    # input), and 2**f finite
    if (arr.dtype == np.float32 and -925 <= f <= 896) or (arr.dtype == np.float64
                                                          and 0 <= f <= 1023):
        return "fixed_from_float"
    return None


def _check_out(out, arr, fmt):
    if out is None:
        return np.empty(arr.shape, fmt.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != arr.shape or out.dtype != fmt.dtype or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError(
            f"out must be a writeable C-contiguous array of shape {arr.shape} and dtype "
            f"{fmt.dtype} (the container of {fmt!r}), got shape {out.shape}, dtype {out.dtype}"
            + ("" if out.flags.c_contiguous else ", not C-contiguous")
        )
    return out


#: Let the fast kernels count events for ``stats=True`` (tests switch it off to compare their
#: counts with the general kernel's).
_FAST_STATS = True


def _run(arr, fmt, rounding, overflow, rbits, key, want_stats, out=None):
    """Quantize ``arr`` (float32/float64, C-contiguous); return (out, counts or None).

    The kernels get a read-only view of ``arr`` whether or not the caller's array is
    writeable: Numba compiles one signature per writeable flag, so read-only inputs (from
    ``np.load(mmap_mode="r")``, frozen weights, ``setflags(write=False)``) take the same
    compiled kernels as the rest, with no copy.
    """
    out = _check_out(out, arr, fmt)
    flat = arr.reshape(-1).view()
    flat.setflags(write=False)
    oflat = out.reshape(-1)
    path = _fast_path(arr, fmt, rounding, overflow)
    if want_stats and (not _FAST_STATS or (path == "fixed_from_float"
                                           and fmt.word_length > 53)):
        path = None  # the fixed-point kernel counts events when its codes are exact in float64
    mode = int(rounding)
    if path == "f32_cast":
        path, mode = "float_from_f64", _qf.CAST
    if path in ("float_from_f32", "float_from_f64"):
        minnorm = _f32_bits(fmt.min_normal)
        if path == "float_from_f32":
            counts = _qf.float_from_f32(flat.view(np.uint32), oflat.view(np.uint32), mode,
                                        *_fast_float_params(fmt, rounding, overflow), rbits, key,
                                        bool(want_stats), minnorm)
        else:
            counts = _qf.float_from_f64(flat, oflat.view(np.uint32), mode,
                                        *_fast_float_params(fmt, rounding, overflow),
                                        bool(want_stats), minnorm)
        return out, (counts if want_stats else None)
    if path == "fixed_from_float":
        f = fmt.frac_length
        if overflow is Overflow.WRAP:  # round unclamped to float64 codes, then wrap them
            codes = np.empty(flat.shape, np.float64)
            first = _qf.fixed_from_float(flat, codes, mode, 2.0**f, 1.0, np.inf, -np.inf,
                                         rbits, key)
            # float64 in and out (exact both ways): one compiled signature, not four
            with float64_out(oflat) as o64:
                counts = _qf.wrap_codes(read_only(flat, np.float64), codes, o64,
                                        np.uint64((1 << fmt.word_length) - 1), fmt.word_length,
                                        fmt.signed, 2.0**-f, float(fmt.max_code),
                                        float(fmt.min_code))
            counts[_q.F_INVALID] += first[_q.F_INVALID]  # NaN inputs; the rest counts the wrap
        else:
            counts = _qf.fixed_from_float(flat, oflat, mode, 2.0**f, 2.0**-f, fmt.max * 2.0**f,
                                          fmt.min * 2.0**f, rbits, key)
        return out, counts
    P, U, D = _kernel_params(fmt, rounding, overflow, rbits)
    if key:
        U = U.copy()
        U[_q.U_KEY] = key
        U.setflags(write=False)  # read-only as the cached ones: one compiled signature
    # The general kernel runs in float64 only (one compiled signature, not one per input and
    # container dtype: about 20-40 s of compiling each). Both conversions are exact: a float32
    # input is a float64 of the same value (a NaN made quiet, which the kernel returns as
    # its own float64 conversion anyway), and every value of a format held in float32 is a
    # float32.
    x64 = read_only(flat, np.float64)  # a signaling NaN made quiet without a warning
    with float64_out(oflat) as o64:
        counts = _q.quantize_bits(x64, x64.view(np.uint64), o64, P, U, D, 52, 11)
    return out, counts.sum(axis=0)


def quantize(
    x,
    fmt,
    rounding=Rounding.NEAREST_EVEN,
    overflow=None,
    *,
    seed=None,
    random_bits=None,
    stats=False,
    out=None,
    axis=None,
):
    """Round every element of ``x`` into ``fmt`` with a single rounding.

    Parameters
    ----------
    x : array_like
        Real numbers, each read as its exact value: floats (float16/32/64, long double),
        ints of any size, bools (0 and 1), ``fractions.Fraction``, ``decimal.Decimal``; as
        scalars, nested lists, object arrays or NumPy arrays of any layout and byte order,
        read-only included. Never modified. Values float64 cannot hold (2**53 + 1, 1/3,
        Decimal("0.1")) are rounded once by :func:`fixedsim.reference.round_to_format`, never
        through float64 (see docs/numerics.md, "What an input may be").
    fmt : FixedFormat, FloatFormat or BlockFormat
        Target format. Into a :class:`~fixedsim.BlockFormat` (MX, NVFP4) the result is the
        float64 values ``element * scale``, blocks along ``axis`` (docs/block_formats.md).
    rounding : Rounding or str, default Rounding.NEAREST_EVEN
        Rounding mode (see :class:`fixedsim.Rounding`).
    overflow : Overflow or str, optional
        Overflow rule. None means SATURATE for fixed point and for "fn" floats, INFINITY for
        IEEE floats.
    seed : None, int or numpy.random.Generator, optional
        Source of the random stream for ``Rounding.STOCHASTIC``: the draw for element ``i``
        (in C order) depends only on the seed, ``i`` and, for a Generator, how many keys were
        drawn from it before. Identical at any thread count. Ignored by other modes.
    random_bits : int, optional
        STOCHASTIC only: model hardware that adds ``random_bits`` random bits below the kept
        bits and truncates. The probability of moving away from the truncated neighbour is
        then ``floor(frac * 2**random_bits) / 2**random_bits``, ``frac`` in [0, 1) the distance
        from it in quanta (of the magnitude for floats, of the value for fixed point). Default
        64, which is exact whenever ``frac`` is a multiple of ``2**-64`` (every normal-range
        input into a float format; the exceptions are inputs more than 64 binades below the
        quantum, whose probability is truncated by less than ``2**-64``; see
        docs/numerics.md).
    stats : bool, default False
        Also return a :class:`QuantStats` with event counts.
    out : numpy.ndarray, optional
        Where to write the result: C-contiguous, shape of ``x``, dtype ``fmt.dtype``. Saves
        the allocation (and its page faults) in loops; may be ``x`` itself to round in place.
        For a block format: float64, the shape of ``x``.
    axis : int, optional
        Block formats only: the axis the blocks run along (default ``fmt.axis``, the last).
        The stochastic draw of an element is indexed by its place in ``x`` with that axis
        moved last (C order): its flat index when the axis is the last.

    Returns
    -------
    y : numpy.ndarray
        Same shape as ``x``, dtype ``fmt.dtype`` (float32 when every value of ``fmt`` is a
        float32, else float64); every element is a value of ``fmt``.
    stats : QuantStats
        Only when ``stats=True``.

    Raises
    ------
    TypeError
        ``fmt`` is not a format; an element of ``x`` is not a real number (None, a string, a
        complex number, a ragged nesting: the message gives its flat index); a bad ``seed``
        type.
    ValueError
        NaN into a fixed-point format; an infinity with WRAP; WRAP on a float format;
        INFINITY on a format without infinities; ``random_bits`` outside [1, 64] or with a
        deterministic mode; an unknown rounding name.

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.quantize([1.00048828125, 1.00146484375, 70000.0], fs.FP16)  # ties to even; overflow
    array([1.       , 1.0019531,       inf], dtype=float32)
    >>> fs.quantize([2.5, -2.5, 200.0], fs.FixedFormat(8, 0), "nearest_away")
    array([  3.,  -3., 127.], dtype=float32)
    >>> fs.quantize([200.0], fs.FixedFormat(8, 0), overflow="wrap")
    array([-56.], dtype=float32)
    >>> from fractions import Fraction       # exact inputs are rounded once, from above a tie
    >>> fs.quantize(Fraction(1) + Fraction(1, 2**11) + Fraction(1, 2**60), fs.FP16)
    array(1.0009766, dtype=float32)
    >>> fs.quantize(2**60 + 2**36 + 1, fs.FP32) == 2.0**60 + 2**37   # not via float64's tie
    np.True_
    """
    if isinstance(fmt, BlockFormat):
        if stats:
            raise ValueError(f"stats is not available for the block format {fmt!r}; call "
                             "quantize(x, fmt, rounding, ...) without it")
        from .blockquant import block_quantize

        return block_quantize(x, fmt, rounding, overflow, seed=seed, random_bits=random_bits,
                              axis=axis, out=out)
    if axis is not None:
        raise ValueError(f"axis applies to block formats only, got axis={axis!r} with {fmt!r}")
    fmt = _check_format(fmt)
    rounding = Rounding.coerce(rounding, what="rounding")
    overflow = resolve_overflow(fmt, overflow)
    rbits = _check_random_bits(rounding, random_bits)
    arr, exact = _as_exact_array(x)
    if exact is not None:  # arr is a new float64 array then
        arr.reshape(-1)[exact.index] = _placeholder(fmt)
    key = random_key(seed) if rounding is Rounding.STOCHASTIC else np.uint64(0)
    out, c = _run(arr, fmt, rounding, overflow, rbits, key, stats or exact is not None, out)
    if c is not None and c[_q.F_INVALID]:
        _raise_invalid(arr, fmt, overflow)
    if exact is not None:
        _round_exact(out, c, exact, fmt, rounding, overflow, random_bits, key)
    if stats:
        return out, stats_from_counts(c, arr.size)
    return out


def _round_exact(out, counts, exact, fmt, rounding, overflow, random_bits, key):
    """Round the elements float64 cannot hold (``exact``) into ``out`` with the oracle,
    :func:`fixedsim.reference.round_to_format`, each once, from its exact value, with the
    draw the kernels give its index; add their events to ``counts`` (their places held
    :func:`_placeholder`, which the kernels round with no event)."""
    oflat = out.reshape(-1)
    shift = np.uint64(64 - (64 if random_bits is None else random_bits))
    for i, v in zip(exact.index.tolist(), exact.value, strict=True):
        draw = (int(random_u64_array(key, i, 1)[0] >> shift)
                if rounding is Rounding.STOCHASTIC else None)
        res, fl = reference.round_to_format(v, fmt, rounding, overflow, flags=True, draw=draw,
                                            random_bits=random_bits)
        oflat[i] = res if isinstance(res, float) else _to_float_toward_zero(res)
        for name, col in FLAG_COLUMNS:
            counts[col] += fl[name]


def _raise_invalid(arr, fmt, overflow):
    flat = arr.reshape(-1)
    nan = np.flatnonzero(np.isnan(flat))
    if nan.size:
        kind = "fixed-point format" if isinstance(fmt, FixedFormat) else "format (no NaN code)"
        raise ValueError(
            f"x holds NaN (first at flat index {nan[0]}, {nan.size} in all), which {kind} "
            f"{fmt!r} cannot represent; replace or mask NaNs first"
        )
    inf = np.flatnonzero(np.isinf(flat))
    raise ValueError(
        f"x holds an infinity (first at flat index {inf[0]}), which {overflow!r} cannot wrap "
        f"into {fmt!r}; use Overflow.SATURATE to clamp infinities"
    )


def _container_bits(arr: np.ndarray):
    """(unsigned bit view, exponent bits, mantissa bits) of a float32/float64 array."""
    if arr.dtype == np.float32:
        return arr.view(np.uint32).astype(np.uint64), 8, 23
    return arr.view(np.uint64), 11, 52


def to_bits(x, fmt, **block_options) -> np.ndarray:
    """Unsigned integer codes of values that ``fmt`` represents exactly.

    For a :class:`~fixedsim.BlockFormat`, ``x`` is any real array: it is quantized (its
    scales depend on the unquantized blocks) and a :class:`~fixedsim.blockquant.BlockCodes`,
    the pair ``(elements, scales)`` with the attribute ``tensor_scale`` (NVFP4's FP32 code, else
    None), is returned, with ``block_options`` ``rounding``,
    ``seed``, ``random_bits``, ``axis`` as for :func:`quantize` and ``packed`` (default True:
    4-bit elements two per byte, low nibble first; 6-bit elements four per three bytes).
    ``from_bits(to_bits(x, fmt, ...), fmt)`` is ``quantize(x, fmt, ...)`` (docs/block_formats.md).

    Parameters
    ----------
    x : array_like
        Values of ``fmt`` (for example the output of :func:`quantize`), of any kind
        :func:`quantize` takes: a value of a wide fixed-point format that float64 cannot hold,
        given as an int or a Fraction, gets its exact code.
    fmt : FixedFormat or FloatFormat

    Returns
    -------
    numpy.ndarray
        Codes, dtype ``fmt.code_dtype`` (the smallest unsigned type that holds ``fmt.width``
        bits). Fixed point: the two's complement code in ``word_length`` bits. Float: sign,
        biased exponent, mantissa. A NaN keeps its sign and the top ``man_bits`` bits of its
        payload (the quiet bit is set if they are all zero); "fn" formats have one NaN code per
        sign (all exponent and mantissa bits set; unsigned formats have no sign bit: E8M0's NaN
        is 0xFF); "fnuz" formats have one NaN, the sign bit alone (0x80), and no -0.0.

    Raises
    ------
    TypeError
        An element is not a real number (as for :func:`quantize`).
    ValueError
        If some value is not exactly representable in ``fmt`` (quantize first).

    Examples
    --------
    >>> import fixedsim as fs
    >>> [hex(c) for c in fs.to_bits([1.0, -2.0, 65504.0], fs.FP16)]
    ['0x3c00', '0xc000', '0x7bff']
    >>> fs.to_bits([-0.25, 0.75], fs.FixedFormat(8, 2))
    array([255,   3], dtype=uint8)
    """
    if isinstance(fmt, BlockFormat):
        from .blockquant import block_to_bits

        return block_to_bits(x, fmt, **block_options)
    if block_options:
        raise TypeError(f"to_bits: {', '.join(block_options)} apply to block formats only")
    fmt = _check_format(fmt)
    arr, exact = _as_exact_array(x)
    if exact is not None:
        arr.reshape(-1)[exact.index] = _placeholder(fmt)  # a value of fmt; its code replaced
    codes = _to_bits(arr, fmt)
    if exact is not None:  # values float64 cannot hold (a wide fixed-point format's)
        cflat = codes.reshape(-1)
        for i, v in zip(exact.index.tolist(), exact.value, strict=True):
            try:
                cflat[i] = reference.encode(v, fmt)
            except ValueError:
                raise ValueError(
                    f"to_bits: x[{i}] (flat index) = {v} is not a value of {fmt!r}; round it "
                    f"first with fixedsim.quantize(x, {fmt!r}, ...)") from None
    return codes


def _to_bits(arr, fmt):
    """:func:`to_bits` of a float32/float64 array."""
    # a format without subnormals still has their encodings (from_bits decodes them)
    enc = dataclasses.replace(fmt, subnormals=True) if isinstance(fmt, FloatFormat) \
        and fmt.has_zero else fmt
    q = quantize(arr, enc, overflow=Overflow.SATURATE) if not (
        isinstance(fmt, FixedFormat) and np.isnan(arr).any()) else None
    if q is None:
        i = int(np.flatnonzero(np.isnan(arr.reshape(-1)))[0])
        raise ValueError(f"to_bits: x holds NaN (flat index {i}), which {fmt!r} cannot represent")
    same = (q == arr) | (np.isnan(q) & np.isnan(arr))
    same &= np.signbit(q) == np.signbit(arr)
    if isinstance(fmt, FloatFormat):
        same |= np.isinf(arr) & fmt.has_inf
    if not np.all(same):
        i = int(np.flatnonzero(~same.reshape(-1))[0])
        raise ValueError(
            f"to_bits: x[{i}] (flat index) = {float(arr.reshape(-1)[i])!r} is not a value of "
            f"{fmt!r}; "
            f"round it first with fixedsim.quantize(x, {fmt!r}, ...)"
        )
    if isinstance(fmt, FixedFormat):
        c = np.ldexp(arr.astype(np.float64), fmt.frac_length)  # 2.0**1024 is no float
        if fmt.signed:
            codes = c.astype(np.int64).view(np.uint64)
        else:
            codes = c.astype(np.uint64)
        return (codes & np.uint64((1 << fmt.word_length) - 1)).astype(fmt.code_dtype)
    return _float_to_bits(arr, fmt)


def _float_to_bits(arr, fmt: FloatFormat) -> np.ndarray:
    m, e = fmt.man_bits, fmt.exp_bits
    u64 = np.uint64
    bits, in_e, in_m = _container_bits(arr)
    sign = (bits >> u64(in_e + in_m)) << u64(e + m)
    if not fmt.signed:
        sign = np.zeros_like(sign)  # to_bits let through no negative value
    top = u64((1 << e) - 1)
    with np.errstate(all="ignore"):
        mag = np.abs(arr.astype(np.float64))
        frac_in, exp_in = np.frexp(mag)  # mag = frac_in * 2**exp_in, frac_in in [0.5, 1)
    E = exp_in.astype(np.int64) - 1
    normal = E >= fmt.emin
    # integer significand at the quantum of the format (exact: the value is representable)
    eq = np.where(normal, E, fmt.emin) - m
    sig = np.ldexp(mag, -eq.astype(np.int32)) if mag.size else mag
    sig = np.where(np.isfinite(sig), sig, 0).astype(np.uint64)
    biased = np.where(normal, E + fmt.bias, 0).astype(np.uint64)
    mant = np.where(normal, sig - (u64(1) << u64(m)), sig)
    codes = (biased << u64(m)) | mant
    codes = np.where(mag == 0, u64(0), codes)
    if fmt.has_inf:
        codes = np.where(np.isinf(mag), top << u64(m), codes)
        payload = (bits & u64((1 << in_m) - 1)) >> u64(in_m - m)
        payload = np.where(payload == 0, u64(1) << u64(m - 1), payload)
        codes = np.where(np.isnan(mag), (top << u64(m)) | payload, codes)
    elif fmt.inf_nan == "fnuz":  # one NaN, the negative zero's code
        return np.where(np.isnan(mag), u64(1) << u64(e + m), codes | sign).astype(fmt.code_dtype)
    else:
        codes = np.where(np.isnan(mag), (top << u64(m)) | u64((1 << m) - 1), codes)
    return (codes | sign).astype(fmt.code_dtype)


def _as_codes(codes) -> np.ndarray:
    """``codes`` as an integer array (object for Python ints beyond 64 bits), or a TypeError
    naming the first element that is not an integer. bools are the codes 0 and 1."""
    try:
        c = np.asarray(codes)
    except ValueError as err:  # ragged nested lists
        raise TypeError(f"codes must be a rectangular array of integers; NumPy could not read "
                        f"it: {err}") from None
    if c.dtype.kind in "iu":
        return c
    if c.size == 0 and c.dtype.kind in "fbO":  # [] reads as float64: no code to check
        return c.astype(np.uint64)
    if c.dtype.kind == "b":
        return c.astype(np.uint8)
    if c.dtype.kind == "O":
        flat = c.reshape(-1)
        for i, v in enumerate(flat):
            if not isinstance(v, (numbers.Integral, np.integer, np.bool_)):
                raise TypeError(f"codes must be integers (or bools); at flat index {i}, "
                                f"{v!r} ({type(v).__name__}) is not an integer")
        return np.array([int(v) for v in flat], dtype=object).reshape(c.shape)
    raise TypeError(f"codes must be integers (or bools), got an array of dtype {c.dtype}")


def from_bits(codes, fmt, **block_options) -> np.ndarray:
    """Values of unsigned integer codes; the inverse of :func:`to_bits`.

    For a :class:`~fixedsim.BlockFormat`, ``codes`` is what :func:`to_bits` returned (a
    ``BlockCodes``, or an ``(elements, scales[, tensor_scale])`` tuple), ``block_options``
    ``axis`` and ``packed`` as there; the result is float64 ``element * scale``.

    Parameters
    ----------
    codes : array_like of int
        Codes in ``[0, 2**fmt.width)``: Python ints, NumPy integer arrays (any byte order and
        layout), object arrays of ints; bools are the codes 0 and 1.
    fmt : FixedFormat or FloatFormat

    Returns
    -------
    numpy.ndarray
        Values, dtype ``fmt.dtype``. NaN codes give NaNs with the same sign and payload (in the
        top mantissa bits of the container). Codes with a zero exponent field in a format with
        ``subnormals=False`` decode to their subnormal value (the encoding exists; rounding into
        the format never produces it).

    Raises
    ------
    TypeError
        A code that is not an integer (a float, None, a string, a Fraction: the message gives
        its flat index).
    ValueError
        Codes outside ``[0, 2**width)``; fixed-point codes whose value float64 cannot hold
        (word lengths above 53 bits).

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.from_bits([0x3C00, 0x0001, 0x7C00], fs.FP16)
    array([1.0000000e+00, 5.9604645e-08,           inf], dtype=float32)
    >>> fs.from_bits([0x80, 0x7F], fs.FixedFormat(8, 4))
    array([-8.    ,  7.9375], dtype=float32)
    """
    if isinstance(fmt, BlockFormat):
        from .blockquant import block_from_bits

        return block_from_bits(codes, fmt, **block_options)
    if block_options:
        raise TypeError(f"from_bits: {', '.join(block_options)} apply to block formats only")
    fmt = _check_format(fmt)
    c = _as_codes(codes)
    width = fmt.width
    if c.size:
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= (1 << width):
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"codes must be in [0, 2**{width}) for {fmt!r}, got {bad}"
            )
    u = c.astype(np.uint64)
    u64 = np.uint64
    if isinstance(fmt, FixedFormat):
        w = fmt.word_length
        if fmt.signed:
            s = (u << u64(64 - w)).view(np.int64) >> np.int64(64 - w)
        else:
            s = u
        v = s.astype(np.float64)
        if fmt.word_length - fmt.signed > 53:
            big = v >= (2.0**63 if fmt.signed else 2.0**64)  # rounded up past the type
            with np.errstate(invalid="ignore"):
                back = np.where(big, 0, v).astype(s.dtype)
            inexact = big | (back != s)
            if np.any(inexact):
                i = int(np.flatnonzero(inexact.reshape(-1))[0])
                raise ValueError(
                    f"from_bits: code {int(u.reshape(-1)[i])} of {fmt!r} is a value float64 "
                    "cannot hold exactly"
                )
        return np.ldexp(v, -fmt.frac_length).astype(fmt.dtype)
    m, e = fmt.man_bits, fmt.exp_bits
    neg = ((u >> u64(e + m)) & u64(1)).astype(bool) & fmt.signed
    ef = ((u >> u64(m)) & u64((1 << e) - 1)).astype(np.int64)
    mant = u & u64((1 << m) - 1)
    top = (1 << e) - 1
    normal = (ef > 0) | (m == 0)  # exponent-only formats (E8M0) have no subnormals
    sig = np.where(normal, mant + (u64(1) << u64(m)), mant).astype(np.float64)
    exp = np.where(normal, ef, 1) - fmt.bias - m
    mag = np.ldexp(sig, exp.astype(np.int32))
    if fmt.has_inf:
        is_nan = (ef == top) & (mant != 0)
        mag = np.where((ef == top) & (mant == 0), np.inf, mag)
    elif fmt.inf_nan == "fn":
        is_nan = (ef == top) & (mant == u64((1 << m) - 1))
    elif fmt.inf_nan == "fnuz":
        is_nan = u == u64(1 << (e + m))
        neg = neg & ~is_nan  # its NaN is positive
    else:
        is_nan = np.zeros(u.shape, bool)
    with np.errstate(over="ignore"):  # the top binade of "ieee" formats decodes below
        val = np.where(neg, -mag, mag).astype(fmt.dtype)
    if np.any(is_nan):
        vb = val.view(np.uint32 if fmt.dtype == np.float32 else np.uint64)
        in_m = 23 if fmt.dtype == np.float32 else 52
        in_e = 8 if fmt.dtype == np.float32 else 11
        nan_bits = (
            (neg.astype(np.uint64) << u64(in_e + in_m))
            | (u64((1 << in_e) - 1) << u64(in_m))
            | np.where(mant == 0, u64(1) << u64(in_m - 1), mant << u64(in_m - m))
        )  # a NaN code with no mantissa bits (fnuz, E8M0) gives the quiet NaN
        vb[is_nan] = nan_bits[is_nan].astype(vb.dtype)
    return val
