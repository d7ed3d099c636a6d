"""The specification of a matrix product: :class:`MatmulSpec` and :class:`Accumulator`."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from ..blockformats import BlockFormat
from ..formats import FP32, FP64, FixedFormat, FloatFormat
from ..jit.rng import random_u64_array
from ..quantize import (
    _check_format,
    _check_random_bits,
    random_key,
    resolve_overflow,
)
from ..rounding import Overflow, Rounding

_RNE = Rounding.NEAREST_EVEN


@dataclasses.dataclass(frozen=True)
class Accumulator:
    """The running sum of a multiply-accumulate array.

    Parameters
    ----------
    fmt : FixedFormat or FloatFormat
        Format of the running sum.
    rounding : Rounding or str, default NEAREST_EVEN
        Rounding of each addition into ``fmt``.
    overflow : Overflow or str, optional
        Applied at every step: SATURATE or WRAP for fixed point (default SATURATE);
        INFINITY (IEEE default) or SATURATE for floats.
    block : int, default 1
        Products summed exactly before each rounding: 1 is a chain of fused multiply-adds,
        larger values model the exact dot-product units of matrix engines.
    random_bits : int, optional
        STOCHASTIC only: random bits per rounding (1 to 64, default 64).
    via : FloatFormat, optional
        A wider register the sum passes through: each step is rounded to nearest-even into
        ``via`` first, then into ``fmt`` (the double rounding of a kernel that adds in FP32
        and stores FP16). None: one rounding per step.
    lanes : int, optional
        How each block is reduced (the structure of the CPU and GPU matrix units that are
        not aligned adders; docs/hardware_cpu.md). None (default): the block's products, and
        the running sum when ``addend="first"``, are summed exactly and rounded once. An int
        ``L`` in ``1..block``: ``L`` interleaved chains of fused multiply-adds, each step
        rounded into ``fmt``: the ``i``-th product of the block (in ``order``) is added to
        chain ``i mod L``; every chain starts at +0, chain 0 at the running sum when
        ``addend="first"``; then the chains are added as ``combine`` says, one rounding per
        addition. ``lanes=1`` with the defaults below is the FMA chain of ``block=1``.
    order : {"ascending", "descending"}, default "ascending"
        Order of the products within a block ("descending": the last first, as VDPBF16PS
        takes the odd element of a pair first). The last block may be shorter.
    combine : {"tree", "sequential"}, default "tree"
        How the ``lanes`` chains are added: pairwise (``(c0 + c1) + (c2 + c3)``, an odd one
        carried to the next level) or in order (``((c0 + c1) + c2) + c3``).
    addend : {"first", "last"}, default "first"
        Where the running sum (the previous blocks' result) enters a block: "first", in the
        exact block sum or at the start of chain 0; "last", added to the block's reduced
        value with one more rounding (the AMX tile instructions, AMD matrix cores).

    Flushing is a property of formats: an ``fmt`` with ``subnormals=False`` flushes every
    rounding of the sum (FTZ: rounded as if the exponent range were unbounded, a result below
    the smallest normal becomes a signed zero); inputs read as zero when subnormal (DAZ, sign
    kept) are an input format with ``subnormals=False`` (:class:`MatmulSpec` ``input``).

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.Accumulator(fs.FixedFormat(24, 16), "toward_zero", "wrap")
    Accumulator(Q<24,16>, TOWARD_ZERO, WRAP, block=1)
    """

    fmt: FixedFormat | FloatFormat
    rounding: Rounding = _RNE
    overflow: Overflow | None = None
    block: int = 1
    random_bits: int | None = None
    via: FloatFormat | None = None
    lanes: int | None = None
    order: str = "ascending"
    combine: str = "tree"
    addend: str = "first"

    def __post_init__(self):
        fmt = _check_format(self.fmt)
        rounding = Rounding.coerce(self.rounding, what="Accumulator rounding")
        object.__setattr__(self, "fmt", fmt)
        object.__setattr__(self, "rounding", rounding)
        object.__setattr__(self, "overflow", resolve_overflow(fmt, self.overflow))
        if isinstance(self.block, bool) or not isinstance(self.block, numbers.Integral):
            raise TypeError(f"Accumulator block must be an int >= 1, got {self.block!r}")
        if self.block < 1:
            raise ValueError(f"Accumulator block must be >= 1 (products summed exactly per "
                             f"rounding), got {self.block}")
        object.__setattr__(self, "block", int(self.block))
        if self.random_bits is not None:
            _check_random_bits(rounding, self.random_bits)
        if self.via is not None and not isinstance(self.via, FloatFormat):
            raise TypeError(f"Accumulator via must be a FloatFormat or None, got {self.via!r}")
        self._check_structure()

    def _check_structure(self):
        lanes = self.lanes
        if lanes is not None:
            if isinstance(lanes, bool) or not isinstance(lanes, numbers.Integral):
                raise TypeError(f"Accumulator lanes must be None or an int >= 1, got {lanes!r}")
            if not 1 <= lanes <= self.block:
                raise ValueError(f"Accumulator lanes must be in 1..block ({self.block}): each "
                                 f"chain takes at least one product of a block; got {lanes}")
            object.__setattr__(self, "lanes", int(lanes))
        for name, allowed in (("order", ("ascending", "descending")),
                              ("combine", ("tree", "sequential")),
                              ("addend", ("first", "last"))):
            v = getattr(self, name)
            if not isinstance(v, str) or v.lower() not in allowed:
                raise ValueError(f"Accumulator {name} must be one of {', '.join(allowed)}; "
                                 f"got {v!r}")
            object.__setattr__(self, name, v.lower())
        if self.structured:
            if not isinstance(self.fmt, FloatFormat):
                raise ValueError(f"Accumulator lanes, order and addend model floating-point "
                                 f"units: fmt must be a FloatFormat, got {self.fmt!r}")
            if self.rounding is Rounding.STOCHASTIC or self.via is not None:
                raise ValueError("Accumulator lanes, order and addend take a deterministic "
                                 "rounding and no `via` register; got "
                                 f"{self.rounding.name}, via={self.via!r}")

    @property
    def structured(self) -> bool:
        """Is a block reduced otherwise than by one exact sum with the running sum in it
        (``lanes``, ``order`` or ``addend`` set)?"""
        return (self.lanes is not None or self.order != "ascending"
                or self.addend != "first")

    def roundings(self, K: int) -> int:
        """How many times one output's sum is rounded into ``fmt`` for ``K`` products."""
        nblocks = -(-K // self.block)
        if self.lanes is None:
            return nblocks * (2 if self.addend == "last" else 1)
        return K + nblocks * ((self.lanes - 1) + (1 if self.addend == "last" else 0))

    def __repr__(self):
        rb = "" if self.random_bits is None else f", random_bits={self.random_bits}"
        via = "" if self.via is None else f", via={self.via!r}"
        st = "" if self.lanes is None else f", lanes={self.lanes}"
        for name, default in (("order", "ascending"), ("combine", "tree"),
                              ("addend", "first")):
            if getattr(self, name) != default:
                st += f", {name}={getattr(self, name)!r}"
        return (f"Accumulator({self.fmt!r}, {self.rounding.name}, {self.overflow.name}, "
                f"block={self.block}{rb}{via}{st})")


@dataclasses.dataclass(frozen=True)
class BlockFMA:
    """The aligned, truncating multi-term adder of a tensor core (one block per instruction).

    For each block of ``block`` consecutive products (and the addend C, or the previous
    blocks' result, when it is not zero), per output element:

    1. every product is exact and kept unnormalised: with ``a = sa 2**ea`` and ``b = sb
       2**eb`` (``sa, sb`` in ``[0, 2)``, ``ea`` at least the input format's ``emin``, so
       subnormal inputs keep their exponent) the term is ``(sa sb) 2**(ea + eb)``; zero
       products drop out; C is read as an FP32 value (exponent at least -126);
    2. the anchor ``E`` is the largest term exponent, and at least ``min_exp``;
    3. every term is cut to a multiple of ``2**(E - 23 - extra_bits)``, toward zero (its
       significand, with 23 fraction bits, shifted left by ``extra_bits`` and right by ``E``
       minus its exponent, without guard or sticky bits), and the cut terms are summed
       exactly;
    4. that sum is rounded once with ``rounding`` into ``fmt`` with ``output_frac_bits``
       fraction bits (gradual underflow at ``fmt``'s smallest normal; overflow gives an
       infinity in every rounding mode); a zero sum is +0.

    The result is the next block's C. An infinity or NaN among a block's products or its C
    makes the block's result their IEEE sum. The exact definition is
    :func:`fixedsim.reference.block_fma`; ``fixedsim.hardware`` holds the NVIDIA parameters.

    With ``promote`` (the remedy of DeepSeek-V3, arXiv:2412.19437, section 3.3: the partial
    sum copied to an FP32 register every ``N_C = 128`` products), the K axis is cut into
    chunks of ``promote`` products; each chunk is summed by the blocks above starting from
    +0, and each chunk's result is added to a running sum in ``fmt`` (all its fraction bits)
    with one addition rounded to nearest even (overflow to an infinity; an exact zero sum is
    +0 unless both terms are -0). The running sum starts at the addend C, which therefore
    takes part in no block: it is the FP32 accumulator's start.

    With ``interleave`` (and ``promote``), a chunk's blocks do not take consecutive products:
    K is padded with zero products to a multiple of ``promote``, and the products of each
    chunk are dealt to its ``promote // block`` blocks in groups of ``interleave``
    consecutive products, round robin (group ``g`` of the chunk to its block ``g mod
    (promote // block)``); every block of every chunk runs, in order. This is how Hopper
    runs the FP8 ``mma.sync`` of K = 32 (an Ada instruction) on its FP16 unit, and the B200
    vectors show the same: each register of four FP8 values ``k = 4t .. 4t + 3`` is
    unpacked into two pairs, the first FP16 instruction (K = 16) takes the low pairs (``k
    mod 4`` in {0, 1}), the second the high pairs, from +0, and C is added to the result
    (``promote=32, interleave=2``; docs/hardware.md).

    With ``addend_bits=(m, c)`` C (the previous block's result after the first block) is no
    term of the block: the block's products alone are aligned and cut as above (their anchor
    ``E``), and their cut sum ``P`` and C are aligned again, to ``E2 = max(E, e_C, -126)``
    (``e_C`` C's exponent, read as an FP32 value; -126 for a zero C): ``P`` is cut to a
    multiple of ``2**(E2 - m)`` and C to one of ``2**(E2 - c)``, both toward minus
    infinity, and their exact sum is rounded once as in step 4. This is the adder of the
    AMD CDNA3 matrix cores in the MMA-Sim model (``m, c = 31, 24``; docs/hardware_cpu.md).
    It does not combine with ``promote``. A third value, ``addend_bits=(m, c, d)``, drops C
    (reads it as 0, instead of flooring it) when ``e_C < E2 - d``, as MMA-Sim's CDNA3 FP8
    model does with ``d = 25``.

    With ``groups=G`` (and ``addend_bits``) the block's products are split into ``G``
    interleaved groups, product ``i`` of the block into group ``i mod G``: each group is
    aligned to its own anchor ``E_g`` (its largest product exponent, at least ``min_exp``)
    and cut toward zero at ``23 + extra_bits`` bits below it as in step 3; the group sums are
    then aligned to the largest anchor ``E = max E_g`` and floored (toward minus infinity)
    to multiples of ``2**(E - 23 - extra_bits)``, and their exact sum is the products' cut
    sum that the ``addend_bits`` stage aligns with C. A group without products takes no part.
    This is the CDNA3 FP8 adder in the MMA-Sim model (blocks of 16, the even and the odd
    products apart: ``groups=2``; docs/hardware_cpu.md).

    With ``zero_exp`` a zero operand is read at that exponent when the anchor is taken, so a
    zero product ``0 * b`` takes part in the anchor at ``zero_exp + e_b`` (its cut is 0), as
    MMA-Sim's model reads zeros (at -126); by default zero products take no part in it.

    With ``product_inf_exp`` a product of magnitude ``2**product_inf_exp`` or more is an
    infinity of its sign, and the block's result is the IEEE sum of those infinities (C
    finite; an infinite or NaN operand or C still gives the IEEE sum of the exact terms), as
    MMA-Sim has the CDNA3 adder treat BF16 products of ``2**128`` or more.

    Parameters
    ----------
    block : int
        Products per block (the instruction's K), at least 1.
    extra_bits : int
        Bits kept beyond 23 fraction bits below the anchor (-23 to 30; negative: fewer).
    rounding : Rounding or str, default TOWARD_ZERO
        Rounding of each block's sum (any but STOCHASTIC).
    fmt : FloatFormat, default FP32
        Format of each block's result (an IEEE format with infinities, 8 exponent bits or
        fewer).
    output_frac_bits : int, optional
        Fraction bits each block's result keeps (1 to ``fmt.man_bits``; None: all of
        ``fmt``'s), e.g. 13 for the FP8 units of Ada and Hopper.
    min_exp : int, optional
        Smallest anchor (None: no floor).
    promote : int, optional
        Products per chunk whose result is added to a running sum in ``fmt`` (a multiple of
        ``block``; None: no promotion, the blocks chain along all of K from C).
    interleave : int, optional
        Products per group dealt round robin to the blocks of each chunk (needs ``promote``;
        ``block`` a multiple of it; None: the blocks take consecutive products).
    addend_bits : (int, int) or (int, int, int), optional
        ``(m, c)``: C enters after the products' cut sum, both aligned again and cut toward
        minus infinity at ``m`` and ``c`` fraction bits below their common anchor (``1 <= c
        <= m``, ``m + bitlen(block) <= 48``; None: C is a term of the block). ``(m, c, d)``:
        also, C of exponent below ``E2 - d`` is read as 0 (``c <= d <= 4096``).
    zero_exp : int, optional
        Exponent at which a zero operand takes part in the anchor (-1100 to 1100; None: zero
        products take no part in it).
    product_inf_exp : int, optional
        Products of magnitude ``2**product_inf_exp`` or more are infinities (-1100 to 1100;
        None: every finite product is a term).
    groups : int, optional
        Interleaved groups of a block's products, each aligned and cut at its own anchor,
        their sums floored at the largest (1 to ``block``; needs ``addend_bits``; None or 1:
        the block's products are one group).

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or out of range, named in the message.

    Examples
    --------
    Two products of an H100 block, ``1`` and ``2**-24 + 2**-34``: the small one is cut at
    ``2**-25`` (25 bits below the anchor) to ``2**-24``, and ``1 + 2**-24`` truncates into
    FP32 to 1 (an exact block sum rounded to nearest would give ``1 + 2**-23``).

    >>> import numpy as np, fixedsim as fs
    >>> acc = fs.BlockFMA(16, 2, min_exp=-133)
    >>> spec = fs.MatmulSpec(input=fs.FP16, accumulator=acc)
    >>> fs.matmul(np.array([[1.0, 2.0**-12]]), np.array([[1.0], [2.0**-12 * (1 + 2.0**-10)]]),
    ...           spec)
    array([[1.]], dtype=float32)
    """

    block: int
    extra_bits: int
    rounding: Rounding = Rounding.TOWARD_ZERO
    fmt: FloatFormat = FP32
    output_frac_bits: int | None = None
    min_exp: int | None = None
    promote: int | None = None
    interleave: int | None = None
    addend_bits: tuple | None = None
    zero_exp: int | None = None
    product_inf_exp: int | None = None
    groups: int | None = None

    def __post_init__(self):
        for name, lo, hi in (("block", 1, 2**20), ("extra_bits", -23, 30)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"BlockFMA {name} must be an int, got {v!r}")
            if not lo <= v <= hi:
                raise ValueError(f"BlockFMA {name} must be in {lo}..{hi}, got {v}")
            object.__setattr__(self, name, int(v))
        rounding = Rounding.coerce(self.rounding, what="BlockFMA rounding")
        if rounding is Rounding.STOCHASTIC:
            raise ValueError("BlockFMA rounding must be deterministic (TOWARD_ZERO, "
                             "NEAREST_EVEN, ...), got STOCHASTIC")
        object.__setattr__(self, "rounding", rounding)
        f = self.fmt
        if not isinstance(f, FloatFormat) or not f.has_inf or f.exp_bits > 8:
            raise TypeError(f"BlockFMA fmt must be an IEEE FloatFormat with infinities and at "
                            f"most 8 exponent bits (FP32, FP16, ...), got {f!r}")
        ofb = self.output_frac_bits
        if ofb is not None:
            if isinstance(ofb, bool) or not isinstance(ofb, numbers.Integral):
                raise TypeError(f"BlockFMA output_frac_bits must be an int or None, got {ofb!r}")
            if not 1 <= ofb <= f.man_bits:
                raise ValueError(f"BlockFMA output_frac_bits must be in 1..{f.man_bits} "
                                 f"(fmt {f!r}), got {ofb}")
            object.__setattr__(self, "output_frac_bits", int(ofb))
        me = self.min_exp
        if me is not None:
            if isinstance(me, bool) or not isinstance(me, numbers.Integral):
                raise TypeError(f"BlockFMA min_exp must be an int or None, got {me!r}")
            if not -1100 <= me <= 1100:
                raise ValueError(f"BlockFMA min_exp must be in -1100..1100, got {me}")
            object.__setattr__(self, "min_exp", int(me))
        pr = self.promote
        if pr is not None:
            if isinstance(pr, bool) or not isinstance(pr, numbers.Integral):
                raise TypeError(f"BlockFMA promote must be an int or None, got {pr!r}")
            if pr < 1:
                raise ValueError(f"BlockFMA promote must be at least 1, got {pr}")
            if pr % self.block:
                raise ValueError(f"BlockFMA promote must be a multiple of block "
                                 f"({self.block}), got {pr}")
            object.__setattr__(self, "promote", int(pr))
        il = self.interleave
        if il is not None:
            if isinstance(il, bool) or not isinstance(il, numbers.Integral):
                raise TypeError(f"BlockFMA interleave must be an int or None, got {il!r}")
            if pr is None:
                raise ValueError("BlockFMA interleave needs promote (the chunk whose blocks "
                                 "the groups are dealt to)")
            if il < 1 or self.block % il:
                raise ValueError(f"BlockFMA interleave must be a divisor of block "
                                 f"({self.block}), got {il}")
            object.__setattr__(self, "interleave", int(il))
        ab = self.addend_bits
        if ab is not None:
            if (not isinstance(ab, (tuple, list)) or len(ab) not in (2, 3)
                    or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                           for v in ab)):
                raise TypeError(f"BlockFMA addend_bits must be a pair of ints (sum bits, C "
                                f"bits), a triple (with C's drop distance) or None, got {ab!r}")
            m, cb = int(ab[0]), int(ab[1])
            if not 1 <= cb <= m or m + self.block.bit_length() > 48:
                raise ValueError(f"BlockFMA addend_bits (m, c) needs 1 <= c <= m and m + "
                                 f"bitlen(block) <= 48 (block {self.block}), got {ab!r}")
            if len(ab) == 3 and not cb <= ab[2] <= 4096:
                raise ValueError(f"BlockFMA addend_bits (m, c, d) needs c <= d <= 4096 (C is "
                                 f"dropped below 2**(E2 - d), kept at least to its cut), got "
                                 f"{ab!r}")
            if pr is not None:
                raise ValueError("BlockFMA addend_bits does not combine with promote (with "
                                 "promote, C starts the running sum the chunks are added to)")
            object.__setattr__(self, "addend_bits", tuple(int(v) for v in ab))
        ze = self.zero_exp
        if ze is not None:
            if isinstance(ze, bool) or not isinstance(ze, numbers.Integral):
                raise TypeError(f"BlockFMA zero_exp must be an int or None, got {ze!r}")
            if not -1100 <= ze <= 1100:
                raise ValueError(f"BlockFMA zero_exp must be in -1100..1100, got {ze}")
            object.__setattr__(self, "zero_exp", int(ze))
        pe = self.product_inf_exp
        if pe is not None:
            if isinstance(pe, bool) or not isinstance(pe, numbers.Integral):
                raise TypeError(f"BlockFMA product_inf_exp must be an int or None, got {pe!r}")
            if not -1100 <= pe <= 1100:
                raise ValueError(f"BlockFMA product_inf_exp must be in -1100..1100, got {pe}")
            object.__setattr__(self, "product_inf_exp", int(pe))
        g = self.groups
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, numbers.Integral):
                raise TypeError(f"BlockFMA groups must be an int or None, got {g!r}")
            if not 1 <= g <= self.block:
                raise ValueError(f"BlockFMA groups must be in 1..block ({self.block}): each "
                                 f"group takes product i of a block with i mod groups; got {g}")
            if ab is None:
                raise ValueError("BlockFMA groups needs addend_bits (C enters after the group "
                                 "sums are combined)")
            object.__setattr__(self, "groups", int(g))

    #: Every block's result overflows to an infinity (the Accumulator attribute of the name).
    overflow = Overflow.INFINITY
    random_bits = None
    via = None
    structured = False

    @property
    def frac_bits(self) -> int:
        """Fraction bits of each block's result."""
        return self.fmt.man_bits if self.output_frac_bits is None else self.output_frac_bits

    @property
    def register(self) -> FloatFormat:
        """The format each block's sum is rounded into (``fmt`` with ``frac_bits``)."""
        return FloatFormat(self.fmt.exp_bits, self.frac_bits)

    def roundings(self, K: int) -> int:
        """How many times one output's sum is rounded for ``K`` products (once per block, and
        once per chunk of ``promote`` products; with ``interleave``, every block of every
        chunk)."""
        if self.interleave is not None:
            return -(-K // self.promote) * (self.promote // self.block + 1)
        return -(-K // self.block) + (0 if self.promote is None else -(-K // self.promote))

    def __repr__(self):
        parts = [str(self.block), str(self.extra_bits)]
        if self.rounding is not Rounding.TOWARD_ZERO:
            parts.append(f"rounding={self.rounding.name}")
        if self.fmt != FP32:
            parts.append(f"fmt={self.fmt!r}")
        if self.output_frac_bits is not None:
            parts.append(f"output_frac_bits={self.output_frac_bits}")
        if self.min_exp is not None:
            parts.append(f"min_exp={self.min_exp}")
        if self.promote is not None:
            parts.append(f"promote={self.promote}")
        if self.interleave is not None:
            parts.append(f"interleave={self.interleave}")
        if self.addend_bits is not None:
            parts.append(f"addend_bits={self.addend_bits}")
        if self.zero_exp is not None:
            parts.append(f"zero_exp={self.zero_exp}")
        if self.product_inf_exp is not None:
            parts.append(f"product_inf_exp={self.product_inf_exp}")
        if self.groups is not None:
            parts.append(f"groups={self.groups}")
        return f"BlockFMA({', '.join(parts)})"


def _fmt_or_none(v, name):
    if v is None:
        return None
    try:
        return _check_format(v)
    except TypeError:
        raise TypeError(f"MatmulSpec {name} must be a FixedFormat, a FloatFormat or None, "
                        f"got {v!r}") from None


@dataclasses.dataclass(frozen=True)
class MatmulSpec:
    """Every rounding of a matrix product (see the module docstring and docs/matmul.md).

    Parameters
    ----------
    input : FixedFormat, FloatFormat or BlockFormat, optional
        Both operands are quantized to it first (None: taken as they are). A
        :class:`~fixedsim.BlockFormat` (MX, NVFP4) takes both operands in blocks along the
        reduction axis K (``a``'s last axis, ``b``'s second to last; a convolution's lowered
        matrices along theirs), K zero-padded to a multiple of the block for the scales
        (docs/block_formats.md, "Products").
    product : FixedFormat or FloatFormat, optional
        Each product is rounded into it (None: exact).
    accumulator : Accumulator, BlockFMA, FixedFormat or FloatFormat, optional
        The running sum (a format means ``Accumulator(fmt)``; :class:`BlockFMA`: the aligned,
        truncating adder of a tensor core); None: exact accumulation.
    output : FixedFormat or FloatFormat, optional
        The result is rounded once into it. None: the accumulator's values; with no
        accumulator either, the exact sums rounded into float64.
    output_rounding : Rounding or str, default NEAREST_EVEN
    seed : int, numpy.random.Generator or None
        Random stream of the stochastic stages, as for :func:`fixedsim.quantize` (an int: the
        same draws every call; a Generator: fresh draws per call; None: fresh entropy).
    input_rounding, product_rounding : Rounding or str, default NEAREST_EVEN
    random_bits : int, optional
        Random bits of the stochastic input, product and output roundings (default 64).

    Raises
    ------
    ValueError
        A rounding given for a stage that does not round (``input_rounding`` without
        ``input``, ``product_rounding`` without ``product``, ``output_rounding`` other than
        NEAREST_EVEN with an accumulator and no output), ``random_bits`` with no stochastic
        stage.

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32, output=fs.FP16)
    MatmulSpec(input=FP16, accumulator=Accumulator(FP32, NEAREST_EVEN, INFINITY, block=1), \
output=FP16)
    """

    input: FixedFormat | FloatFormat | None = None
    product: FixedFormat | FloatFormat | None = None
    accumulator: Accumulator | None = None
    output: FixedFormat | FloatFormat | None = None
    output_rounding: Rounding = _RNE
    seed: object = None
    input_rounding: Rounding = _RNE
    product_rounding: Rounding = _RNE
    random_bits: int | None = None

    def __post_init__(self):
        for name in ("input", "product", "output"):
            v = getattr(self, name)
            if name == "input" and isinstance(v, BlockFormat):
                continue  # operands in blocks along K (docs/block_formats.md)
            if isinstance(v, BlockFormat):
                raise TypeError(f"MatmulSpec {name} cannot be a block format ({v!r}): block "
                                "formats scale the operands (input=); products and outputs "
                                "are rounded into element formats")
            object.__setattr__(self, name, _fmt_or_none(v, name))
        acc = self.accumulator
        if acc is not None and not isinstance(acc, (Accumulator, BlockFMA)):
            acc = Accumulator(_fmt_or_none(acc, "accumulator"))
        object.__setattr__(self, "accumulator", acc)
        if isinstance(acc, BlockFMA) and self.product is not None:
            raise ValueError("MatmulSpec product must be None with a BlockFMA accumulator "
                             f"(its products are exact and unnormalised), got {self.product!r}")
        for name in ("output_rounding", "input_rounding", "product_rounding"):
            object.__setattr__(self, name, Rounding.coerce(getattr(self, name), what=name))
        for stage, rnd in (("input", "input_rounding"), ("product", "product_rounding")):
            if getattr(self, stage) is None and getattr(self, rnd) is not _RNE:
                raise ValueError(f"MatmulSpec {rnd}={getattr(self, rnd).name} has no effect: "
                                 f"{stage} is None (nothing is rounded there)")
        if self.output is None and acc is not None and self.output_rounding is not _RNE:
            raise ValueError(f"MatmulSpec output_rounding={self.output_rounding.name} has no "
                             "effect: output is None, so the result is the accumulator's value")
        if self.random_bits is not None:
            if Rounding.STOCHASTIC not in self._stage_roundings():
                raise ValueError("MatmulSpec random_bits applies to stochastic input, product "
                                 "or output rounding, and none of them is STOCHASTIC")
            _check_random_bits(Rounding.STOCHASTIC, self.random_bits)
        if not (self.seed is None or isinstance(self.seed, np.random.Generator)):
            random_key(self.seed)  # type and range check

    def _stage_roundings(self):
        r = []
        if self.input is not None:
            r.append(self.input_rounding)
        if self.product is not None:
            r.append(self.product_rounding)
        if self.output is not None or self.accumulator is None:
            r.append(self.output_rounding)
        return r

    @property
    def stochastic(self) -> bool:
        """Does any stage round stochastically (so a seed matters)?"""
        acc = self.accumulator
        return (Rounding.STOCHASTIC in self._stage_roundings()
                or (acc is not None and acc.rounding is Rounding.STOCHASTIC))

    @property
    def result_format(self):
        """Format of the result: ``output``, else the accumulator's, else FP64."""
        if self.output is not None:
            return self.output
        return self.accumulator.fmt if self.accumulator is not None else FP64

    def __repr__(self):
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                parts.append(f"{f.name}={v.name if isinstance(v, Rounding) else repr(v)}")
        return f"MatmulSpec({', '.join(parts)})"



def stage_keys(seed) -> np.ndarray:
    """The random keys of the five stochastic stages of a matrix product, from one seed.

    Stage ``s`` (:data:`fixedsim.reference.STAGE_INPUT_A` ... ``STAGE_OUTPUT``) draws
    ``random_u64(keys[s], i) >> (64 - random_bits)`` for its ``i``-th rounding, where
    ``keys = random_u64(random_key(seed), 0..4)`` (:mod:`fixedsim.jit.rng`).
    """
    return random_u64_array(random_key(seed), 0, 5)
