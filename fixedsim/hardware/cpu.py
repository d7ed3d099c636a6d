"""This CPU's own arithmetic as an oracle: the instructions fixedsim's models describe, run.

A small C file (``csrc/cpu_units.c``) is compiled with the system C compiler the first time it
is needed, into a cache folder, and loaded with :mod:`ctypes`. Each check runs one instruction
family on inputs drawn to stress it (mixed exponents, cancellation, subnormals, infinities and
NaN) and compares every result, bit for bit, with the fixedsim model of that instruction:

========================  ============================================================
instruction               fixedsim model
========================  ============================================================
F16C VCVTPS2PH, 4 modes   ``fs.quantize(x, FP16, mode)`` (nearest even, down, up, toward 0)
FMA3 VFMADD (SS, SD)      ``Accumulator(FP32 / FP64, mode)``: a chain of FMAs; MXCSR's
                          FTZ and DAZ as an FP32 format and input without subnormals
AVX512_BF16 VDPBF16PS     the ``AVX512_BF16`` preset of :mod:`fixedsim.hardware`
AMX-BF16 TDPBF16PS        the ``AMX_BF16`` preset
========================  ============================================================

A check that cannot run says why (not x86-64 Linux, no compiler, an instruction this CPU does
not report, the kernel refusing AMX tile data). ``fixedsim verify cpu`` prints them all.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import numpy as np

from .. import reference
from ..formats import BF16, FP16, FP32, FP64, FloatFormat
from ..rounding import Rounding

__all__ = ["CpuCheck", "cpu_info", "harness", "check_all", "stress_bits", "CHECKS"]

_SRC = pathlib.Path(__file__).with_name("csrc") / "cpu_units.c"
#: MXCSR rounding control codes, which are also VCVTPS2PH's immediate rounding codes.
_RC = {Rounding.NEAREST_EVEN: 0, Rounding.DOWN: 1, Rounding.UP: 2, Rounding.TOWARD_ZERO: 3}
FP32_FTZ = FloatFormat(8, 23, subnormals=False)


def cpu_info() -> dict:
    """Vendor, model name, family/model/stepping and feature flags of this CPU (from
    ``/proc/cpuinfo`` on Linux; elsewhere what :mod:`platform` says, with no flags)."""
    info = {"vendor": "", "model_name": platform.processor() or platform.machine(),
            "family": None, "model": None, "stepping": None, "flags": frozenset(),
            "machine": platform.machine()}
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = text.split("\n\n")[0]
    fields = {}
    for line in first.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    info.update(vendor=fields.get("vendor_id", ""), model_name=fields.get("model name", ""),
                flags=frozenset(fields.get("flags", "").split()))
    for k in ("cpu family", "model", "stepping"):
        if fields.get(k, "").isdigit():
            info[k.replace("cpu ", "")] = int(fields[k])
    return info


_LIB = None
_LIB_ERR = None


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("FIXEDSIM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    d = pathlib.Path(base) / "fixedsim" if base else pathlib.Path.home() / ".cache" / "fixedsim"
    try:
        d.mkdir(parents=True, exist_ok=True)
        return d
    except OSError:
        d = pathlib.Path(tempfile.gettempdir()) / "fixedsim-cache"
        d.mkdir(parents=True, exist_ok=True)
        return d


def harness():
    """``(library, None)``, the compiled harness loaded with ctypes, or ``(None, reason)``.

    Built once per source and compiler into the cache folder (``$FIXEDSIM_CACHE``,
    ``$XDG_CACHE_HOME/fixedsim`` or ``~/.cache/fixedsim``) with ``$CC``, ``cc``, ``gcc`` or
    ``clang``.
    """
    global _LIB, _LIB_ERR
    if _LIB is not None or _LIB_ERR is not None:
        return _LIB, _LIB_ERR
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
        _LIB_ERR = f"the harness is for x86-64 POSIX systems, this is {platform.machine()}"
        return None, _LIB_ERR
    cc = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang")
               if c and shutil.which(c)), None)
    if cc is None:
        _LIB_ERR = "no C compiler found ($CC, cc, gcc, clang)"
        return None, _LIB_ERR
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + shutil.which(cc).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_units-{tag}.so"
    if not lib.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        cmd = [cc, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-o", tmp, str(_SRC)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp)
            _LIB_ERR = (f"the C compiler {cc} could not build the harness (an old compiler "
                        f"without AVX512-BF16 or AMX intrinsics?): "
                        f"{r.stderr.strip().splitlines()[-1:]}")
            return None, _LIB_ERR
        os.replace(tmp, lib)  # atomic: parallel test workers may build it at once
    _LIB = ctypes.CDLL(str(lib))
    return _LIB, None


def _p(x):
    return x.ctypes.data_as(ctypes.c_void_p)


_I = ctypes.c_int64
_AMX = None


def _amx_ready(lib):
    global _AMX
    if _AMX is None:
        _AMX = lib.fs_amx_request() == 0
    return _AMX


# -- the instructions ----------------------------------------------------------------------------
def cvtps2ph(x, rounding) -> np.ndarray:
    """VCVTPS2PH of float32 ``x`` with the immediate rounding ``rounding``: FP16 bit codes."""
    lib, err = harness()
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, np.uint16)
    lib.fs_cvtps2ph(_p(x), _p(out), _I(x.size), ctypes.c_int(_RC[Rounding.coerce(rounding)]))
    return out


def fma_gemm(A, B, C, rounding=Rounding.NEAREST_EVEN, ftz=False, daz=False) -> np.ndarray:
    """``D = C + A B`` by chains of scalar FMA3 instructions in ``k`` order, float32 or float64
    by ``A``'s dtype, under the MXCSR rounding (and FTZ, DAZ) given."""
    lib, err = harness()
    dt = np.float64 if np.asarray(A).dtype == np.float64 else np.float32
    A, B, C = (np.ascontiguousarray(x, dt) for x in (A, B, C))
    (M, K), N = A.shape, B.shape[1]
    D = np.empty((M, N), dt)
    f = lib.fs_fma64_gemm if dt == np.float64 else lib.fs_fma32_gemm
    f(_p(A), _p(B), _p(C), _p(D), _I(M), _I(N), _I(K), ctypes.c_int(_RC[rounding]),
      ctypes.c_int(int(ftz)), ctypes.c_int(int(daz)))
    return D


