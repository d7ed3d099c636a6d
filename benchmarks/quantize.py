"""Side-by-side throughput of ``fixedsim.quantize`` and other emulators, in Melem/s.

    python benchmarks/quantize.py [--n N] [--repeats R] [--threads T] [--quick] [--markdown PATH]
                                  [--blocks-only] [--cpu-time]

A second table times the block formats MXFP8 (E4M3) and MXFP4 beside gfloat and torchao
(when importable) and checks them bit for bit against each other.

Every implementation maps float32 to float32 values of the format. Each case has one fixed
input, ``standard_normal(n) * max / 4`` from its own seed (about 60 per million overflow;
BF16: ``max / 16``, to keep the float32 input finite). One warm-up call (Numba compiles or
loads its cache), then the best of ``R`` timed calls: ``n / best time``.

Checks: fixedsim's round-to-nearest-even output must equal numpy's / ml_dtypes' casts bit for
bit (Q<16,8>: numpy ``clip(rint(x * 256), min_code, max_code) / 256 + 0``; E4M3: except
where ml_dtypes gives NaN and fixedsim saturates to +-448). A stochastic result must be one
of the two neighbours of its input (``Rounding.DOWN`` / ``UP``); ``z`` compares the number
rounded up with its expectation. APyTypes results are compared with fixedsim's and reported.

``--threads T`` sets Numba's, APyTypes' and PyTorch's thread counts. ``--cpu-time`` times with
the process's CPU time instead of the wall clock: on a shared machine it does not count the
time the process waits for a CPU (with more than one thread it adds the threads' times up, so
it gives Melem per CPU-second; use it with ``--threads 1`` for one thread's rate).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

import ml_dtypes
import numba
import numpy as np

import fixedsim as fs

RNE, SR = fs.Rounding.NEAREST_EVEN, fs.Rounding.STOCHASTIC
Q16_8 = fs.FixedFormat(16, 8)
SEED = 20240601
APY_SLOW_S, APY_SLICE = 20.0, 1_000_000
OTHERS = ("numpy", "ml_dtypes", "apytypes", "pychop", "qtorch")
FORMATS = [("FP16", fs.FP16), ("BF16", fs.BF16), ("FP8 E4M3", fs.FP8_E4M3),
           ("FP8 E5M2", fs.FP8_E5M2), ("Q<16,8>", Q16_8)]
CASES = [(f"{label} {r}", fmt, mode) for label, fmt in FORMATS
         for r, mode in (("RNE", RNE), ("SR", SR))]
CASTS = [  # plain round-to-nearest-even casts: the references
    (fs.FP16, "numpy", np.float16), (fs.BF16, "ml_dtypes", ml_dtypes.bfloat16),
    (fs.FP8_E4M3, "ml_dtypes", ml_dtypes.float8_e4m3fn),
    (fs.FP8_E5M2, "ml_dtypes", ml_dtypes.float8_e5m2),
]


def optional(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


apy, pychop, qtorch_quant = optional("apytypes"), optional("pychop"), optional("qtorch.quant")


def apy_fn(fmt, rounding):
    Q = apy.QuantizationMode
    if isinstance(fmt, fs.FixedFormat):
        # 16 integer and 48 fraction bits hold every input exactly (|x| < 2**15), except values
        # below 2**-25, which round to 0 in Q<16,8> with or without this first step.
        q = Q.RND_CONV if rounding is RNE else Q.STOCH_WEIGHTED
        ib = fmt.word_length - fmt.frac_length
        return lambda x: apy.APyFixedArray.from_float(x, int_bits=16, frac_bits=48).cast(
            int_bits=ib, frac_bits=fmt.frac_length, quantization=q,
            overflow=apy.OverflowMode.SAT).to_numpy().astype(np.float32)
    e, m = fmt.exp_bits, fmt.man_bits
    if rounding is RNE:  # from_float rounds to nearest even
        return lambda x: apy.APyFloatArray.from_float(x, e, m).to_numpy().astype(np.float32)
    return lambda x: apy.APyFloatArray.from_float(x, 8, 23).cast(
        e, m, quantization=Q.STOCH_WEIGHTED).to_numpy().astype(np.float32)


def pychop_fn(fmt, rounding):
    if isinstance(fmt, fs.FixedFormat):
        return None  # n/a
    ch = pychop.Chop(exp_bits=fmt.exp_bits, sig_bits=fmt.man_bits,
                     rmode=1 if rounding is RNE else 5)
    return lambda x: np.asarray(ch(x), dtype=np.float32)


def qtorch_fn(fmt, rounding):
    import torch

    mode = "nearest" if rounding is RNE else "stochastic"
    if isinstance(fmt, fs.FixedFormat):
        f, args = qtorch_quant.fixed_point_quantize, (fmt.word_length, fmt.frac_length)
    else:
        f, args = qtorch_quant.float_quantize, (fmt.exp_bits, fmt.man_bits)
    return lambda x: f(torch.from_numpy(x), *args, rounding=mode).numpy()


def rne_reference(fmt):
    """(library, float32 -> float32 function) rounding to nearest even into ``fmt``."""
    if isinstance(fmt, fs.FixedFormat):  # x * 2**f is exact; rint ties to even; + 0: no -0
        s, lo, hi = np.float32(2.0**fmt.frac_length), fmt.min_code, fmt.max_code
        return "numpy", lambda x: np.clip(np.rint(x * s), lo, hi) / s + np.float32(0)
    lib, dt = next((lib, dt) for f, lib, dt in CASTS if f is fmt)

    def cast(x):
        with np.errstate(over="ignore"):
            return x.astype(dt).astype(np.float32)
    return lib, cast


def implementations(fmt, rounding):
    impls = {"fixedsim": lambda x: fs.quantize(x, fmt, rounding, seed=SEED)}
    if rounding is RNE:
        lib, fn = rne_reference(fmt)
        impls[lib] = fn
    for lib, mod, make in (("apytypes", apy, apy_fn), ("pychop", pychop, pychop_fn),
                           ("qtorch", qtorch_quant, qtorch_fn)):
        try:
            impls[lib] = make(fmt, rounding) if mod is not None else None
        except Exception as err:  # an API this script does not know: report, go on
            print(f"  {lib}: skipped ({type(err).__name__}: {err})", file=sys.stderr)
    return {k: v for k, v in impls.items() if v is not None}


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def timed(fn, x, repeats):
    def once():
        t0 = CLOCK()
        fn(x)
        return CLOCK() - t0
    return min(once() for _ in range(repeats))


def same_bits(a, b):
    return a.view(np.uint32) == b.view(np.uint32)


def sr_check(x, y, fmt):
    """(elements not in {down, up}, z-score of the number rounded up)."""
    lo = fs.quantize(x, fmt, fs.Rounding.DOWN)
    hi = fs.quantize(x, fmt, fs.Rounding.UP)
    bad = int(np.count_nonzero(~(same_bits(y, lo) | same_bits(y, hi))))
    gap = np.isfinite(lo) & np.isfinite(hi) & (lo != hi)
    p = (x[gap].astype(np.float64) - lo[gap]) / (hi[gap].astype(np.float64) - lo[gap])
    ups = np.count_nonzero(same_bits(y[gap], hi[gap]))
    return bad, (ups - p.sum()) / np.sqrt(max((p * (1 - p)).sum(), 1e-300))


def check(name, x, fmt, rounding, outs, failures):
    """Text for the check column; appends to ``failures`` when fixedsim is wrong."""
    y = outs["fixedsim"]
    if rounding is SR:
        bad, z = sr_check(x, y, fmt)
        if bad:
            failures.append(f"{name}: {bad} results are neither neighbour of the input")
        return f"{bad} off, z={z:+.1f}"
    ref = outs[rne_reference(fmt)[0]]
    diff = ~same_bits(y, ref)
    excused = np.zeros_like(diff)
    if fmt is fs.FP8_E4M3:  # ml_dtypes: NaN on overflow; fixedsim saturates
        excused = np.isnan(ref) & np.isfinite(x) & (y == np.copysign(np.float32(fmt.max), x))
    bad = int(np.count_nonzero(diff & ~excused))
    if bad:
        i = int(np.flatnonzero(diff & ~excused)[0])
        failures.append(f"{name}: {bad} elements differ from the reference, first x={x[i]!r} "
                        f"fixedsim={y[i]!r} reference={ref[i]!r}")
        return f"MISMATCH {bad}"
    n_exc = int(np.count_nonzero(excused))
    return f"exact ({n_exc} NaN->+-448)" if n_exc else "bit-exact"


def apy_diff(x, fmt, rounding, outs):
    if "apytypes" not in outs:
        return "n/a"
    if rounding is SR:
        return "{} off, z={:+.1f}".format(*sr_check(x, outs["apytypes"], fmt))
    return str(int(np.count_nonzero(~same_bits(outs["apytypes"], outs["fixedsim"]))))


def header(args):
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    vers = [f"{m.__name__} {m.__version__}" for m in (np, numba, ml_dtypes, apy) if m]
    return (f"{platform.platform()}, {cpu}, {numba.get_num_threads()} numba threads; "
            f"{', '.join(vers)}; n={args.n:,}, best of {args.repeats}; "
            f"clock: {'process CPU time' if args.cpu_time else 'wall clock'}")


def rate(r):
    return "n/a" if r is None else (f"{r:.1f}" if r < 100 else f"{r:.0f}")


# -- block formats (MXFP8, MXFP4, NVFP4) ------------------------------------------------------
BLOCK_CASES = [("MXFP8 E4M3 RNE", fs.MXFP8_E4M3, RNE), ("MXFP8 E4M3 SR", fs.MXFP8_E4M3, SR),
               ("MXFP4 RNE", fs.MXFP4, RNE), ("MXFP4 SR", fs.MXFP4, SR),
               ("NVFP4 RNE", fs.NVFP4, RNE), ("NVFP4 SR", fs.NVFP4, SR)]
BLOCK_OTHERS = ("gfloat", "torchao")
gfloat, torch = optional("gfloat"), optional("torch")
torchao_mx = optional("torchao.prototype.mx_formats.mx_tensor")
torchao_nv = optional("torchao.prototype.mx_formats.nvfp4_tensor")
torchao_kernels = optional("torchao.prototype.mx_formats.kernels")


def gfloat_block_fn(fmt, rounding):
    """gfloat at its fastest: the OCP scale of every block as gfloat's compute_scale_amax
    computes it (floor(log2(amax)) - emax, clipped to [-127, 127]; 2**-127 for zero blocks),
    then one vectorised round_ndarray of all scaled elements (saturating)."""
    if gfloat is None or rounding is not RNE or fmt.scale_rule != "ocp":
        return None  # gfloat's stochastic modes take caller-supplied random bits: not compared
    from gfloat import formats as gf

    etype = {fs.FP8_E4M3: gf.format_info_ocp_e4m3, fs.FP4_E2M1: gf.format_info_ocp_e2m1}[
        fmt.element]

    def run(x):
        b = x.astype(np.float64).reshape(-1, fmt.block)
        amax = np.abs(b).max(axis=1)
        with np.errstate(divide="ignore"):
            e = np.clip(np.floor(np.log2(amax)) - etype.emax, -127.0, 127.0)
        scale = 2.0 ** np.where(amax == 0, -127.0, e)[:, None]
        q = gfloat.round_ndarray(etype, b / scale, gfloat.RoundMode.TiesToEven, sat=True)
        return (q * scale).reshape(x.shape)
    return run


def torchao_block_fn(fmt, rounding):
    """torchao's to_mx (FLOOR) and to_dtype back to float32, on the CPU; NVFP4: its
    per_tensor_amax_to_scale and nvfp4_quantize, the elements unpacked and multiplied back."""
    if torchao_mx is None or rounding is not RNE:
        return None  # torchao's MX recipe rounds to nearest even only
    if fmt.scale_rule == "nearest":
        if torchao_nv is None or torchao_kernels is None:
            return None
        k = torchao_kernels

        def run_nv(x):
            xt = torch.from_numpy(x.reshape(-1, 16))
            t = torchao_nv.per_tensor_amax_to_scale(xt.abs().max())
            s, d = torchao_nv.nvfp4_quantize(xt, 16, t)
            e = k.f4_unpacked_to_f32(k.unpack_uint4(d.view(torch.uint8))).double()
            v = e.reshape(-1, 16) * s.double().reshape(-1, 1) * t.double()
            return v.numpy().reshape(x.shape)
        return run_nv
    dt = {fs.FP8_E4M3: torch.float8_e4m3fn, fs.FP4_E2M1: torch.float4_e2m1fn_x2}[fmt.element]

    def run(x):
        t = torch.from_numpy(x.reshape(-1, fmt.block))
        s, d = torchao_mx.to_mx(t, dt, fmt.block)
        return torchao_mx.to_dtype(d, s, dt, fmt.block, torch.float32).numpy().reshape(x.shape)
    return run


def torchao_nvfp4_differences(x, fmt, ours):
    """torchao's two designed differences from fixedsim's NVFP4 (docs/block_formats.md):
    ``(sub, twice, expect)``: the blocks whose scale is below 2**-6 (torchao raises it to
    2**-6), the values whose element torchao's float32 quotient ``x * ((1 / t) / s)`` rounds
    to another E2M1 value than the exact quotient (a double rounding), and the values torchao
    is expected to give outside the first: fixedsim's, but its double-rounded element where
    that differs."""
    codes = fs.to_bits(x, fmt)
    s = fs.from_bits(codes.scales, fmt.scale).reshape(-1).astype(np.float64)
    t = float(fs.from_bits(codes.tensor_scale, fs.FP32))
    r = (np.float32(1) / np.float32(t)) / s.astype(np.float32)
    q = np.clip(x.reshape(-1, fmt.block) * r[:, None], -6, 6).reshape(-1)  # float32
    theirs = fs.quantize(q, fmt.element, RNE).astype(np.float64) * np.repeat(s * t, fmt.block)
    twice = theirs != ours
    return s < 2.0**-6, twice, np.where(twice, theirs, ours)


def block_table(args):
    """Rows of the block-format table: (case, fixedsim, gfloat, torchao, ratio, check)."""
    rows, notes, failures = [], [], []
    for k, (name, fmt, rounding) in enumerate(BLOCK_CASES):
        rng = np.random.default_rng([SEED, 100 + k])
        x = (rng.standard_normal(args.n) * 2.0 ** rng.integers(-8, 8, args.n // 32)
             .repeat(32)).astype(np.float32)
        buf = np.empty(x.size)
        impls = {"fixedsim": lambda x, f=fmt, r=rounding: fs.quantize(x, f, r, seed=SEED),
                 "fixedsim out=": lambda x, f=fmt, r=rounding, o=buf: fs.quantize(
                     x, f, r, seed=SEED, out=o),
                 "gfloat": gfloat_block_fn(fmt, rounding),
                 "torchao": torchao_block_fn(fmt, rounding)}
        rates, outs = {}, {}
        for lib, fn in impls.items():
            if fn is None:
                continue
            try:
                outs[lib] = np.asarray(fn(x), np.float64)  # warm-up; its result is checked
            except Exception as err:
                print(f"  {name} {lib}: failed ({type(err).__name__}: {err})", file=sys.stderr)
                continue
            rates[lib] = x.size / timed(fn, x, args.repeats) / 1e6
        other = max((v for lib, v in rates.items() if lib in BLOCK_OTHERS), default=None)
        ratio = f"{rates['fixedsim'] / other:.2f}x" if other and "fixedsim" in rates else "n/a"
        checks = []
        if "fixedsim out=" in outs and not np.array_equal(
                outs["fixedsim out="].view(np.uint64), outs["fixedsim"].view(np.uint64)):
            failures.append(f"{name}: out= gives other values")
        for lib in BLOCK_OTHERS:
            if lib in outs:
                diff = outs[lib].view(np.uint64) != outs["fixedsim"].view(np.uint64)
                note = ""
                if fmt.scale_rule == "nearest" and lib == "torchao":  # the designed differences
                    sub, twice, expect = torchao_nvfp4_differences(x, fmt, outs["fixedsim"])
                    diff = (outs[lib] != expect) & ~np.repeat(sub, fmt.block)
                    note = (f" outside {int(sub.sum())} blocks of scale < 2**-6, "
                            f"{int(twice.sum())} values rounded twice as torchao's float32 "
                            "scaling predicts")
                bad = int(np.count_nonzero(diff))
                checks.append(f"{lib} {'bit-exact' if not bad else f'{bad} differ'}{note}")
                if bad:
                    failures.append(f"{name}: {bad} values differ from {lib}")
        if rounding is SR:
            lo = fs.quantize(x, fmt, fs.Rounding.DOWN)
            hi = fs.quantize(x, fmt, fs.Rounding.UP)
            y = outs["fixedsim"]
            off = int(np.count_nonzero((y != lo) & (y != hi)))
            checks.append(f"{off} off (DOWN/UP)")
            if off:
                failures.append(f"{name}: {off} results are neither block neighbour")
        ratio_out = (f"{rates['fixedsim out='] / other:.2f}x"
                     if other and "fixedsim out=" in rates else "n/a")
        rows.append([name, rate(rates.get("fixedsim")), rate(rates.get("fixedsim out=")),
                     *(rate(rates.get(o)) for o in BLOCK_OTHERS), ratio, ratio_out,
                     "; ".join(checks)])
        print(f"  {name}: done", file=sys.stderr, flush=True)
    xc = np.random.default_rng(SEED).standard_normal(args.n).astype(np.float32)
    fresh = xc.size / timed(lambda v: v.astype(np.float64), xc, args.repeats) / 1e6
    into = np.empty(xc.size)
    filled = xc.size / timed(lambda v: np.copyto(into, v), xc, args.repeats) / 1e6
    notes += [
        "Block formats: float32 in, float64 values out (fixedsim: element * scale as float64; "
        "gfloat float64, torchao float32 converted); input standard_normal times 2**j, j in "
        "[-8, 8) drawn per block of 32.",
        "fixedsim out=: the values written into a float64 array allocated once "
        "(fs.quantize(..., out=buf)); fixedsim allocates a new one per call, whose pages the "
        "kernel first touches.",
        f"The float64 output's own cost on this machine: numpy's x.astype(np.float64) (a new "
        f"array) runs at {fresh:.0f} Melem/s, np.copyto into an existing float64 array at "
        f"{filled:.0f} (one thread, read 4 bytes, write 8 per element).",
        "gfloat: its OCP scale rule vectorised over blocks (as compute_scale_amax) and one "
        "round_ndarray call; torchao: to_mx (FLOOR) + to_dtype on the CPU. Neither has a "
        "seeded stochastic MX path to compare: n/a under SR.",
        "NVFP4: torchao's per_tensor_amax_to_scale + nvfp4_quantize, the E2M1 codes unpacked "
        "and multiplied back in float64; gfloat has no NVFP4. torchao raises a block scale "
        "below 2**-6 (E4M3's smallest normal) to 2**-6 where fixedsim keeps E4M3's subnormal "
        "scales (docs/block_formats.md): the values of such blocks differ by design.",
    ]
    return rows, notes, failures


def print_table(title, cols, rows, notes):
    """A plain-text table (first column left-aligned, the others right-aligned), then notes."""
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    fmt_row = " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print(f"\n{title}\n" + fmt_row.format(*cols))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(fmt_row.format(*r))
    print("\n" + "\n".join(f"* {s}" for s in notes))


def print_block_table(rows, notes, md):
    cols = ["case", "fixedsim", "fixedsim out=", *BLOCK_OTHERS, "fixedsim/best",
            "out=/best", "check"]
    print_table("Block formats, throughput in Melem/s", cols, rows, notes)
    md += ["", "| " + " | ".join(cols) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(cols) - 2) + ["---"]) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"* {s}" for s in notes]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="elements per case")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls; the best counts")
    ap.add_argument("--threads", type=int, help="numba (and APyTypes) thread count")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    ap.add_argument("--quick", action="store_true", help="n=1,000,000 and 3 repeats")
    ap.add_argument("--blocks-only", action="store_true",
                    help="only the block formats (MXFP8, MXFP4, NVFP4) beside gfloat and torchao")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's CPU time (robust on a busy machine; use "
                         "with --threads 1)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    if args.quick:
        args.n, args.repeats = 1_000_000, 3
    if args.threads:
        numba.set_num_threads(args.threads)
        if apy is not None:
            apy.reset_thread_pool(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
    if apy is not None:
        apy.set_float_quantization_seed(SEED)
        apy.set_fixed_quantization_seed(SEED)
    print(header(args), flush=True)
    if args.blocks_only:
        brows, bnotes, failures = block_table(args)
        md = [header(args)]
        print_block_table(brows, bnotes, md)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write("\n".join(md) + "\n")
        if failures:
            sys.exit("fixedsim check failed:\n" + "\n".join(failures))
        return
    cols = ["case", "fixedsim", *OTHERS, "fixedsim/best", "check", "apytypes diff"]
    rows, notes, failures = [], [], []
    for k, (name, fmt, rounding) in enumerate(CASES):
        scale = fmt.max / (16 if fmt is fs.BF16 else 4)
        x = (np.random.default_rng([SEED, k]).standard_normal(args.n) * scale).astype(np.float32)
        rates, outs = {}, {}
        for lib, fn in implementations(fmt, rounding).items():
            t0 = time.perf_counter()
            try:
                outs[lib] = fn(x)  # warm-up; its result is the one checked
            except Exception as err:
                print(f"  {name} {lib}: failed ({type(err).__name__}: {err})", file=sys.stderr)
                continue
            xt = x
            if lib == "apytypes" and time.perf_counter() - t0 > APY_SLOW_S and args.n > APY_SLICE:
                xt = x[:APY_SLICE]
                notes.append(f"{name}: APyTypes timed on the first {APY_SLICE:,} elements "
                             f"(one call on {args.n:,} took over {APY_SLOW_S:.0f} s).")
            rates[lib] = xt.size / timed(fn, xt, args.repeats) / 1e6
        other = max((v for lib, v in rates.items() if lib != "fixedsim"), default=None)
        ratio = f"{rates['fixedsim'] / other:.2f}x" if other and "fixedsim" in rates else "n/a"
        row = [name, rate(rates.get("fixedsim")), *(rate(rates.get(o)) for o in OTHERS), ratio,
               check(name, x, fmt, rounding, outs, failures),
               apy_diff(x, fmt, rounding, outs)]
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr, flush=True)
        del x, outs
    xc = np.random.default_rng(SEED).standard_normal(args.n).astype(np.float32)
    ceiling = xc.size / timed(np.copy, xc, args.repeats) / 1e6
    notes += [
        "Melem/s = n / best time; float32 in, float32 out (any conversion back included).",
        f"Memory ceiling on this machine: np.copy of the same float32 input (allocate, read, "
        f"write) runs at {ceiling:.0f} Melem/s.",
        "check: RNE vs numpy/ml_dtypes bit for bit (Q<16,8>: numpy clip(rint(x*256))/256 + 0); "
        "SR: results that are neither neighbour ('off'), z-score of the round-up count (|z|<3 ok).",
        "apytypes diff: elements whose bits differ from fixedsim (RNE), or the SR check.",
        "APyTypes floats are IEEE-style (top exponent = inf/NaN): its E4M3 has max 240, not the "
        "OCP e4m3fn 448, so it differs wherever |x| >= 248.",
        "pychop / qtorch: n/a when not importable.",
    ]
    print_table("Throughput in Melem/s", cols, rows, notes)
    brows, bnotes, bfail = block_table(args)
    failures += bfail
    md = [header(args), "", "| " + " | ".join(cols) + " |",
          "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"* {s}" for s in notes]
    print_block_table(brows, bnotes, md)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(md) + "\n")
    if failures:
        sys.exit("fixedsim check failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
