"""Block-scaled formats: OCP Microscaling (MX) and NVIDIA's NVFP4.

A block format stores a tensor as *elements* of a small format, ``block`` consecutive
elements along one axis sharing one *scale* (a power of two in E8M0 for MX, an E4M3 number for
NVFP4), and, for two-level formats, one per-tensor scale. The value of element ``i`` of block
``b`` is ``element[i] * scale[b] * tensor_scale``.

The format is a frozen value like :class:`~fixedsim.formats.FloatFormat`; quantizing into it is
:func:`fixedsim.quantize` (values), :func:`fixedsim.to_bits` (element and scale codes) and
:func:`fixedsim.from_bits`. The semantics, scale rules and worked examples are in
docs/block_formats.md.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .formats import (
    E8M0,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FP32,
    FixedFormat,
    FloatFormat,
)

__all__ = ["BlockFormat", "SCALE_RULES", "MXFP8_E4M3", "MXFP8_E5M2", "MXFP6_E2M3",
           "MXFP6_E3M2", "MXFP4", "MXINT8", "NVFP4"]

#: The shared-scale rules, by name: what each computes from the block's largest magnitude
#: ``amax`` (exactly, never in floating point), ``emax`` the exponent of the element's largest
#: value and ``max`` that value.
SCALE_RULES = {
    "ocp": "2**(floor(log2(amax)) - emax): OCP MX v1.0 section 6.3 (torchao FLOOR, gfloat, "
           "microxcaling); elements beyond max after scaling clamp to max",
    "ceil": "2**(ceil(log2(amax)) - emax): torchao CEIL",
    "even": "2**(floor(log2(r)) - emax), r = amax rounded to the element's precision, ties "
            "away from zero: torchao EVEN",
    "rceil": "2**ceil(log2(amax / max)), the smallest power of two that brings amax within "
             "max: cuBLAS / torchao RCEIL (no element clamps)",
    "nearest": "amax / (max * tensor_scale) rounded to nearest even into the scale format "
               "(at least its smallest positive value): NVFP4",
}

#: The rules whose scale is a power of two.
POW2_RULES = ("ocp", "ceil", "even", "rceil")


def _element_emax(fmt) -> int:
    """floor(log2(max)) of an element format."""
    if isinstance(fmt, FloatFormat):
        return fmt.emax
    return fmt.max_code.bit_length() - 1 - fmt.frac_length


def _element_precision(fmt) -> int:
    """Significant bits of an element's magnitude (the "even" rule rounds amax to them)."""
    if isinstance(fmt, FloatFormat):
        return fmt.precision
    return fmt.word_length - 1


def _element_smallest_exp(fmt) -> int:
    """log2 of an element format's smallest positive value."""
    if isinstance(fmt, FloatFormat):
        return fmt.emin - (fmt.man_bits if fmt.subnormals else 0)
    return -fmt.frac_length


