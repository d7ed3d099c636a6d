"""Presets of the CPU and AMD matrix units, all built from one mechanism: an
:class:`~fixedsim.Accumulator` with ``block``, ``lanes``, ``order`` and ``addend`` (each step
a correctly rounded FMA or addition into FP32), formats without subnormals for flushing.

========================  =======================================================  ==========
unit                      model                                                    source
========================  =======================================================  ==========
Intel VDPBF16PS           per FP32 lane, one FMA per product, the odd element of   SDM;
(``AVX512_BF16``)         each pair first (block 2, lanes 1, descending); BF16     this CPU
                          and C read with denormals as zero, results flushed
                          (FTZ), nearest even; MXCSR not read
Intel AMX TDPBF16PS       per instruction (K = 32): an even and an odd FMA chain   SDM;
(``AMX_BF16``)            from +0, their sum, then C (block 32, lanes 2, addend    this CPU
                          last); DAZ, FTZ, nearest even
Intel AMX TDPFP16PS       as TDPBF16PS, FP16 subnormal inputs kept                 SDM
(``AMX_FP16``)
AMD MI100 (CDNA1)         exact sum of C and 4 (FP16) or 2 (BF16) products, one    MMA-Sim
                          nearest-even rounding into FP32 (block 4 / 2)
AMD MI250 (CDNA2)         products rounded to FP32, pairwise FP32 tree of 4,       MMA-Sim,
                          then C (block 4, lanes 4, addend last); FP16/BF16        FTTN
                          inputs, C and every result flushed
AMD MI300 (CDNA3)         8 products aligned and cut at 24 bits, their sum and C   MMA-Sim
                          aligned again (31 and 24 bits, floor), one nearest-even
                          rounding (``BlockFMA(8, 1, addend_bits=(31, 24),
                          zero_exp=-126, product_inf_exp=128)``);
                          xf32: blocks of 4, inputs truncated to TF32;
                          FP8 (FNUZ): blocks of 16, even and odd products cut at
                          their own anchors, the two sums floored at 24 bits
                          below the larger, then C (dropped below 2**(E - 25))
                          (``groups=2, addend_bits=(31, 24, 25)``)
========================  =======================================================  ==========

AMD MI300 (CDNA3): a :class:`~fixedsim.BlockFMA` with a second stage for C
(``addend_bits``), after MMA-Sim's model of ``v_mfma_f32_*_f16``, ``*_bf16`` and ``*_xf32``.
Per block of 8 products (4 for xf32 and the K = 4 instructions, e.g.
``v_mfma_f32_16x16x4_4b_f16``): the products, exact and unnormalised, are aligned to the
largest product exponent ``E`` and cut toward zero at 24 fraction bits below it
(``extra_bits=1``) and summed exactly; that sum and C are aligned again to ``max(E, e_C,
-126)``, the sum cut at 31 and C at 24 fraction bits, both toward minus infinity; one
nearest-even rounding into FP32 (gradual underflow, overflow to an infinity); the result is
the next block's C. Subnormal inputs and C are kept; a zero operand is read at exponent -126
(``zero_exp``), so a zero product ``0 * b`` takes part in the anchor at ``-126 + e_b``, as
in MMA-Sim. xf32 inputs are FP32 values truncated to TF32 (``input_rounding=
"toward_zero"``). A product of ``2**128`` or more (BF16, xf32) is an infinity that decides
the block's result before C is added (``product_inf_exp=128``), as in MMA-Sim. The
FP8 instructions (``v_mfma_f32_16x16x32_fp8_fp8``, ``32x32x16``, and ``bf8_bf8``: inputs
FNUZ, 16 products per block) sum the even and the odd products of a block apart, each
aligned and cut at 24 bits below its own anchor (``groups=2``), floor both sums at 24 bits
below the larger anchor and add them; that sum and C are then aligned as above, except that
a C of exponent below ``E2 - 25`` is read as 0 rather than floored (``addend_bits=(31, 24,
25)``). The mixed forms (``fp8_bf8``, ``bf8_fp8``) take two input formats, which a
:class:`~fixedsim.MatmulSpec` does not express.

Sources: Intel 64 and IA-32 Architectures Software Developer's Manual, vol. 2 (VDPBF16PS,
TDPBF16PS, TDPFP16PS pseudo-code); P. Xie, Y. Wang, F. Yang, M. Yang, "MMA-Sim: Bit-Accurate
Reference Model of Tensor Cores and Matrix Cores", arXiv:2511.10909 (2025); X. Li, A. Li,
B. Fang, K. Swirydowicz, I. Laguna, G. Gopalakrishnan, "FTTN: Feature-Targeted Testing for
Numerical Properties of NVIDIA & AMD Matrix Accelerators", arXiv:2403.00232 (2024).
"""

from __future__ import annotations

from ..formats import BF16, FP8_E4M3FNUZ, FP8_E5M2FNUZ, FP16, FP32, TF32, FloatFormat
from ..matmul import Accumulator, BlockFMA, MatmulSpec
from ..rounding import Rounding
from . import Preset, register

#: FP32 with every result flushed (FTZ: rounded at full precision, then below 2**-126 -> 0).
FP32_FTZ = FloatFormat(8, 23, subnormals=False)
#: BF16 and FP16 read with subnormal inputs as zero, sign kept (DAZ).
BF16_DAZ = FloatFormat(8, 7, subnormals=False)
FP16_DAZ = FloatFormat(5, 10, subnormals=False)

