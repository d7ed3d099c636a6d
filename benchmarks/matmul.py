"""Side-by-side throughput of ``fixedsim.matmul`` and other matrix products, in GFLOP/s.

    python benchmarks/matmul.py [--sizes N ...] [--repeat R] [--threads T] [--quick]
                                [--max-seconds S] [--apy-max-size N] [--markdown PATH]
                                [--cpu-time]

Square products ``(n, n) @ (n, n)``; GFLOP/s = ``2 * n**3 / best time`` for every
implementation (the same count whatever the emulated arithmetic costs). Each case has fixed
inputs, ``standard_normal((n, n))`` from its own seed, already quantized to the case's input
format with ``fs.quantize`` (round to nearest even), and the spec has ``input=None``: input
quantization is not timed. One warm-up call (Numba compiles or loads its cache; its result is
the one checked; fast calls: more untimed calls, until 0.25 s), then the best of ``R`` timed
calls (fast calls: more, until 0.25 s). The timed call is ``fs.matmul(a, b, spec)``, whose
counts nothing reads; the cases named "counted" time ``stats=True`` (counts read). Idle CPUs
of a VM wake up slowly: the first calls of a fast parallel kernel can take ~15 ms whatever
their size.

References: numpy's BLAS on the same values (float64 for exact fixed point, float32 for the
FP32 accumulator): a speed yardstick, not the same arithmetic (BLAS sums in its own order).
APyTypes (optional, ``pip install -e ".[bench]"``) with the equivalent accumulator context; its
conversion from numpy is outside the timed region, and its result is not converted back.
APyTypes with an accumulator context runs at ~0.1 GFLOP/s (~0.01 stochastic), so it is only
timed at sizes <= ``--apy-max-size``. A run whose estimated time (warm-up + ``R`` calls, from the
previous size's best time times the size ratio cubed) exceeds ``--max-seconds`` is skipped.
``--cpu-time`` times with the process's CPU time instead of the wall clock: on a shared machine
it does not count the time the process waits for a CPU (use it with ``--threads 1``: with
more threads it adds the threads' times up, spinning BLAS workers included).

Checks: the exact fixed-point result must equal numpy's ``clip(rint(a64 @ b64 * 256)) / 256``
bit for bit (that float64 product is exact: every partial sum is an integer multiple of 2**-16
below 2**53). On 64x64 inputs, APyTypes' deterministic results are compared with fixedsim's.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import platform
import shlex
import sys
import time

import numba
import numpy as np

import fixedsim as fs

SEED = 20240601
Q16_8 = fs.FixedFormat(16, 8)
Q24_16 = fs.FixedFormat(24, 16)
CHECK_N = 64
MIN_TIME = 0.25  # seconds of timed calls at least, per run
CLOCK = time.perf_counter  # --cpu-time: time.process_time


def optional(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


apy, threadpoolctl = optional("apytypes"), optional("threadpoolctl")


# -- references: make(a, b) -> zero-argument callable; a, b float64 arrays of the case's values --
def numpy_ref(dtype):
    def make(a, b):
        x, y = a.astype(dtype), b.astype(dtype)  # outside the timed region
        return lambda: x @ y
    return make


def apy_fixed(a, b, fmt=Q16_8):
    ib, fb = fmt.word_length - fmt.frac_length, fmt.frac_length
    return (apy.APyFixedArray.from_float(a, int_bits=ib, frac_bits=fb),
            apy.APyFixedArray.from_float(b, int_bits=ib, frac_bits=fb))


def apy_fp16(a, b):
    return (apy.APyFloatArray.from_float(a, exp_bits=5, man_bits=10),
            apy.APyFloatArray.from_float(b, exp_bits=5, man_bits=10))


def apy_exact_fixed(a, b):
    """Exact APyFixedArray product (no context), then one RNE/saturating cast into Q<16,8>."""
    A, B = apy_fixed(a, b)
    Q, O = apy.QuantizationMode, apy.OverflowMode
    return lambda: (A @ B).cast(int_bits=8, frac_bits=8, quantization=Q.RND_CONV,
                                overflow=O.SAT)


def apy_fp32(a, b):
    return (apy.APyFloatArray.from_float(a, exp_bits=8, man_bits=23),
            apy.APyFloatArray.from_float(b, exp_bits=8, man_bits=23))


def apy_float_ctx(exp_bits, man_bits, mode, out=None, inputs=None):
    def make(a, b):
        A, B = (inputs or apy_fp16)(a, b)
        q = getattr(apy.QuantizationMode, mode)

        def run():
            with apy.APyFloatAccumulatorContext(exp_bits=exp_bits, man_bits=man_bits,
                                                quantization=q):
                r = A @ B
            return r if out is None else r.cast(*out, quantization=apy.QuantizationMode.RND_CONV)
        return run
    return make


def apy_fixed_sat_ctx(a, b):
    A, B = apy_fixed(a, b)

    def run():
        with apy.APyFixedAccumulatorContext(int_bits=8, frac_bits=16,
                                            quantization=apy.QuantizationMode.RND_CONV,
                                            overflow=apy.OverflowMode.SAT):
            return A @ B
    return run


@dataclasses.dataclass(frozen=True)
class Ref:
    name: str
    make: object
    apy_ctx: bool = False  # an APyTypes accumulator context: only sizes <= --apy-max-size


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    name: str
    fmt: object  # input format: the data are quantized to it before timing
    spec: fs.MatmulSpec
    refs: tuple
    counted: bool = False  # time fs.matmul(..., stats=True) (counts read) instead of the default


APY_FP16 = "APyTypes FP16 acc ctx (RNE)"
CASES = [
    Case("fixed", "Q<16,8> in, exact sum, -> Q<16,8>", Q16_8,
         fs.MatmulSpec(output=Q16_8),
         (Ref("numpy float64 BLAS", numpy_ref(np.float64)),
          Ref("APyTypes exact fixed + cast", apy_exact_fixed))),
    Case("fp32", "FP16 in, FP32 FMA chain, -> FP16", fs.FP16,
         fs.MatmulSpec(accumulator=fs.FP32, output=fs.FP16),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),
          Ref("APyTypes FP32 acc ctx + cast", apy_float_ctx(8, 23, "RND_CONV", (5, 10)), True))),
    Case("fp16", "FP16 in, FP16 FMA chain", fs.FP16,
         fs.MatmulSpec(accumulator=fs.FP16),
         (Ref(APY_FP16, apy_float_ctx(5, 10, "RND_CONV"), True),)),
    Case("fp16p", "FP16 in, FP16 products, FP16 chain", fs.FP16,
         fs.MatmulSpec(product=fs.FP16, accumulator=fs.FP16),
         (Ref(APY_FP16, apy_float_ctx(5, 10, "RND_CONV"), True),)),
    Case("sat", "Q<16,8> in, Q<24,16> saturating chain", Q16_8,
         fs.MatmulSpec(accumulator=fs.Accumulator(Q24_16, overflow="saturate")),
         (Ref("APyTypes Q<24,16> SAT acc ctx", apy_fixed_sat_ctx, True),)),
    Case("sr", "FP16 in, FP16 stochastic chain", fs.FP16,
         fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, "stochastic"), seed=0),
         (Ref("APyTypes FP16 acc ctx (STOCH_WEIGHTED)",
              apy_float_ctx(5, 10, "STOCH_WEIGHTED"), True),)),
    Case("block16", "FP16 in, FP16 acc, block 16", fs.FP16,
         fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, block=16)),
         (Ref("none (no equivalent)", None),)),
    # last, so that the cases above keep their seeds (data seed = case index)
    Case("fp32d", "FP32 in, FP32 FMA chain", fs.FP32,
         fs.MatmulSpec(accumulator=fs.FP32),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),
          Ref("APyTypes FP32 acc ctx", apy_float_ctx(8, 23, "RND_CONV", inputs=apy_fp32),
              True))),
    Case("fp32x", "FP32 in, exact sum, -> FP32", fs.FP32,
         fs.MatmulSpec(output=fs.FP32),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),
          Ref("numpy float64 BLAS", numpy_ref(np.float64)))),
    # the FP32 chains again with their counts read: they then check every step
    Case("fp32c", "FP16 in, FP32 FMA chain, -> FP16, counted", fs.FP16,
         fs.MatmulSpec(accumulator=fs.FP32, output=fs.FP16),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),), counted=True),
    Case("fp32dc", "FP32 in, FP32 FMA chain, counted", fs.FP32,
         fs.MatmulSpec(accumulator=fs.FP32),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),), counted=True),
    # every spec on a fast path: the default spec, exact sums into narrow outputs, rounded
    # products, and one more counted chain
    Case("f64", "float64 data, default spec (exact, -> float64)", fs.FP64, fs.MatmulSpec(),
         (Ref("numpy float64 BLAS", numpy_ref(np.float64)),)),
    Case("x16", "FP32 in, exact sum, -> FP16", fs.FP32, fs.MatmulSpec(output=fs.FP16),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
    Case("xbf16", "FP32 in, exact sum, -> BF16", fs.FP32, fs.MatmulSpec(output=fs.BF16),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
    Case("x8", "FP32 in, exact sum, -> FP8 E4M3", fs.FP32, fs.MatmulSpec(output=fs.FP8_E4M3),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
    Case("h16", "FP16 in, exact sum, -> FP16", fs.FP16, fs.MatmulSpec(output=fs.FP16),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
    Case("bf16p", "BF16 in, BF16 products, FP32 chain", fs.BF16,
         fs.MatmulSpec(product=fs.BF16, accumulator=fs.FP32),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
    Case("fp16px", "FP16 in, FP16 products, exact sum, -> FP16", fs.FP16,
         fs.MatmulSpec(product=fs.FP16, output=fs.FP16),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
    Case("qp", "Q<16,8> in, Q<24,12> products, Q<32,16> saturating chain", Q16_8,
         fs.MatmulSpec(product=fs.FixedFormat(24, 12),
                       accumulator=fs.Accumulator(fs.FixedFormat(32, 16))),
         (Ref("numpy float64 BLAS", numpy_ref(np.float64)),)),
    Case("sr16p", "FP16 in, stochastic FP16 products, FP32 chain", fs.FP16,
         fs.MatmulSpec(product=fs.FP16, product_rounding="stochastic", accumulator=fs.FP32,
                       seed=0),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
    Case("fp16c", "FP16 in, FP16 FMA chain, counted", fs.FP16,
         fs.MatmulSpec(accumulator=fs.FP16),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),), counted=True),
    # the tensor core of an H100, FP16 in, FP32 out (the accumulator of
    # fixedsim.hardware.spec("H100", "fp16")), beside the exact-block accumulator of the
    # same block size
    Case("h100", "FP16 in, H100 BlockFMA (block 16, 2 extra bits, truncating) -> FP32",
         fs.FP16, fs.MatmulSpec(accumulator=fs.BlockFMA(16, 2, min_exp=-133)),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
    Case("block16x", "FP16 in, FP32 acc, exact block 16", fs.FP16,
         fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, block=16)),
         (Ref("numpy float32 BLAS", numpy_ref(np.float32)),)),
]
TARGETS = [  # (text, case key, reference or None for an absolute rate, bound, size or None)
    ("exact fixed point: fixedsim / numpy float64 BLAS >= 0.5", "fixed", "numpy float64 BLAS",
     0.5, None),
    ("FP16 in, FP32 chain: fixedsim / numpy float32 BLAS >= 0.25", "fp32", "numpy float32 BLAS",
     0.25, None),
    ("FP16 accumulator >= 8 GFLOP/s at 512", "fp16", None, 8.0, 512),
    ("H100 FP16 -> FP32 tensor core (BlockFMA) >= 5 GFLOP/s at 512", "h100", None, 5.0, 512),
    ("Q<24,16> saturating accumulator >= 8 GFLOP/s at 512", "sat", None, 8.0, 512),
    ("stochastic FP16 accumulator >= 2 GFLOP/s at 512", "sr", None, 2.0, 512),
    ("default spec, float64 data: fixedsim / numpy float64 BLAS >= 0.1", "f64",
     "numpy float64 BLAS", 0.1, None),
    ("FP32 data, exact -> FP32: fixedsim / numpy float32 BLAS >= 0.3", "fp32x",
     "numpy float32 BLAS", 0.3, None),
    ("FP32 data, exact -> FP16: fixedsim / numpy float32 BLAS >= 0.3", "x16",
     "numpy float32 BLAS", 0.3, None),
    ("FP32 data, exact -> BF16: fixedsim / numpy float32 BLAS >= 0.3", "xbf16",
     "numpy float32 BLAS", 0.3, None),
    ("FP32 data, exact -> FP8 E4M3: fixedsim / numpy float32 BLAS >= 0.3", "x8",
     "numpy float32 BLAS", 0.3, None),
    ("FP16 data, exact -> FP16: fixedsim / numpy float32 BLAS >= 0.3", "h16",
     "numpy float32 BLAS", 0.3, None),
    ("FP16 products, FP16 chain >= 2 GFLOP/s at 512", "fp16p", None, 2.0, 512),
    ("BF16 products, FP32 chain >= 2 GFLOP/s at 512", "bf16p", None, 2.0, 512),
    ("FP16 products, exact sum >= 2 GFLOP/s at 512", "fp16px", None, 2.0, 512),
    ("Q<24,12> products, Q<32,16> chain >= 2 GFLOP/s at 512", "qp", None, 2.0, 512),
    ("stochastic FP16 products, FP32 chain >= 2 GFLOP/s at 512", "sr16p", None, 2.0, 512),
    ("FP16 in, FP32 chain: counted / uncounted >= 0.5", "fp32c", "case:fp32", 0.5, None),
    ("FP32 in, FP32 chain: counted / uncounted >= 0.5", "fp32dc", "case:fp32d", 0.5, None),
    ("FP16 chain: counted / uncounted >= 0.5", "fp16c", "case:fp16", 0.5, None),
]


def case_data(case, n, k):
    """(a, b): quantized values as float32 (what fs.quantize returns), from the case's seed."""
    rng = np.random.default_rng([SEED, k, n])
    return tuple(fs.quantize(rng.standard_normal((n, n)), case.fmt) for _ in range(2))


