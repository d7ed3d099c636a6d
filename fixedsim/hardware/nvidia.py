"""Presets of NVIDIA tensor cores, V100 to B200: one :class:`~fixedsim.BlockFMA` each.

Every preset is ``MatmulSpec(input=<device format>, accumulator=BlockFMA(...))``: products
exact and unnormalised, each block of ``F`` products and C aligned to the largest exponent
(at least ``min_exp``), cut ``23 + n`` bits below it, summed exactly, rounded once per block
(docs/hardware.md). The parameters are those of the published models (Fasi, Higham,
Mikaitis, Pranesh, PeerJ Computer Science 7:e330, 2021; Khattak and Mikaitis, "Accurate
Models of NVIDIA Tensor Cores", arXiv:2512.07004), except where the measured vectors called
for another model (marked "found here" below).

=========  ======================  ===========  ==================  =========================
device     fp16 / bf16: F, n, min  tf32: F      fp8 (E4M3, E5M2)    fp16 output
=========  ======================  ===========  ==================  =========================
V100       4, 0, -1024 (fp16)      -            -                   nearest even, min -19
A100, A2,  8, 1, -132              4            -                   nearest even, min -20
A30
Ada, L40S  8, 1, -132              4            F 16, n -10, 13     nearest even, min -20;
                                                fraction bits       fp8: 10 fraction bits
                                                                    (found here)
H100,      16, 2, -133             8            F 32, n -10, 13     nearest even, min -21;
H200                                            fraction bits       fp8: on the fp16 unit
                                                                    (found here)
B200       16, 2, -133             8            on the fp16 unit    nearest even, min -21;
                                                (found here)        fp8: on the fp16 unit
                                                                    (found here)
=========  ======================  ===========  ==================  =========================

FP32 results truncate (toward zero); FP16 results round to nearest even. "On the fp16 unit"
(:data:`FP8_ON_FP16`, found here): the FP8 ``mma.sync`` of K = 32 that measured these
vectors is an Ada instruction, which Hopper and Blackwell run as two instructions of their
FP16 unit (K = 16, the device's fp16 parameters) from +0, the first on the products ``k mod
4`` in {0, 1}, the second on the others, and C added to their result with one rounding to
nearest even: ``BlockFMA(16, 2, ..., promote=32, interleave=2)``. The FP8 results of H100
and H200 into FP32 were measured with ``wgmma`` (the native FP8 path, C = 0).

The provenance of each preset (:data:`VALIDATION`) states the vectors it was checked on and
how many of them mismatched; ``tests/test_hardware_nvidia.py`` recomputes the counts on the
vendored subset, ``fixedsim verify hardware --vectors DIR`` on all of them.
"""

from __future__ import annotations

from ..formats import BF16, FP8_E4M3, FP8_E5M2, FP16, TF32
from ..matmul import BlockFMA, MatmulSpec
from ..rounding import Rounding
from . import Preset, register

__all__ = ["PARAMETERS", "FP8_ON_FP16", "VALIDATION", "block_fma"]

_IN = {"fp16": FP16, "bf16": BF16, "tf32": TF32, "e4m3": FP8_E4M3, "e5m2": FP8_E5M2}
_FP8 = ("e4m3", "e5m2")

#: Per device: (F, n, min_exp) of fp16/bf16, F of tf32, (F, n) of the native fp8 unit or
#: None, min_exp of FP16 results. n and min_exp of tf32 are those of fp16/bf16.
PARAMETERS = {
    "V100": ((4, 0, -1024), None, None, -19),
    "A100": ((8, 1, -132), 4, None, -20),
    "A2": ((8, 1, -132), 4, None, -20),
    "A30": ((8, 1, -132), 4, None, -20),
    "Ada": ((8, 1, -132), 4, (16, -10), -20),
    "L40S": ((8, 1, -132), 4, (16, -10), -20),
    "H100": ((16, 2, -133), 8, (32, -10), -21),
    "H200": ((16, 2, -133), 8, (32, -10), -21),
    "B200": ((16, 2, -133), 8, None, -21),
}