def dpbf16ps_gemm(A, B, C) -> np.ndarray:
    """``D = C + A B`` by VDPBF16PS (``A``, ``B`` BF16 bit codes, ``K`` even; one FP32 lane
    per output)."""
    lib, err = harness()
    A, B = (np.ascontiguousarray(x, np.uint16) for x in (A, B))
    C = np.ascontiguousarray(C, np.float32)
    (M, K), N = A.shape, B.shape[1]
    D = np.empty((M, N), np.float32)
    lib.fs_dpbf16ps_gemm(_p(A), _p(B), _p(C), _p(D), _I(M), _I(N), _I(K), 0, 0, 0)
    return D


def tdpbf16ps_gemm(A, B, C) -> np.ndarray:
    """``D = C + A B`` by TDPBF16PS (BF16 bit codes; ``M, N <= 16``, ``K`` a multiple of 32:
    one instruction per 32 values of ``K``, adding into the tile the previous one left)."""
    lib, err = harness()
    A, B = (np.ascontiguousarray(x, np.uint16) for x in (A, B))
    C = np.ascontiguousarray(C, np.float32)
    (M, K), N = A.shape, B.shape[1]
    D = np.empty((M, N), np.float32)
    lib.fs_tdpbf16ps(_p(A), _p(B), _p(C), _p(D), _I(M), _I(N), _I(K))
    return D


# -- inputs --------------------------------------------------------------------------------------
def stress_bits(rng, shape, fmt: FloatFormat, special=0.01) -> np.ndarray:
    """Bit codes of ``fmt`` (an IEEE format) drawn to stress a dot product: 60% of exponents
    within 12 binades of 1 (mixed magnitudes), 10% near the bottom and 10% near the top of the
    range, the rest subnormal or zero, ``special`` infinities and NaN; random signs."""
    e_bits, m_bits = fmt.exp_bits, fmt.man_bits
    bias, top = 2 ** (e_bits - 1) - 1, 2**e_bits - 1
    u = rng.random(shape)
    e = np.where(u < 0.6, bias + rng.integers(-12, 13, shape),
                 np.where(u < 0.7, rng.integers(1, 20, shape),
                          np.where(u < 0.8, rng.integers(top - 20, top, shape),
                                   np.where(u < 1 - special, 0, top)))).astype(np.uint64)
    m = rng.integers(0, 2**m_bits, shape, dtype=np.uint64)
    m = np.where((e == 0) & (rng.random(shape) < 0.5), np.uint64(0), m)
    m = np.where((e == top) & (rng.random(shape) < 0.7), np.uint64(0), m)
    sign = rng.integers(0, 2, shape, dtype=np.uint64)
    return ((sign << np.uint64(e_bits + m_bits)) | (e << np.uint64(m_bits)) | m)


def _cancel(rng, A, B, flip):
    """Half the rows of ``A`` repeat their first half of ``k`` in the second, with ``B``'s
    second half the first negated: sums that cancel."""
    K = A.shape[1]
    h = K // 2
    rows = rng.random(A.shape[0]) < 0.5
    A[rows, h:2 * h] = A[rows, :h]
    B[h:2 * h] = B[:h] ^ flip
    return A, B


