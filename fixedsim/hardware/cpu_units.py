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
========================  =======================================================  ==========

AMD MI300 (CDNA3) has no preset: its published bit-accurate model (MMA-Sim) aligns the 8
products of a block to the largest exponent and truncates them at 24 fraction bits, then
aligns that sum and C again (31 and 24 bits, toward minus infinity) before one nearest-even
rounding: an aligned, truncating adder with a second stage for C, which neither an exact
block sum nor FMA chains express. Its FNUZ FP8 formats do not exist in fixedsim yet.

Sources: Intel 64 and IA-32 Architectures Software Developer's Manual, vol. 2 (VDPBF16PS,
TDPBF16PS, TDPFP16PS pseudo-code); P. Xie, Y. Wang, F. Yang, M. Yang, "MMA-Sim: Bit-Accurate
Reference Model of Tensor Cores and Matrix Cores", arXiv:2511.10909 (2025); X. Li, A. Li,
B. Fang, K. Swirydowicz, I. Laguna, G. Gopalakrishnan, "FTTN: Feature-Targeted Testing for
Numerical Properties of NVIDIA & AMD Matrix Accelerators", arXiv:2403.00232 (2024).
"""

from __future__ import annotations

from ..formats import BF16, FP16, FP32, FloatFormat
from ..matmul import Accumulator, MatmulSpec
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


for _p in _presets():
    register(_p)