_SDM = ("Intel 64 and IA-32 Architectures Software Developer's Manual, vol. 2, "
        "{} pseudo-code")
_THIS_CPU = ("validated on this CPU by `fixedsim verify cpu`: {} stress rows (mixed "
             "exponents, cancellation, subnormals, inf/NaN, nonzero C), 0 mismatches on an "
             "Intel Xeon, family 6 model 207 (Emerald Rapids); " + _SDM)
_MMASIM = ("published model, not validated here: MMA-Sim (Xie et al., arXiv:2511.10909, "
           "bit-accurate against the GPU), {}")


def _spec(inp, acc):
    return lambda: MatmulSpec(input=inp, accumulator=acc)


def _presets():
    amx = Accumulator(FP32_FTZ, block=32, lanes=2, addend="last")
    yield Preset("AVX512_BF16", "bf16", "fp32",
                 _spec(BF16_DAZ, Accumulator(FP32_FTZ, block=2, lanes=1, order="descending")),
                 _THIS_CPU.format(8192, "VDPBF16PS"), 8192, 0)
    yield Preset("AMX_BF16", "bf16", "fp32", _spec(BF16_DAZ, amx),
                 _THIS_CPU.format(8192, "TDPBF16PS"), 8192, 0)
    yield Preset("AMX_FP16", "fp16", "fp32", _spec(FP16, amx),
                 "published model, not validated here (this CPU has no amx_fp16): "
                 + _SDM.format("TDPFP16PS"))
    yield Preset("MI100", "fp16", "fp32", _spec(FP16, Accumulator(FP32, block=4)),
                 _MMASIM.format("CDNA1 v_mfma f16: C and 4 products summed exactly, one "
                                "nearest-even rounding"))
    yield Preset("MI100", "bf16", "fp32", _spec(BF16, Accumulator(FP32, block=2)),
                 _MMASIM.format("CDNA1 v_mfma bf16: C and 2 products summed exactly, one "
                                "nearest-even rounding"))
    tree = Accumulator(FP32_FTZ, block=4, lanes=4, addend="last")
    yield Preset("MI250", "fp16", "fp32", _spec(FP16_DAZ, tree),
                 _MMASIM.format("CDNA2 v_mfma f16: inputs and C flushed, products in FP32, "
                                "((p0+p1)+(p2+p3)) then C, every result flushed; the flushed "
                                "zeros keep their sign here (+0 in MMA-Sim)"))
    yield Preset("MI250", "bf16", "fp32", _spec(BF16_DAZ, tree),
                 _MMASIM.format("CDNA2 v_mfma bf16_1k (4 products per step; the older bf16 "
                                "instructions take 2): as f16"))

    yield from _mi300()


def mi300(block: int = 8, fp8: bool = False) -> BlockFMA:
    """The CDNA3 adder of MMA-Sim: ``block`` products (8; 4 for xf32 and the K = 4
    instructions) aligned and cut at 24 fraction bits, their sum and C aligned again and
    floored at 31 and 24 bits, one nearest-even rounding into FP32; a zero operand read at
    exponent -126, products of ``2**128`` or more infinities, as MMA-Sim has them. ``fp8``:
    the FP8 instructions' adder, blocks of 16 whose even and odd products are cut at their
    own anchors and their sums floored at the larger one (``groups=2``), C of exponent below
    ``E2 - 25`` read as 0 (``addend_bits=(31, 24, 25)``)."""
    if fp8:
        return BlockFMA(16, 1, rounding=Rounding.NEAREST_EVEN, addend_bits=(31, 24, 25),
                        zero_exp=-126, product_inf_exp=128, groups=2)
    return BlockFMA(block, 1, rounding=Rounding.NEAREST_EVEN, addend_bits=(31, 24),
                    zero_exp=-126, product_inf_exp=128)


def _mi300():
    for inp, fmt, name in (("fp16", FP16, "f16"), ("bf16", BF16, "bf16")):
        yield Preset("MI300", inp, "fp32", _spec(fmt, mi300()),
                     _MMASIM.format(f"CDNA3 v_mfma_f32_16x16x16_{name} and 32x32x8 (blocks of "
                                    "8): products cut at 24 bits below their anchor, their "
                                    "sum and C aligned again (31 and 24 bits, floor), one "
                                    "nearest-even rounding; a zero operand read at exponent "
                                    "-126"))
    yield Preset("MI300", "tf32", "fp32",
                 lambda: MatmulSpec(input=TF32, input_rounding=Rounding.TOWARD_ZERO,
                                    accumulator=mi300(4)),
                 _MMASIM.format("CDNA3 v_mfma_f32_16x16x8_xf32 (blocks of 4): FP32 inputs "
                                "truncated to TF32, then as f16"))
    for inp, fmt, name in (("e4m3", FP8_E4M3FNUZ, "fp8_fp8"), ("e5m2", FP8_E5M2FNUZ, "bf8_bf8")):
        yield Preset("MI300", inp, "fp32", _spec(fmt, mi300(fp8=True)),
                     _MMASIM.format(f"CDNA3 v_mfma_f32_16x16x32_{name} and 32x32x16 (FNUZ "
                                    "inputs, blocks of 16): the even and the odd products cut "
                                    "at 24 bits below their own anchors, the two sums floored "
                                    "at 24 bits below the larger and added, then aligned with "
                                    "C (31 and 24 bits, floor; C below 2**(E - 25) read as "
                                    "0), one nearest-even rounding"))


for _p in _presets():
    register(_p)