def _bf16_values(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


# -- the checks ----------------------------------------------------------------------------------
@dataclasses.dataclass
class CpuCheck:
    """One instruction checked against its model: ``rows`` results compared, ``mismatches``
    of them differing in any bit (NaN matches NaN), or ``skipped`` with the reason."""

    name: str
    instruction: str
    model: str
    rows: int = 0
    mismatches: int = 0
    skipped: str | None = None
    example: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.mismatches == 0


def _mismatches(got, want):
    got = np.asarray(got)
    want = np.asarray(want, got.dtype)
    bits = np.uint64 if got.dtype == np.float64 else np.uint32
    nan = np.isnan(got) & np.isnan(want)
    bad = ~nan & (got.view(bits) != want.view(bits))
    return int(bad.sum()), bad


def _model_gemm(A, B, C, spec):
    """``fixedsim.matmul`` of the spec with the addend C, as the result format's container.

    The units read C as they read their inputs (with denormals as zero where they flush), so
    C is rounded into the accumulator's format first (for FP32 with subnormals an identity).
    ``matmul(..., c=C)`` where matmul takes an addend; else ``matmul`` for the rows whose C is
    zero and, for the others, the oracle (:func:`fixedsim.reference.reduce_block`).
    """
    from ..matmul import matmul
    from ..quantize import quantize

    acc = spec.accumulator
    try:
        return matmul(A, B, spec, c=np.asarray(quantize(C, acc.fmt), np.float64))
    except TypeError:
        pass
    out = np.array(matmul(A, B, spec), acc.fmt.dtype)
    with np.errstate(invalid="ignore"):
        A = np.asarray(A, np.float64)
        B = np.asarray(B, np.float64)
    if spec.input is not None:
        A = reference.quantize(A, spec.input)
        B = reference.quantize(B, spec.input)
    for i, j in zip(*np.nonzero(np.asarray(C) != 0), strict=True):
        prods = [reference._exact_product(float(x), float(y))
                 for x, y in zip(A[i], B[:, j], strict=True)]
        if spec.product is not None:
            prods = [reference.round_to_format(p, spec.product) for p in prods]
        s = reference.round_to_format(float(C[i, j]), acc.fmt)
        for t in range(0, len(prods), acc.block):
            s = reference.reduce_block(s, prods[t:t + acc.block], acc)
        out[i, j] = s
    return out


def _run_f16c(rng, n):
    info = ("VCVTPS2PH", "fs.quantize(x, FP16, mode)")
    rows = []
    edge = _f16_edges()
    x = np.concatenate([edge, rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32)])
    from ..quantize import quantize

    for mode in _RC:
        hw = cvtps2ph(x, mode).view(np.float16).astype(np.float32)
        model = np.asarray(quantize(x, FP16, mode), np.float32)
        bad, mask = _mismatches(hw, model)
        ex = None
        if bad:
            i = int(np.flatnonzero(mask)[0])
            ex = f"x={x[i]!r}: hardware {hw[i]!r}, fixedsim {model[i]!r}"
        rows.append(CpuCheck(f"f16c_{mode.name.lower()}", info[0] + f" ({mode.name})", info[1],
                             x.size, bad, example=ex))
    return rows


def _f16_edges():
    """Float32 values at every FP16 decision point: each FP16 value, each midpoint between
    neighbours, and the float32 values next to both (overflow threshold, subnormals, zeros,
    infinities, NaN included)."""
    h = np.arange(0, 0x7C01, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = (h[:-1] + h[1:]) / 2
    pts = np.concatenate([h, mids, [65520.0, 65536.0, 2.0**-25, 3 * 2.0**-26]]).astype(np.float32)
    near = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)),
                           np.nextafter(pts, np.float32(0))])
    allv = np.concatenate([near, -near, np.float32([np.inf, -np.inf, np.nan])])
    return allv.astype(np.float32)