#: (device, output) whose FP8 inputs go through the FP16 unit (found here from the measured
#: vectors): the FP8 ``mma.sync`` (K = 32) run as two FP16 instructions of K = 16 from +0,
#: the first on the products ``k mod 4`` in {0, 1}, then C added with one rounding to
#: nearest even into the output (``promote=32, interleave=2``).
FP8_ON_FP16 = frozenset({("H100", "fp16"), ("H200", "fp16"), ("B200", "fp16"),
                         ("B200", "fp32")})

#: Combinations whose data no model here reproduces; their preset is the published model's
#: (or, where that is further off, the nearest found here), with its mismatch count.
_OPEN: frozenset = frozenset()


def block_fma(device: str, input: str, out: str) -> BlockFMA:
    """The :class:`~fixedsim.BlockFMA` of one device, input and output (canonical names)."""
    (F, n, me), f_tf32, fp8, me16 = PARAMETERS[device]
    kw = {}
    if input == "tf32":
        F = f_tf32
    elif input in _FP8 and (device, out) in FP8_ON_FP16:  # the fp16 unit's F, n: found here
        kw.update(promote=32, interleave=2)
    elif input in _FP8:
        F, n = fp8
        if n < 0 and out == "fp32":
            kw["output_frac_bits"] = 23 + n  # the FP8 units keep 13 fraction bits
    if out == "fp16":
        kw.update(fmt=FP16, rounding=Rounding.NEAREST_EVEN)
        me = me16
    return BlockFMA(F, n, min_exp=me, **kw)


def _has(device, input, out):
    _, f_tf32, fp8, _ = PARAMETERS[device]
    if device == "V100":
        return input == "fp16"
    if input == "tf32":
        return f_tf32 is not None and out == "fp32"
    if input in _FP8:
        return fp8 is not None or (device, out) in FP8_ON_FP16
    return input == "fp16" or out == "fp32"


_DATA = ("measured vectors of Khattak and Mikaitis (MATLAB-tensor-core, model_validation/"
         "{d}/{f}, BSD 2-Clause)")
_FOUND = {("Ada", "e4m3", "fp16"): "10 fraction bits and nearest even, found here from the data "
                                   "(the published model keeps 23 - 10 = 0)",
          ("Ada", "e5m2", "fp16"): "10 fraction bits and nearest even, found here from the data "
                                   "(the published model keeps 23 - 10 = 0)",
          **{(d, i, o): "the FP8 mma.sync run on the FP16 unit: two blocks of 16 (the "
                        "device's fp16 parameters) from +0, the first on the products k mod 4 "
                        "in {0, 1}, then C added with one rounding to nearest even (promote="
                        "32, interleave=2), found here from the data"
             for d, o in FP8_ON_FP16 for i in _FP8}}
_SAME_AS = {"A30": "A100", "L40S": "Ada"}