def _pow2_range(fmt: FloatFormat) -> tuple[int, int]:
    """The exponents k for which 2**k is a value of the float format ``fmt``."""
    lo = fmt.emin - fmt.man_bits if fmt.subnormals else fmt.emin
    return lo, fmt.emax


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: ``block`` elements along one axis share one scale.

    Parameters
    ----------
    element : FloatFormat or FixedFormat
        Format of each element (for example :data:`~fixedsim.FP4_E2M1`, or
        ``FixedFormat(8, 6)`` for MXINT8's ``k/64``). A signed format.
    block : int, default 32
        Elements per block, 1 to 2**20.
    scale : FloatFormat, default E8M0
        Format of the per-block scale.
    scale_rule : {"ocp", "ceil", "even", "rceil", "nearest"}, default "ocp"
        How the scale is derived from the block's largest magnitude (see :data:`SCALE_RULES`
        and docs/block_formats.md). The first four give a power of two, "nearest" any value of
        ``scale`` (NVFP4's E4M3 scale).
    tensor_scale : FloatFormat, optional
        Format of a second, per-tensor scale (NVFP4: FP32), "nearest" rule only. It is
        ``amax_tensor / (element.max * scale.max)`` rounded to nearest even into
        ``tensor_scale`` (at least its smallest positive value), ``amax_tensor`` the largest
        finite magnitude in the tensor.
    axis : int, default -1
        The axis the blocks run along; ``quantize(..., axis=)`` overrides it per call.

    Notes
    -----
    Quantizing a block (:func:`fixedsim.quantize`): ``amax`` = the largest magnitude in the
    block; the scale ``S`` from the rule (a power of two below the scale format's smallest is
    raised to it; one above its largest is an error); each element is ``x / S`` rounded once
    into ``element`` with the chosen rounding, values beyond the element's largest clamping to
    it (OCP MX v1.0, section 6.3); the value is ``element * S``. A block holding NaN or an
    infinity gets the NaN scale and all its values are NaN (OCP: a NaN scale makes the whole
    block NaN). An all-zero block gets the smallest scale.

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.MXFP4
    BlockFormat(FP4_E2M1, block=32, scale=E8M0, scale_rule='ocp')
    >>> fs.NVFP4.block, fs.NVFP4.scale, fs.NVFP4.tensor_scale
    (16, FP8_E4M3, FP32)
    >>> fs.MXFP8_E4M3.bits_per_element
    8.25
    """

    element: FloatFormat | FixedFormat
    block: int = 32
    scale: FloatFormat = E8M0
    scale_rule: str = "ocp"
    tensor_scale: FloatFormat | None = None
    axis: int = -1

    kind = "block"

    def __post_init__(self):
        cls = "BlockFormat"
        if not isinstance(self.element, (FloatFormat, FixedFormat)):
            raise TypeError(f"{cls}: element must be a FloatFormat or FixedFormat, got "
                            f"{type(self.element).__name__} {self.element!r}")
        if not self.element.signed:
            raise ValueError(f"{cls}: element must be a signed format, got {self.element!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, (int, np.integer)) \
                or not 1 <= self.block <= 2**20:
            raise ValueError(f"{cls}: block must be an int in [1, 2**20], got {self.block!r}")
        object.__setattr__(self, "block", int(self.block))
        if not isinstance(self.scale, FloatFormat):
            raise TypeError(f"{cls}: scale must be a FloatFormat (E8M0 for MX, FP8_E4M3 for "
                            f"NVFP4), got {type(self.scale).__name__} {self.scale!r}")
        rule = self.scale_rule.lower() if isinstance(self.scale_rule, str) else self.scale_rule
        if rule not in SCALE_RULES:
            raise ValueError(f"{cls}: scale_rule must be one of {', '.join(SCALE_RULES)}, got "
                             f"{self.scale_rule!r}")
        object.__setattr__(self, "scale_rule", rule)
        if self.tensor_scale is not None:
            if not isinstance(self.tensor_scale, FloatFormat):
                raise TypeError(f"{cls}: tensor_scale must be None or a FloatFormat, got "
                                f"{self.tensor_scale!r}")
            if rule != "nearest":
                raise ValueError(f"{cls}: a tensor_scale needs scale_rule='nearest' (the "
                                 f"NVFP4 two-level scale), got scale_rule={rule!r}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)):
            raise TypeError(f"{cls}: axis must be an int, got {self.axis!r}")
        object.__setattr__(self, "axis", int(self.axis))
        if rule in POW2_RULES:
            lo, hi = _pow2_range(self.scale)
            if hi < lo:
                raise ValueError(f"{cls}: scale {self.scale!r} holds no power of two")
        # every value element * scale (* tensor scale) must be a float64
        lo_s = _pow2_range(self.scale)[0]
        hi_s = math.floor(math.log2(self.scale.max))
        if self.tensor_scale is not None:
            lo_s += _pow2_range(self.tensor_scale)[0]
            hi_s += math.floor(math.log2(self.tensor_scale.max))
        if _element_smallest_exp(self.element) + lo_s < -1074 \
                or _element_emax(self.element) + hi_s > 1023:
            raise ValueError(f"{cls}: element {self.element!r} times scale {self.scale!r} has "
                             "values beyond float64's range")

    def __repr__(self) -> str:
        return (f"BlockFormat({self.element!r}, block={self.block}, scale={self.scale!r}, "
                f"scale_rule={self.scale_rule!r}"
                + (f", tensor_scale={self.tensor_scale!r}" if self.tensor_scale else "")
                + (f", axis={self.axis}" if self.axis != -1 else "") + ")")

    __str__ = __repr__

    # -- derived facts ----------------------------------------------------------------------
    @property
    def element_emax(self) -> int:
        """``floor(log2(element.max))``: the ``emax_elem`` of OCP MX v1.0."""
        return _element_emax(self.element)

    @property
    def max(self) -> float:
        """Largest value: the element's largest times the largest scale (times the largest
        tensor scale)."""
        t = self.tensor_scale.max if self.tensor_scale is not None else 1.0
        s = 2.0 ** _pow2_range(self.scale)[1] if self.scale_rule in POW2_RULES \
            else self.scale.max
        return self.element.max * s * t

    @property
    def dtype(self) -> np.dtype:
        """Container of the values :func:`fixedsim.quantize` returns: float64."""
        return np.dtype(np.float64)

    @property
    def bits_per_element(self) -> float:
        """Storage per element: element bits plus the block's share of its scale (the
        per-tensor scale not counted)."""
        return self.element.width + self.scale.width / self.block

    @property
    def width(self) -> int:
        """Bits in an element code."""
        return self.element.width


MXFP8_E4M3 = BlockFormat(FP8_E4M3)
MXFP8_E5M2 = BlockFormat(FP8_E5M2)
MXFP6_E2M3 = BlockFormat(FP6_E2M3)
MXFP6_E3M2 = BlockFormat(FP6_E3M2)
MXFP4 = BlockFormat(FP4_E2M1)
#: OCP MX v1.0 section 5.3: 8-bit two's complement with an implicit scale of 2**-6.
MXINT8 = BlockFormat(FixedFormat(8, 6))
NVFP4 = BlockFormat(FP4_E2M1, block=16, scale=FP8_E4M3, scale_rule="nearest", tensor_scale=FP32)
