"""Number formats: two's complement fixed point and small IEEE-style floating point.

A format is a frozen, hashable value. Its defining fields are validated once, on construction;
every derived fact (largest value, epsilon, smallest normal, container dtype, ...) is computed
from them, never tabulated per format.

Values of a format are held in ordinary NumPy arrays: ``float32`` when every value of the format
is exactly a float32 (the ``dtype`` property says which), ``float64`` otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

import numpy as np

__all__ = [
    "FixedFormat",
    "FloatFormat",
    "Format",
    "FP64",
    "FP32",
    "TF32",
    "FP16",
    "BF16",
    "FP8_E5M2",
    "FP8_E4M3",
    "FP8_E4M3FNUZ",
    "FP8_E5M2FNUZ",
    "FP8_E3M4",
    "FP6_E2M3",
    "FP6_E3M2",
    "FP4_E2M1",
    "E8M0",
    "parse_format",
]

#: The encodings of specials, by the ``inf_nan`` field of :class:`FloatFormat`.
_INF_NAN = ("ieee", "fn", "fnuz", "none")


def _check_int(name: str, value, lo: int, hi: int, cls: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{cls}: {name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{cls}: {name} must be in [{lo}, {hi}], got {value}")
    return value


def _code_dtype(bits: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= np.dtype(dt).itemsize * 8:
            return np.dtype(dt)
    raise AssertionError("formats are at most 64 bits wide")


def _fits_float(sig_bits: int, lowest_exp: int, top_exp: int, dtype) -> bool:
    """True if every ``c * 2**lowest_exp``, ``c < 2**sig_bits``, below ``2**top_exp`` is exact."""
    info = np.finfo(dtype)
    p = info.nmant + 1  # significand precision
    min_sub_exp = info.minexp - info.nmant  # exponent of the smallest subnormal
    return sig_bits <= p and lowest_exp >= min_sub_exp and top_exp <= info.maxexp


@dataclasses.dataclass(frozen=True)
class FixedFormat:
    """Two's complement (or unsigned) fixed point: value = code * 2**-frac_length.

    Parameters
    ----------
    word_length : int
        Total number of bits, sign bit included, 1 to 64.
    frac_length : int
        Number of fractional bits; may be negative (coarser than integers) or larger than
        ``word_length`` (all bits fractional).
    signed : bool, default True
        Two's complement when True, unsigned otherwise.

    Notes
    -----
    Gupta et al.'s ``<IL, FL>`` is ``FixedFormat(IL + FL, FL)``: IL counts the sign bit.
    Signed codes run from ``-2**(word_length-1)`` to ``2**(word_length-1) - 1``.

    Examples
    --------
    >>> import fixedsim as fs
    >>> q = fs.FixedFormat(16, 14)
    >>> q, q.int_bits, q.eps, q.max, q.min
    (Q<16,14>, 2, 6.103515625e-05, 1.99993896484375, -2.0)
    """

    word_length: int
    frac_length: int
    signed: bool = True

    def __post_init__(self):
        w = _check_int("word_length", self.word_length, 1, 64, "FixedFormat")
        f = _check_int("frac_length", self.frac_length, -1024, 1074, "FixedFormat")
        if not isinstance(self.signed, (bool, np.bool_)):
            raise TypeError(f"FixedFormat: signed must be a bool, got {self.signed!r}")
        object.__setattr__(self, "word_length", w)
        object.__setattr__(self, "frac_length", f)
        object.__setattr__(self, "signed", bool(self.signed))
        if w - f > 1023:
            raise ValueError(
                f"FixedFormat: word_length - frac_length must be <= 1023 so that every value "
                f"fits in float64, got {w} - {f} = {w - f}"
            )

    # -- identity ---------------------------------------------------------------------------
    kind = "fixed"

    def __repr__(self) -> str:
        return f"{'' if self.signed else 'U'}Q<{self.word_length},{self.frac_length}>"

    __str__ = __repr__

    # -- derived facts ----------------------------------------------------------------------
    @property
    def int_bits(self) -> int:
        """Integer bits, the sign bit included for signed formats (Gupta's IL)."""
        return self.word_length - self.frac_length

    @property
    def frac_bits(self) -> int:
        """Fractional bits (same as ``frac_length``)."""
        return self.frac_length

    @property
    def width(self) -> int:
        """Bits in a code."""
        return self.word_length

    @property
    def max_code(self) -> int:
        """Largest code, as a signed integer."""
        return (1 << (self.word_length - self.signed)) - 1

    @property
    def min_code(self) -> int:
        """Smallest code, as a signed integer (0 for unsigned formats)."""
        return -(1 << (self.word_length - 1)) if self.signed else 0

    @property
    def eps(self) -> float:
        """Quantum (distance between neighbours), ``2**-frac_length``; also ``ulp``."""
        return math.ldexp(1.0, -self.frac_length)

    ulp = eps

    @property
    def max(self) -> float:
        """Largest value (rounded toward zero to float64 when the word exceeds 53 bits)."""
        return _to_float_toward_zero(Fraction(self.max_code) * Fraction(2) ** -self.frac_length)

    @property
    def min(self) -> float:
        """Most negative value (0.0 for unsigned formats)."""
        return math.ldexp(float(self.min_code), -self.frac_length)

    @property
    def smallest(self) -> float:
        """Smallest positive value, same as ``eps``."""
        return self.eps

    @property
    def dtype(self) -> np.dtype:
        """Container dtype: float32 when every value is exactly a float32, else float64."""
        sig = self.word_length - self.signed
        top = self.word_length - self.signed - self.frac_length
        if _fits_float(sig, -self.frac_length, top, np.float32):
            return np.dtype(np.float32)
        return np.dtype(np.float64)

    @property
    def code_dtype(self) -> np.dtype:
        """Unsigned integer dtype that holds a code (``to_bits`` output)."""
        return _code_dtype(self.word_length)

    @property
    def exact_in_container(self) -> bool:
        """True when every value is exactly representable in ``dtype`` (word <= 53 bits)."""
        return self.word_length - self.signed <= 53


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """Binary floating point with ``exp_bits`` exponent and ``man_bits`` stored mantissa bits.

    Parameters
    ----------
    exp_bits : int
        Exponent field width, 2 to 11.
    man_bits : int
        Stored mantissa (trailing significand) bits, 0 to 52; the precision is ``man_bits + 1``.
        0 is an exponent-only format (E8M0): unsigned, no zero, no subnormals, ``inf_nan="fn"``.
    subnormals : bool, default True
        When False, results below the smallest normal are flushed to a signed zero
        (tininess detected after rounding).
    inf_nan : {"ieee", "fn", "fnuz", "none"}, default "ieee"
        How the specials are encoded:

        * ``"ieee"``: the all-ones exponent encodes inf (mantissa 0) and NaN (mantissa != 0).
        * ``"fn"`` (finite, OCP FP8 E4M3 style): no infinities; only the all-ones exponent *and*
          all-ones mantissa encode NaN, so the top binade holds normal numbers.
        * ``"fnuz"`` (finite, unsigned zero: AMD MI300 and Graphcore FP8): no infinities, no
          negative zero; the one NaN is the code with only the sign bit set (0x80 in 8 bits);
          the default bias is one more than IEEE's. A result that is zero is ``+0.0``.
        * ``"none"`` (OCP MX FP6 and FP4): no infinities and no NaN; every code is a number.
          A NaN input is refused (ValueError), as for fixed point.

        Overflow saturates by default for every kind but ``"ieee"`` (see :func:`quantize`).
    signed : bool, default True
        False drops the sign bit (``inf_nan="fn"`` only): negative inputs (not -0.0) become NaN,
        zeros ``+0.0``.
    bias : int, optional
        Exponent bias; default ``2**(exp_bits-1) - 1``, one more for ``"fnuz"``.

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.FP16.max, fs.FP16.eps, fs.FP16.min_normal, fs.FP16.min_subnormal
    (65504.0, 0.0009765625, 6.103515625e-05, 5.960464477539063e-08)
    >>> fs.FloatFormat(4, 3, inf_nan="fn") == fs.FP8_E4M3, fs.FP8_E4M3.max
    (True, 448.0)
    >>> fs.FP8_E4M3FNUZ.bias, fs.FP8_E4M3FNUZ.max, fs.FP4_E2M1.max, fs.E8M0.max
    (8, 240.0, 6.0, 1.7014118346046923e+38)
    """

    exp_bits: int
    man_bits: int
    subnormals: bool = dataclasses.field(default=True, kw_only=True)
    inf_nan: str = dataclasses.field(default="ieee", kw_only=True)
    signed: bool = dataclasses.field(default=True, kw_only=True)
    bias: int | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        e = _check_int("exp_bits", self.exp_bits, 2, 11, "FloatFormat")
        m = _check_int("man_bits", self.man_bits, 0, 52, "FloatFormat")
        for name in ("subnormals", "signed"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"FloatFormat: {name} must be a bool, got "
                                f"{getattr(self, name)!r}")
        if not isinstance(self.inf_nan, str) or self.inf_nan.lower() not in _INF_NAN:
            raise ValueError(
                f"FloatFormat: inf_nan must be 'ieee' (inf and NaN), 'fn' (finite: no inf, "
                f"one NaN pattern), 'fnuz' (no inf, no -0, NaN at the sign-bit code) or "
                f"'none' (no inf, no NaN), got {self.inf_nan!r}"
            )
        kind = self.inf_nan.lower()
        default_bias = (1 << (e - 1)) - 1 + (kind == "fnuz")
        bias = default_bias if self.bias is None else _check_int(
            "bias", self.bias, -1100, 1100, "FloatFormat")
        object.__setattr__(self, "exp_bits", e)
        object.__setattr__(self, "man_bits", m)
        object.__setattr__(self, "subnormals", bool(self.subnormals))
        object.__setattr__(self, "signed", bool(self.signed))
        object.__setattr__(self, "inf_nan", kind)
        object.__setattr__(self, "bias", bias)
        if not self.signed and kind != "fn":
            raise ValueError(
                f"FloatFormat: an unsigned format (signed=False) encodes NaN as the all-ones "
                f"code and has no infinities: it needs inf_nan='fn', got {kind!r}")
        if m == 0 and (self.signed or self.subnormals):
            raise ValueError(
                "FloatFormat: man_bits=0 is an exponent-only format (E8M0: no zero, no "
                "subnormals, no sign): it needs signed=False and subnormals=False")
        if kind == "none" and e + m < 2:
            raise ValueError("FloatFormat: inf_nan='none' needs exp_bits + man_bits >= 2")
        if self.emax >= 1024 or self.emin - m < -1074:
            raise ValueError(
                f"FloatFormat: E{e}M{m} with bias {bias} ({kind!r}) has values beyond float64 "
                f"(exponents {self.emin - m} to {self.emax}, float64 holds -1074 to 1023); "
                "use fewer exponent bits or another bias")

    kind = "float"

    def __repr__(self) -> str:
        key = (self.exp_bits, self.man_bits, self.inf_nan, self.signed, self.bias)
        base = _PRESET_NAMES.get(key)
        if base is None:
            default_bias = (1 << (self.exp_bits - 1)) - 1 + (self.inf_nan == "fnuz")
            base = (("" if self.signed else "U") + f"E{self.exp_bits}M{self.man_bits}"
                    + (f"B{self.bias}" if self.bias != default_bias else "")
                    + ("" if self.inf_nan == "ieee" else self.inf_nan))
        return base if self.subnormals or self.man_bits == 0 else base + "-ftz"

    __str__ = __repr__

    # -- derived facts ----------------------------------------------------------------------
    @property
    def has_inf(self) -> bool:
        """True when the format encodes infinities (``inf_nan="ieee"``)."""
        return self.inf_nan == "ieee"

    @property
    def has_nan(self) -> bool:
        """True when the format encodes NaN (every kind but ``"none"``)."""
        return self.inf_nan != "none"

    @property
    def has_zero(self) -> bool:
        """False for exponent-only formats (``man_bits == 0``, E8M0), True otherwise."""
        return self.man_bits > 0

    @property
    def has_negative_zero(self) -> bool:
        """True when -0.0 is a value: signed formats except ``"fnuz"``."""
        return self.signed and self.inf_nan != "fnuz" and self.has_zero

    @property
    def precision(self) -> int:
        """Significand precision in bits, ``man_bits + 1``."""
        return self.man_bits + 1

    @property
    def width(self) -> int:
        """Bits in a code: sign (if signed) + exponent + mantissa."""
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal: ``1 - bias``; ``-bias`` when ``man_bits == 0``
        (an exponent-only format has no zero or subnormals: field 0 is a normal number)."""
        return (1 if self.man_bits else 0) - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        top = (1 << self.exp_bits) - 1  # all-ones exponent field
        reserved = self.has_inf or (self.inf_nan == "fn" and self.man_bits == 0)
        return (top - 1 if reserved else top) - self.bias

    @property
    def max_significand(self) -> int:
        """Largest significand at ``emax``: ``max == max_significand * 2**(emax - man_bits)``."""
        full = (1 << (self.man_bits + 1)) - 1
        return full - 1 if self.inf_nan == "fn" and self.man_bits > 0 else full

    @property
    def max(self) -> float:
        """Largest finite value."""
        return math.ldexp(float(self.max_significand), self.emax - self.man_bits)

    @property
    def min(self) -> float:
        """Most negative finite value, ``-max``."""
        return -self.max

    @property
    def eps(self) -> float:
        """Distance from 1 to the next larger value, ``2**-man_bits``; also ``ulp``."""
        return math.ldexp(1.0, -self.man_bits)

    ulp = eps

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2**emin``."""
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest subnormal, ``2**(emin - man_bits)`` (not a value if subnormals=False)."""
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def smallest(self) -> float:
        """Smallest positive value of the format."""
        return self.min_subnormal if self.subnormals else self.min_normal

    @property
    def dtype(self) -> np.dtype:
        """Container dtype: float32 when every value is exactly a float32, else float64."""
        if _fits_float(self.precision, self.emin - self.man_bits, self.emax + 1, np.float32):
            return np.dtype(np.float32)
        return np.dtype(np.float64)

    @property
    def code_dtype(self) -> np.dtype:
        """Unsigned integer dtype that holds a code (``to_bits`` output)."""
        return _code_dtype(self.width)

    @property
    def exact_in_container(self) -> bool:
        """Always True: every float format here fits float64."""
        return True


Format = FixedFormat | FloatFormat


def _to_float_toward_zero(q: Fraction) -> float:
    f = float(q)  # correctly rounded to nearest
    if abs(Fraction(f)) > abs(q):
        f = math.nextafter(f, 0.0)
    return f


FP64 = FloatFormat(11, 52)
FP32 = FloatFormat(8, 23)
TF32 = FloatFormat(8, 10)
FP16 = FloatFormat(5, 10)
BF16 = FloatFormat(8, 7)
FP8_E5M2 = FloatFormat(5, 2)
FP8_E4M3 = FloatFormat(4, 3, inf_nan="fn")
FP8_E3M4 = FloatFormat(3, 4)
FP8_E4M3FNUZ = FloatFormat(4, 3, inf_nan="fnuz")
FP8_E5M2FNUZ = FloatFormat(5, 2, inf_nan="fnuz")
FP6_E2M3 = FloatFormat(2, 3, inf_nan="none")
FP6_E3M2 = FloatFormat(3, 2, inf_nan="none")
FP4_E2M1 = FloatFormat(2, 1, inf_nan="none")
E8M0 = FloatFormat(8, 0, inf_nan="fn", signed=False, subnormals=False)

#: Preset names by (exp_bits, man_bits, inf_nan, signed, bias): repr and parse_format use them.
_PRESET_NAMES = {
    (f.exp_bits, f.man_bits, f.inf_nan, f.signed, f.bias): name
    for name, f in (("FP64", FP64), ("FP32", FP32), ("TF32", TF32), ("FP16", FP16),
                    ("BF16", BF16), ("FP8_E5M2", FP8_E5M2), ("FP8_E4M3", FP8_E4M3),
                    ("FP8_E3M4", FP8_E3M4), ("FP8_E4M3FNUZ", FP8_E4M3FNUZ),
                    ("FP8_E5M2FNUZ", FP8_E5M2FNUZ), ("FP6_E2M3", FP6_E2M3),
                    ("FP6_E3M2", FP6_E3M2), ("FP4_E2M1", FP4_E2M1), ("E8M0", E8M0))
}


_FIXED_RE = re.compile(r"^(U?)Q<\s*(-?\d+)\s*,\s*(-?\d+)\s*>$")
_FLOAT_RE = re.compile(r"^(U?)E(\d+)M(\d+)(?:B(-?\d+))?(FNUZ|FN|NONE)?$")


def parse_format(text) -> Format:
    """The format a string names: the inverse of ``repr`` of a format.

    Parameters
    ----------
    text : str or FixedFormat or FloatFormat
        ``"Q<16,14>"`` (signed fixed point, word and fractional length), ``"UQ<8,8>"``
        (unsigned), a preset name (``"FP32"``, ``"FP16"``, ``"BF16"``, ``"TF32"``,
        ``"FP8_E4M3"``, ``"FP8_E5M2"``, ``"FP64"``, ``"FP8_E4M3FNUZ"``, ``"FP8_E5M2FNUZ"``,
        ``"FP8_E3M4"``, ``"FP6_E2M3"``, ``"FP6_E3M2"``, ``"FP4_E2M1"``, ``"E8M0"``),
        ``"E5M2"``/``"E4M3fn"``/``"E4M3fnuz"``/``"E2M1none"`` (exponent and mantissa bits,
        then the ``inf_nan`` kind when not ``"ieee"``), with ``B<bias>`` after the mantissa bits
        for a bias other than the default (``"E4M3B11fnuz"``) and a leading ``U`` for an
        unsigned format (``"UE5M3fn"``); any of them followed by ``-ftz`` (no subnormals).
        Case is ignored. A format is returned as it is.

    Raises
    ------
    ValueError
        The string names no format, or names one with invalid fields.

    Examples
    --------
    >>> import fixedsim as fs
    >>> from fixedsim.formats import parse_format
    >>> parse_format("Q<16,14>"), parse_format("fp16"), parse_format("E4M3fn")
    (Q<16,14>, FP16, FP8_E4M3)
    >>> parse_format(repr(fs.FloatFormat(5, 2, subnormals=False)))
    FP8_E5M2-ftz
    >>> parse_format("e4m3fnuz"), parse_format("E4M3B11fnuz").bias, parse_format("UE5M3fn").width
    (FP8_E4M3FNUZ, 11, 8)
    """
    if isinstance(text, (FixedFormat, FloatFormat)):
        return text
    if not isinstance(text, str):
        raise TypeError(f"a format must be a FixedFormat, a FloatFormat or its name, "
                        f"got {type(text).__name__} {text!r}")
    s = text.strip().upper().replace(" ", "")
    ftz = s.endswith("-FTZ")
    if ftz:
        s = s[:-4]
    m = _FIXED_RE.match(s)
    try:
        if m:
            if ftz:
                raise ValueError("-ftz applies to float formats only")
            return FixedFormat(int(m.group(2)), int(m.group(3)), signed=not m.group(1))
        by_name = {name: key for key, name in _PRESET_NAMES.items()}
        if s in by_name:
            e, mb, inf_nan, signed, bias = by_name[s]
            return FloatFormat(e, mb, subnormals=not ftz and mb > 0, inf_nan=inf_nan,
                               signed=signed, bias=bias)
        m = _FLOAT_RE.match(s)
        if m:
            mb = int(m.group(3))
            return FloatFormat(int(m.group(2)), mb, subnormals=not ftz and mb > 0,
                               inf_nan=(m.group(5) or "ieee").lower(), signed=not m.group(1),
                               bias=None if m.group(4) is None else int(m.group(4)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"format {text!r}: {err}") from None
    raise ValueError(f"unknown format {text!r}; expected Q<word,frac>, UQ<word,frac>, ExMy, "
                     f"ExMyfn, ExMyfnuz, ExMynone, UExMyfn, ExMyB<bias>... or one of "
                     f"{', '.join(_PRESET_NAMES.values())} (optionally -ftz)")