def _run_fma(rng, n, K=8):
    from ..matmul import Accumulator, MatmulSpec

    rows = []
    for dt, fmt, name in ((np.float32, FP32, "fma32"), (np.float64, FP64, "fma64")):
        M = max(1, n // 16)
        cases = [(m, False) for m in _RC] + ([(Rounding.NEAREST_EVEN, True)]
                                              if dt == np.float32 else [])
        for mode, flush in cases:
            f = fmt if not flush else FP32_FTZ
            bits_f = FP32 if dt == np.float32 else FP64
            A = stress_bits(rng, (M, K), bits_f)
            B = stress_bits(rng, (K, 16), bits_f)
            A, B = _cancel(rng, A, B, np.uint64(1) << np.uint64(bits_f.width - 1))
            utype = np.uint32 if dt == np.float32 else np.uint64
            A, B = A.astype(utype).view(dt), B.astype(utype).view(dt)
            C = stress_bits(rng, (M, 16), bits_f).astype(utype).view(dt)
            C[: M // 2] = 0
            hw = fma_gemm(A, B, C, mode, ftz=flush, daz=flush)
            spec = MatmulSpec(input=f if flush else None, accumulator=Accumulator(f, mode))
            model = _model_gemm(A, B, C, spec)
            bad, _ = _mismatches(hw, model)
            what = f"{'VFMADD231SS' if dt == np.float32 else 'VFMADD231SD'} chain, MXCSR " + (
                f"{mode.name}" + (" FTZ DAZ" if flush else ""))
            rows.append(CpuCheck(f"{name}_{mode.name.lower()}{'_ftz_daz' if flush else ''}",
                                 what, repr(spec.accumulator) +
                                 (f", input {f!r}" if flush else ""), hw.size, bad))
    return rows


def _run_bf16(rng, n, device, K, M, run):
    from . import spec as hw_spec

    spec = hw_spec(device, "bf16")
    A = stress_bits(rng, (M, K), BF16)
    B = stress_bits(rng, (K, 16), BF16)
    A, B = _cancel(rng, A, B, np.uint64(0x8000))
    C = stress_bits(rng, (M, 16), FP32).astype(np.uint32).view(np.float32)
    C[: M // 2] = 0
    hw = run(A.astype(np.uint16), B.astype(np.uint16), C)
    model = _model_gemm(_bf16_values(A), _bf16_values(B), C, spec)
    bad, mask = _mismatches(hw, model)
    return bad, hw.size


def check_all(sample: int = 1 << 20, seed: int = 0, dots: int = 4096) -> list[CpuCheck]:
    """Run every check this machine can run; a :class:`CpuCheck` per instruction and mode.

    Parameters
    ----------
    sample : int
        Random float32 bit patterns per F16C rounding mode (beside ~190,000 edge values).
    seed : int
    dots : int
        Dot products per FMA3 mode and per BF16 instruction (rounded up to rows of 16).
    """
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf inputs are intended
        return _check_all(sample, seed, dots)


def _check_all(sample, seed, dots):
    info = cpu_info()
    flags = info["flags"]
    rng = np.random.default_rng(seed)
    lib, err = harness()
    out = []

    def skip(name, instr, model, why):
        out.append(CpuCheck(name, instr, model, skipped=why))

    if lib is None:
        for name, instr, model in CHECKS:
            skip(name, instr, model, err)
        return out
    if "f16c" in flags:
        out += _run_f16c(rng, sample)
    else:
        skip("f16c", "VCVTPS2PH", "fs.quantize(x, FP16, mode)", "this CPU reports no f16c")
    if "fma" in flags:
        out += _run_fma(rng, dots)
    else:
        skip("fma", "VFMADD231SS/SD", "Accumulator(FP32/FP64)", "this CPU reports no fma")
    model = "hardware.spec('AVX512_BF16', 'bf16')"
    if "avx512_bf16" in flags:
        bad, n = _run_bf16(rng, dots, "AVX512_BF16", 8, max(1, dots // 16), dpbf16ps_gemm)
        out.append(CpuCheck("avx512_bf16", "VDPBF16PS", model, n, bad))
    else:
        skip("avx512_bf16", "VDPBF16PS", model, "this CPU reports no avx512_bf16")
    model = "hardware.spec('AMX_BF16', 'bf16')"
    if "amx_bf16" not in flags or "amx_tile" not in flags:
        skip("amx_bf16", "TDPBF16PS", model, "this CPU reports no amx_bf16")
    elif not _amx_ready(lib):
        skip("amx_bf16", "TDPBF16PS", model,
             "the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)")
    else:
        bad = n = 0
        for _ in range(max(1, dots // 256)):
            b, m = _run_bf16(rng, dots, "AMX_BF16", 64, 16, tdpbf16ps_gemm)
            bad += b
            n += m
        out.append(CpuCheck("amx_bf16", "TDPBF16PS", model, n, bad))
    model = "hardware.spec('AMX_FP16', 'fp16')"
    skip("amx_fp16", "TDPFP16PS", model,
         "not run: the harness has no TDPFP16PS" if "amx_fp16" in flags
         else "this CPU reports no amx_fp16 (published model, not validated here)")
    return out


#: Every check: (name, instruction, model).
CHECKS = (("f16c", "VCVTPS2PH", "fs.quantize(x, FP16, mode)"),
          ("fma", "VFMADD231SS/SD", "Accumulator(FP32/FP64)"),
          ("avx512_bf16", "VDPBF16PS", "hardware.spec('AVX512_BF16', 'bf16')"),
          ("amx_bf16", "TDPBF16PS", "hardware.spec('AMX_BF16', 'bf16')"),
          ("amx_fp16", "TDPFP16PS", "hardware.spec('AMX_FP16', 'fp16')"))