def best_time(fn, repeat, budget):
    """(best seconds, calls made): at least ``repeat`` calls, more until ``MIN_TIME`` s are
    spent (fast calls: many samples, so one descheduled call does not decide), fewer once
    ``budget`` s are spent."""
    times, t_start = [], time.perf_counter()
    while True:
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
        spent = time.perf_counter() - t_start
        if spent > budget or (len(times) >= repeat and spent >= MIN_TIME):
            return min(times), len(times)


def n_diff(x, y):
    """Elements whose values differ (sign of zero included; NaN equals NaN)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    same = ((x == y) & (np.signbit(x) == np.signbit(y))) | (np.isnan(x) & np.isnan(y))
    return int(np.count_nonzero(~same))


def q16_8_reference(a, b):
    """numpy: the exact float64 product rounded to nearest even into Q<16,8>, saturating."""
    s = 2.0**Q16_8.frac_length
    return np.clip(np.rint((a.astype(np.float64) @ b.astype(np.float64)) * s),
                   Q16_8.min_code, Q16_8.max_code) / s + 0.0


def apy_agreement():
    """Info lines: APyTypes vs fixedsim on the same 64x64 inputs (deterministic modes)."""
    if apy is None:
        return ["APyTypes not installed: no bit-for-bit comparison."]
    lines = []
    rng = np.random.default_rng([SEED, 99])
    h = [fs.quantize(rng.standard_normal((CHECK_N, CHECK_N)), fs.FP16).astype(np.float64)
         for _ in range(2)]
    q = [fs.quantize(rng.standard_normal((CHECK_N, CHECK_N)), Q16_8).astype(np.float64)
         for _ in range(2)]
    ctx16 = apy_float_ctx(5, 10, "RND_CONV")(*h)().to_numpy()
    d_acc = n_diff(fs.matmul(*h, fs.MatmulSpec(accumulator=fs.FP16)), ctx16)
    d_prod = n_diff(fs.matmul(*h, fs.MatmulSpec(product=fs.FP16, accumulator=fs.FP16)), ctx16)
    match = ("MatmulSpec(product=FP16, accumulator=FP16)" if d_prod == 0 else
             "MatmulSpec(accumulator=FP16)" if d_acc == 0 else "neither")
    lines.append(
        f"APyTypes FP16 accumulator context (RND_CONV) vs fixedsim on {CHECK_N}x{CHECK_N} FP16 "
        f"inputs, differing elements of {CHECK_N**2}: MatmulSpec(accumulator=FP16) {d_acc}, "
        f"MatmulSpec(product=FP16, accumulator=FP16) {d_prod}. Bit-for-bit equivalent: {match} "
        f"(APyTypes rounds each product into the accumulator format before adding it).")
    d = n_diff(fs.matmul(*h, fs.MatmulSpec(accumulator=fs.FP32, output=fs.FP16)),
               apy_float_ctx(8, 23, "RND_CONV", (5, 10))(*h)().to_numpy())
    lines.append(f"APyTypes FP32 accumulator context + cast to FP16 vs "
                 f"MatmulSpec(accumulator=FP32, output=FP16): {d} differing elements "
                 f"(FP16 x FP16 products are exact in FP32, so product rounding is moot).")
    f = [fs.quantize(rng.standard_normal((CHECK_N, CHECK_N)), fs.FP32).astype(np.float64)
         for _ in range(2)]
    ctx32 = apy_float_ctx(8, 23, "RND_CONV", inputs=apy_fp32)(*f)().to_numpy()
    d_acc = n_diff(fs.matmul(*f, fs.MatmulSpec(accumulator=fs.FP32)), ctx32)
    d_prod = n_diff(fs.matmul(*f, fs.MatmulSpec(product=fs.FP32, accumulator=fs.FP32)), ctx32)
    lines.append(f"APyTypes FP32 accumulator context (RND_CONV) vs fixedsim on {CHECK_N}x"
                 f"{CHECK_N} FP32 inputs (products not exact in FP32), differing elements: "
                 f"MatmulSpec(accumulator=FP32) {d_acc}, MatmulSpec(product=FP32, "
                 f"accumulator=FP32) {d_prod}.")
    d = n_diff(fs.matmul(*q, fs.MatmulSpec(output=Q16_8)), apy_exact_fixed(*q)().to_numpy())
    lines.append(f"APyTypes exact fixed product + cast vs MatmulSpec(output=Q<16,8>): {d} "
                 f"differing elements.")
    sat = fs.MatmulSpec(accumulator=fs.Accumulator(Q24_16, overflow="saturate"))
    for label, scale in (("N(0,1) inputs", 1.0), ("inputs x8, so partial sums overflow", 8.0)):
        qs = [fs.quantize(np.clip(x * scale, -127, 127), Q16_8).astype(np.float64) for x in q]
        r, c = fs.matmul(*qs, sat, stats="steps")
        d = n_diff(r, apy_fixed_sat_ctx(*qs)().to_numpy())
        lines.append(f"APyTypes Q<24,16> SAT accumulator context vs fixedsim's saturating "
                     f"Q<24,16> chain, {label}: {d} differing elements (fixedsim saturated "
                     f"{c.accumulator.overflow} times).")
    lines.append("APyTypes 0.5.1's fixed-point accumulator context saturates each product but "
                 "not the running sum (apytypes issue #857, open), so it equals a saturating "
                 "chain only while no partial sum overflows; its result can even lie outside "
                 "the Q<24,16> range.")
    return lines


def machine_facts(args):
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = "unknown"
    try:
        b = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{b.get('name', '?')} {b.get('version', '')}".strip()
    except Exception:
        pass
    if threadpoolctl is not None:
        pools = [f"{p['internal_api']} {p['num_threads']} threads"
                 for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
        blas += f" ({', '.join(pools)})" if pools else ""
    vers = [f"python {platform.python_version()}", f"numpy {np.__version__}",
            f"numba {numba.__version__}", f"fixedsim {fs.__version__}",
            f"apytypes {apy.__version__} ({apy.n_threads()} threads)" if apy else
            "apytypes not installed"]
    try:
        cpus = f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)"
    except AttributeError:
        cpus = f"{os.cpu_count()} CPUs"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [f"command: {shlex.join(['python', *sys.argv])}",
            f"machine: {platform.platform()}, {cpu}, {cpus}, {numba.get_num_threads()} numba "
            f"threads; BLAS: {blas}",
            f"versions: {', '.join(vers)}",
            f"load average at start: {load}",
            f"clock: {'process CPU time' if args.cpu_time else 'wall clock'}; "
            f"sizes {args.sizes}, best of >= {args.repeat} calls (and >= {MIN_TIME} s) after "
            f"a warm-up call (and >= {MIN_TIME} s), --max-seconds "
            f"{args.max_seconds:g}, --apy-max-size {args.apy_max_size}"]


def rate(r):
    return f"{r:,.0f}" if r >= 1000 else f"{r:.3g}"


class Runner:
    """Times implementations, skipping runs whose estimated time exceeds the budget."""

    def __init__(self, args):
        self.args, self.last, self.first, self.notes = args, {}, {}, []

    def run(self, key, n, fn):
        """(GFLOP/s or None, cell text, warm-up result)."""
        args = self.args
        if key in self.last:
            n0, t0 = self.last[key]
            est = t0 * (n / n0) ** 3 * (1 + args.repeat)
            if est > args.max_seconds:
                return None, f"skipped (est. {est:.0f} s)", None
        t0 = time.perf_counter()
        out = fn()  # warm-up: compiles; its result is the one checked
        warm = time.perf_counter() - t0
        t1 = time.perf_counter()
        while time.perf_counter() - t1 < MIN_TIME:  # fast calls: keep the threads/CPUs awake
            fn()
        best, calls = best_time(fn, args.repeat, args.max_seconds)
        if calls < args.repeat:
            self.notes.append(f"{key[0]} ({key[1]}) at n={n}: best of {calls} calls, not "
                              f"{args.repeat} (--max-seconds reached).")
        self.last[key] = (n, best)
        self.first.setdefault(key, warm)
        r = 2.0 * n**3 / best / 1e9
        return r, rate(r), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024],
                    help="square sizes n: (n, n) @ (n, n)")
    ap.add_argument("--repeat", "--repeats", dest="repeat", type=int, default=3,
                    help="timed calls after the warm-up; the best counts")
    ap.add_argument("--threads", type=int,
                    help="numba, APyTypes and (with threadpoolctl) BLAS thread count")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="skip a run whose estimated warm-up + repeats exceed this")
    ap.add_argument("--apy-max-size", type=int, default=128,
                    help="largest size timed with an APyTypes accumulator context")
    ap.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    ap.add_argument("--quick", action="store_true", help="smoke run: size 64, 2 repeats")
    ap.add_argument("--cases", nargs="+", metavar="KEY", default=None,
                    help=f"time only these cases (keys: {', '.join(c.key for c in CASES)})")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's CPU time (robust on a busy machine; use "
                         "with --threads 1)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.cases or ()) - {c.key for c in CASES})
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}")
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    if args.quick:
        args.sizes, args.repeat = [64], 2
    args.sizes = sorted(set(args.sizes))
    if args.threads:
        numba.set_num_threads(args.threads)
        if apy is not None:
            apy.reset_thread_pool(args.threads)
        if threadpoolctl is not None:
            threadpoolctl.threadpool_limits(args.threads, user_api="blas")
    if apy is not None:
        apy.set_float_quantization_seed(SEED)
        apy.set_fixed_quantization_seed(SEED)
    facts = machine_facts(args)
    print("\n".join(facts), flush=True)

    runner = Runner(args)
    cols = ["case", "size", "fixedsim GFLOP/s", "reference", "reference GFLOP/s", "ratio"]
    rows, rates, failures, paths = [], {}, [], {}
    t_all = time.perf_counter()
    for n in args.sizes:
        for k, case in enumerate(CASES):
            if args.cases is not None and case.key not in args.cases:
                continue
            a, b = case_data(case, n, k)
            res = {}

            def fixedsim_call(a=a, b=b, case=case, res=res):
                if not case.counted:  # as a user calls it: nothing reads the counts
                    return fs.matmul(a, b, case.spec)
                out, res["stats"] = fs.matmul(a, b, case.spec, stats=True)
                return out
            r_fs, cell_fs, out = runner.run((case.name, "fixedsim"), n, fixedsim_call)
            rates[(case.key, n, "fixedsim")] = r_fs
            if r_fs is not None and (case.key == "sat" or "stats" not in res):
                # the paths (and the saturations), from one untimed call
                res["stats"] = fs.matmul(a, b, case.spec, stats="steps")[1]
            if "stats" in res:
                c = res["stats"]
                p = ", ".join(f"{k_}" for k_ in sorted(c.paths))
                ov = f", {c.accumulator.overflow} acc. overflows" if case.key == "sat" else ""
                paths.setdefault(case.name, []).append(f"n={n}: {p}{ov}")
            if case.key == "fixed" and out is not None:
                bad = n_diff(out, q16_8_reference(a, b))
                if bad:
                    failures.append(f"{case.name} n={n}: {bad} elements differ from numpy's "
                                    f"exact product rounded into Q<16,8>")
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            for ref in case.refs:
                if ref.make is None:
                    r_ref, cell = None, "-"
                elif ref.name.startswith("APyTypes") and apy is None:
                    r_ref, cell = None, "n/a (not installed)"
                elif ref.apy_ctx and n > args.apy_max_size:
                    r_ref, cell = None, "skipped (too slow)"
                else:
                    r_ref, cell, _ = runner.run((case.name, ref.name), n, ref.make(a64, b64))
                rates[(case.key, n, ref.name)] = r_ref
                ratio = f"{r_fs / r_ref:.3g}x" if r_fs and r_ref else "n/a"
                rows.append([case.name, str(n), cell_fs, ref.name, cell, ratio])
            print(f"  n={n} {case.name}: done ({time.perf_counter() - t_all:.0f} s)",
                  file=sys.stderr, flush=True)

    targets = []
    for text, key, ref, bound, size in TARGETS:
        for n in ([size] if size else args.sizes):
            r = rates.get((key, n, "fixedsim"))
            if ref is not None:
                r_ref = rates.get((ref[5:], n, "fixedsim") if ref.startswith("case:") else
                                  (key, n, ref))
                v = r / r_ref if r and r_ref else None
                shown = f"{v:.3g}x ({rate(r)} vs {rate(r_ref)})" if v is not None else None
            else:
                v, shown = r, (f"{rate(r)} GFLOP/s" if r is not None else None)
            status = ("not measured" if v is None else "met" if v >= bound else "not met")
            targets.append([text, str(n), shown or "-", status])

    notes = [
        "GFLOP/s = 2*n^3 / best time, for every implementation alike. Inputs are random normal "
        "values already quantized to the input format (fs.quantize, nearest even) and the spec "
        "has input=None: input quantization is NOT timed. fixedsim's timed call does include "
        "its float32 -> float64 conversion, operand analysis, output rounding and conversion "
        "to the result's container.",
        "fixedsim's timed call is fs.matmul(a, b, spec), as a user calls it: nothing reads its "
        "counts, so a kernel may skip counting (the FP32 FMA chains then run the FMA "
        "instruction alone). The cases marked 'counted' time fs.matmul(a, b, spec, stats=True) "
        "instead (the counts are read, as inside a fixedsim.counters.record() block and in "
        "training; per-step events are not asked for, so the chains need not check every "
        "step). A target 'case:KEY' compares with case KEY's fixedsim rate.",
        "numpy BLAS gets the same values as float64 / float32 arrays (converted outside the "
        "timed region); it is a speed yardstick, not the same arithmetic (its own summation "
        "order, no modelled rounding).",
        "APyTypes: inputs converted with from_float outside the timed region; the timed call is "
        "A @ B inside the accumulator context (plus the cast into the output format where "
        "fixedsim's spec has one); the result is not converted back to numpy.",
        f"Threads: numba {numba.get_num_threads()}; BLAS and APyTypes use their own pools (see "
        "the machine line). When numba's and OpenBLAS's pools together outnumber the CPUs, "
        "OpenBLAS's workers, which spin for a while after a BLAS call, can make a Numba "
        "parallel kernel that follows one (the exact fixed-point path: BLAS, then the output "
        "rounding) wait for a scheduler time slice (milliseconds); compare with --threads 1.",
        f"load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())} (a shared or "
        "busy machine makes every number noisy).",
        "skipped (est. X s): warm-up + repeats estimated from the previous size's best time "
        "times (n / n_prev)^3 exceed --max-seconds; skipped (too slow): APyTypes accumulator "
        "contexts above --apy-max-size.",
    ]
    comp = [f"{c.name} {runner.first[(c.name, 'fixedsim')]:.2f} s" for c in CASES
            if (c.name, "fixedsim") in runner.first]
    notes.append("First fixedsim call per case (Numba compile or cache load, smallest size): "
                 + "; ".join(comp) + ".")
    notes.append("fixedsim kernel paths (Counters.paths): "
                 + "; ".join(f"{name}: {', '.join(v)}" for name, v in paths.items()) + ".")
    notes += runner.notes
    print("Checking APyTypes against fixedsim ...", file=sys.stderr, flush=True)
    try:
        notes += apy_agreement()
    except Exception as err:  # an API this script does not know: report, go on
        notes.append(f"APyTypes comparison failed: {type(err).__name__}: {err}")
    checked = "failed" if failures else "bit-exact at every size run"
    notes.append(f"Check: exact fixed point vs numpy clip(rint(a64 @ b64 * 256)) / 256: "
                 f"{checked}.")

    def table(header, body, align):
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        line = "| " + " | ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths, strict=True)) + " |"
        sep = "|" + "|".join(("-" * (w + 1) + ":") if a == ">" else ("-" * (w + 2))
                             for a, w in zip(align, widths, strict=True)) + "|"
        return [line.format(*header), sep, *(line.format(*r) for r in body)]

    report = ["", "Throughput in GFLOP/s (ratio = fixedsim / reference)", "",
              *table(cols, rows, "<>><>>"), "",
              "Against the targets", "",
              *table(["target", "size", "measured", "status"], targets, "<><<"), "",
              *(f"* {s}" for s in notes)]
    print("\n".join(report))
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join([*(f"{s}  " for s in facts), *report]) + "\n")
    if failures:
        sys.exit("fixedsim check failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