#: (device, input, out) -> (vectors checked, mismatches): computed by ``fixedsim verify
#: hardware`` on the full data (5,000 rows each), written here as data; the tests recompute
#: the counts of the vendored subset, the CI check those of the full data.
VALIDATION = {
    ('V100', 'fp16', 'fp32'): (5000, 0),
    ('V100', 'fp16', 'fp16'): (5000, 0),
    ('A100', 'fp16', 'fp32'): (5000, 0),
    ('A100', 'fp16', 'fp16'): (5000, 0),
    ('A100', 'bf16', 'fp32'): (5000, 0),
    ('A100', 'tf32', 'fp32'): (5000, 0),
    ('A2', 'fp16', 'fp32'): (5000, 0),
    ('A2', 'fp16', 'fp16'): (5000, 0),
    ('A2', 'bf16', 'fp32'): (5000, 0),
    ('A2', 'tf32', 'fp32'): (5000, 0),
    ('Ada', 'fp16', 'fp32'): (5000, 0),
    ('Ada', 'fp16', 'fp16'): (5000, 0),
    ('Ada', 'bf16', 'fp32'): (5000, 0),
    ('Ada', 'tf32', 'fp32'): (5000, 0),
    ('Ada', 'e4m3', 'fp32'): (5000, 0),
    ('Ada', 'e4m3', 'fp16'): (5000, 0),
    ('Ada', 'e5m2', 'fp32'): (5000, 0),
    ('Ada', 'e5m2', 'fp16'): (5000, 0),
    ('L40S', 'fp16', 'fp32'): (5000, 0),
    ('L40S', 'fp16', 'fp16'): (5000, 0),
    ('L40S', 'bf16', 'fp32'): (5000, 0),
    ('L40S', 'tf32', 'fp32'): (5000, 0),
    ('L40S', 'e4m3', 'fp32'): (5000, 0),
    ('L40S', 'e5m2', 'fp32'): (5000, 0),
    ('H100', 'fp16', 'fp32'): (5000, 0),
    ('H100', 'fp16', 'fp16'): (5000, 0),
    ('H100', 'bf16', 'fp32'): (5000, 0),
    ('H100', 'tf32', 'fp32'): (5000, 0),
    ('H100', 'e4m3', 'fp32'): (5000, 0),
    ('H100', 'e4m3', 'fp16'): (5000, 0),
    ('H100', 'e5m2', 'fp32'): (5000, 0),
    ('H100', 'e5m2', 'fp16'): (5000, 0),
    ('H200', 'fp16', 'fp32'): (5000, 0),
    ('H200', 'fp16', 'fp16'): (5000, 0),
    ('H200', 'bf16', 'fp32'): (5000, 0),
    ('H200', 'tf32', 'fp32'): (5000, 0),
    ('H200', 'e4m3', 'fp32'): (5000, 0),
    ('H200', 'e4m3', 'fp16'): (5000, 0),
    ('H200', 'e5m2', 'fp32'): (5000, 0),
    ('H200', 'e5m2', 'fp16'): (5000, 0),
    ('B200', 'fp16', 'fp32'): (5000, 0),
    ('B200', 'fp16', 'fp16'): (5000, 0),
    ('B200', 'bf16', 'fp32'): (5000, 0),
    ('B200', 'tf32', 'fp32'): (5000, 0),
    ('B200', 'e4m3', 'fp32'): (5000, 0),
    ('B200', 'e4m3', 'fp16'): (5000, 0),
    ('B200', 'e5m2', 'fp32'): (5000, 0),
    ('B200', 'e5m2', 'fp16'): (5000, 0),
}


def _provenance(d, i, o):
    fd = {"e4m3": "E4M3", "e5m2": "E5M2"}.get(i, i)
    if (d, i, o) in VALIDATION:
        n, bad = VALIDATION[(d, i, o)]
        text = f"{_DATA.format(d=d, f=fd)}: {n} rows, {bad} mismatches"
        if (d, i, o) in _FOUND:
            text += f"; {_FOUND[(d, i, o)]}"
        elif (d, i, o) in _OPEN:
            text += ("; no model found here matches all rows: the preset is the nearest tried "
                     "(the published model keeps 0 fraction bits)")
        else:
            text += "; published model (Khattak and Mikaitis, arXiv:2512.07004)"
        return text, n, bad
    src = _SAME_AS.get(d)
    base = (f"published model, not validated here: {src}'s parameters (same architecture)"
            if src else "published model, not validated here")
    if src and (src, i, o) in _FOUND:
        base += f"; {_FOUND[(src, i, o)]} on {src}"
    return base, 0, None


def _presets():
    for d in PARAMETERS:
        for i in ("fp16", "bf16", "tf32", "e4m3", "e5m2"):
            for o in ("fp32", "fp16"):
                if not _has(d, i, o):
                    continue
                acc = block_fma(d, i, o)
                text, n, bad = _provenance(d, i, o)
                yield Preset(d, i, o, _builder(_IN[i], acc), text, n, bad)


def _builder(fmt, acc):
    return lambda: MatmulSpec(input=fmt, accumulator=acc)


for _p in _presets():
    register(_p)
