"""Throughput of the modelled ring all-reduce (``fixedsim.nn.parallel.ring_allreduce``) per
communication format, beside a plain NumPy sum of the workers' arrays.

    python benchmarks/allreduce.py [--workers N] [--sizes 1000,100000,1000000] [--repeats R]
                                   [--threads T]

Each case sums ``N`` float32 arrays of ``size`` elements (``standard_normal * 1e-2``, one
seed per worker: gradient-like values); one warm-up call (Numba compiles or loads its cache),
then the best of ``R`` timed calls. Reported: elements reduced per second (``size / time``,
in Melem/s: one element of the result, which is ``N - 1`` additions and ``N`` casts), and the
time relative to ``numpy.sum(stack, axis=0)`` (float32, NumPy's pairwise order: not the ring's,
and no rounding into a format; the floor an emulator is compared with). float64 is the ring in
float64 without a format (plain NumPy additions in the ring's order).
"""

from __future__ import annotations

import argparse
import platform
import time

import numba
import numpy as np

import fixedsim as fs
from fixedsim.nn.parallel import ring_allreduce

FORMATS = [("float64", None, "nearest_even"), ("FP32", fs.FP32, "nearest_even"),
           ("BF16", fs.BF16, "nearest_even"), ("FP16", fs.FP16, "nearest_even"),
           ("FP8 E4M3", fs.FP8_E4M3, "nearest_even"), ("FP8 E5M2", fs.FP8_E5M2, "nearest_even"),
           ("Q<16,12>", fs.FixedFormat(16, 12), "nearest_even"),
           ("Q<16,12> SR", fs.FixedFormat(16, 12), "stochastic"),
           ("BF16 SR", fs.BF16, "stochastic")]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--sizes", default="1000,100000,1000000")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"CPU: {_cpu()}; {numba.get_num_threads()} Numba thread(s); numpy {np.__version__}; "
          f"fixedsim {fs.__version__}; {args.workers} workers; best of {args.repeats}")
    print()
    print("| format | " + " | ".join(f"{s:,} elem: Melem/s (x numpy)" for s in sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    data = {s: [np.random.default_rng(w).standard_normal(s).astype(np.float32) * 1e-2
                for w in range(args.workers)] for s in sizes}
    base = {s: _best(lambda s=s: np.sum(np.stack(data[s]), axis=0), args.repeats) for s in sizes}
    print("| numpy.sum (float32) | " + " | ".join(f"{s / base[s] / 1e6:,.1f} (1.0)"
                                                 for s in sizes) + " |")
    for label, fmt, rounding in FORMATS:
        cells = []
        for s in sizes:
            t = _best(lambda s=s, f=fmt, r=rounding: ring_allreduce(data[s], f, r, seed=1),
                      args.repeats)
            cells.append(f"{s / t / 1e6:,.1f} ({t / base[s]:,.0f})")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
