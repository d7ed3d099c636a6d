"""Rounding and overflow rules, and their exact meaning.

Every rounding in fixedsim is a *single* rounding of the exact real result to one of its two
neighbours in the target format, ``lo <= x <= hi`` (``lo == hi`` when ``x`` is representable):

=================  ===========================================================================
``NEAREST_EVEN``   the nearer neighbour; a tie goes to the one with an even last code bit
``NEAREST_AWAY``   the nearer neighbour; a tie goes to the one of larger magnitude
``TOWARD_ZERO``    the neighbour of smaller magnitude (truncation)
``DOWN``           ``lo`` (toward -inf, floor)
``UP``             ``hi`` (toward +inf, ceiling)
``ODD``            ``x`` if representable, else the neighbour with an odd last code bit
                   (round to odd: a later rounding to at least two fewer bits is then exact)
``STOCHASTIC``     ``hi`` with probability ``(x - lo) / (hi - lo)``, else ``lo``
=================  ===========================================================================

Overflow rules say what happens when the rounded value (rounded as if the exponent range, or the
integer range of a fixed-point format, were unbounded) lies beyond the format's largest magnitude:

=============  =================================================================================
``SATURATE``   clamp to the format's largest (or most negative) value; infinities clamp too
``WRAP``       keep the low ``word_length`` bits of the two's complement code (fixed point only)
``INFINITY``   IEEE 754: +-inf for the nearest modes and STOCHASTIC, +-max for TOWARD_ZERO and
               ODD, and for DOWN/UP +-inf only on the side the mode rounds toward (floats with
               infinities only)
=============  =================================================================================

Strings are accepted at the public edge, in any case (``"nearest_even"``, ``"SATURATE"``), and
normalised once with :meth:`Rounding.coerce` / :meth:`Overflow.coerce`.
"""

from __future__ import annotations

import enum

__all__ = ["Rounding", "Overflow"]


class _CoercibleEnum(enum.IntEnum):
    """An IntEnum whose members can be named by a case-insensitive string at the API edge."""

    @classmethod
    def coerce(cls, value, *, what: str | None = None):
        """Return the member named or given by ``value``.

        Parameters
        ----------
        value : member of this enum or str
            A member, or its name in any case (``"nearest_even"``).
        what : str, optional
            The argument name to use in error messages.

        Raises
        ------
        TypeError
            If ``value`` is neither a member nor a string.
        ValueError
            If the string names no member.
        """
        what = what or cls.__name__.lower()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                valid = ", ".join(m.name for m in cls)
                raise ValueError(
                    f"unknown {what} {value!r}; expected one of {valid} (any case)"
                ) from None
        raise TypeError(
            f"{what} must be a fixedsim.{cls.__name__} member or its name as a string, "
            f"got {type(value).__name__} {value!r}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    __str__ = __repr__


class Rounding(_CoercibleEnum):
    """Rounding mode of a single rounding (see the module docstring for the exact rules).

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.quantize([0.375, -0.375], fs.FixedFormat(8, 2), fs.Rounding.NEAREST_EVEN)
    array([ 0.5, -0.5], dtype=float32)
    >>> fs.quantize([0.375, -0.375], fs.FixedFormat(8, 2), "down")
    array([ 0.25, -0.5 ], dtype=float32)
    """

    NEAREST_EVEN = 0
    NEAREST_AWAY = 1
    TOWARD_ZERO = 2
    DOWN = 3
    UP = 4
    ODD = 5
    STOCHASTIC = 6

    @property
    def is_nearest(self) -> bool:
        """True for the two round-to-nearest modes."""
        return self in (Rounding.NEAREST_EVEN, Rounding.NEAREST_AWAY)


class Overflow(_CoercibleEnum):
    """What happens to a rounded value beyond the format's range (see the module docstring)."""

    SATURATE = 0
    WRAP = 1
    INFINITY = 2
