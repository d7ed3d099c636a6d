"""Column-row sampling, side by side: a sampled Linear / Conv2d layer against the same layer dense.

    python benchmarks/approx.py [--setting METHOD:KEEP[:PRODUCTS]] [--policies P ...]
                                [--repeats R] [--cpu-time] [--large]

For each policy and each layer size (three Linear and three Conv2d layers of the LeNet's and
the MLP's scale; ``--large``: two of each whose products dominate their time), one training
forward and one backward pass (weight, bias and input gradients) of the layer are timed dense
and with the sampling setting (default
``crs:0.5:forward``: half the input features / channels per draw; the backward pass is then the
gradient of the sampled forward, over the kept pairs). The sampled time includes everything the
layer does: the norms, the draws, gathering and scaling the kept pairs, rounding the scaled
operand, the products under the policy's specs and the scatter of the gradients. Inputs are
standard normal (scaled by 1/2) rounded into the activations role, the weights He-initialised
and rounded into the weights role (as training does); the first call of each
configuration is a warm-up (Numba loads its kernels) and the best of ``--repeats`` is reported,
dense and sampled alternating. BLAS runs on one thread (as in training). ``--cpu-time`` times
the process's CPU time instead of wall time, with Numba on one thread too: on a machine shared
with other work the wall time of a short call depends on the scheduler more than on the call.

Policies: ``float32`` (FP32 roles, exact accumulation and one rounding into FP32: BLAS products
with an exactness proof), ``float32_fma_chain`` (FP32 roles, every product a chain of FP32
fused multiply-adds, emulated element by element) and ``fixed`` (``Policy.fixed(16, 12)``:
exact wide accumulation, one rounding into float64). Which
kernel serves each product (``Counters.paths``) decides the time per MAC, and it can differ
between the dense and the sampled product of the same layer (docs/approx.md).

Reported per row: the distinct pairs kept (CRS draws with replacement: ``keep`` 0.5 keeps about
40% distinct pairs), the MACs performed over the dense layer's (forward and backward), the dense
and sampled times, the speed-up (dense / sampled), and the share of the sampled time spent
outside the products (the layer's ``forward_seconds + backward_seconds`` less the time of its
product calls, measured around them): that share is what eats the gain where the products are
cheap.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
if "--cpu-time" in sys.argv:
    os.environ["NUMBA_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

LINEAR = [(64, 784, 256), (64, 256, 128), (256, 1024, 512)]     # (batch, in, out)
CONV = [(16, 6, 16, 12, 5), (16, 16, 32, 12, 5), (16, 32, 64, 8, 3)]  # (batch, C, O, HW, k)
#: ``--large``: layers whose products dominate their time (where the gain can show).
LINEAR_LARGE = [(256, 2048, 1024), (512, 4096, 2048)]
CONV_LARGE = [(32, 64, 64, 16, 3), (32, 128, 128, 8, 3)]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _policy(name):
    from fixedsim.nn import Policy

    if name == "float32":
        return Policy.float32()
    if name == "float32_fma_chain":
        return Policy.float32("fma_chain")
    if name == "fixed":
        return Policy.fixed(16, 12)
    raise SystemExit(f"unknown policy {name!r}: float32, float32_fma_chain or fixed")


class _ProductTimer:
    """Time spent inside ``Context.product`` (the modelled products)."""

    def __init__(self):
        from fixedsim.nn.core import Context

        self.seconds = 0.0
        self._orig = Context.product
        timer = self

        def product(ctx, *a, **kw):
            t0 = CLOCK()
            try:
                return timer._orig(ctx, *a, **kw)
            finally:
                timer.seconds += CLOCK() - t0

        Context.product = product

    def close(self):
        from fixedsim.nn.core import Context

        Context.product = self._orig


CLOCK = time.perf_counter


def _step(layer, x, g, policy, step):
    from fixedsim import nn

    ctx = nn.Context(policy, seed=1, step=step)
    t0 = CLOCK()
    layer.forward(x, ctx)
    layer.backward(g, ctx)
    return CLOCK() - t0, ctx


def bench(make, x, policy, setting, repeats):
    """(dense seconds, sampled seconds, sampled share outside products, ApproxCounts)."""
    from fixedsim import nn

    dense, approx = make(), make()
    approx.set_approx(setting)
    ctx = nn.Context(policy, seed=1, step=0)
    for layer in (dense, approx):  # held in the weight role, as training initialises them
        for p in layer.parameters():
            p.value = ctx.round("weights", p.value, "init", p.name)
    y = dense.forward(x, ctx)
    g = ctx.round("errors", np.random.default_rng(5).standard_normal(y.shape) * 0.01, "g")
    best = {"dense": np.inf, "approx": np.inf}
    share, counts = 0.0, None
    timer = _ProductTimer()
    try:
        for r in range(repeats + 1):
            for name, layer in (("dense", dense), ("approx", approx)):
                timer.seconds = 0.0
                t, c = _step(layer, x, g, policy, r)
                if r == 0:
                    continue  # warm-up
                if t < best[name]:
                    best[name] = t
                    if name == "approx":
                        share = 1 - timer.seconds / t
                        counts = c.counters[layer.name].approx
    finally:
        timer.close()
    return best["dense"], best["approx"], share, counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="crs:0.5:forward")
    ap.add_argument("--policies", nargs="+", default=["float32", "float32_fma_chain", "fixed"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time process CPU time (Numba on one thread) instead of wall time")
    ap.add_argument("--large", action="store_true",
                    help="larger layers (Linear 2048->1024 and 4096->2048, 3x3 convolutions "
                    "of 64 and 128 channels) instead of the default sizes")
    args = ap.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time

    import fixedsim
    from fixedsim import nn
    from fixedsim.approx import Approx

    setting = Approx.parse(args.setting)
    print(f"fixedsim {fixedsim.__version__}, numpy {np.__version__}, Python "
          f"{platform.python_version()}; CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; "
          f"BLAS threads 1; command: python benchmarks/approx.py {' '.join(argv or sys.argv[1:])}")
    print(f"setting {setting}; best of {args.repeats} (forward + backward of one layer); "
          f"{'process CPU time, Numba on 1 thread' if args.cpu_time else 'wall time'}\n")
    head = (f"{'policy':17} {'layer':28} {'kept':>9} {'fwd MACs':>8} {'bwd MACs':>8} "
            f"{'dense ms':>9} {'sampled ms':>10} {'speed-up':>8} {'overhead':>8}")
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    for pname in args.policies:
        policy = _policy(pname)
        rows = []
        for B, fin, fout in (LINEAR_LARGE if args.large else LINEAR):
            x = rng.standard_normal((B, fin)) * 0.5

            def make(fin=fin, fout=fout):
                layer = nn.Linear(fin, fout, rng=1)
                layer.name = "layer"
                return layer

            rows.append((f"Linear {fin}->{fout}, batch {B}", make, x))
        for B, C, O, HW, k in (CONV_LARGE if args.large else CONV):
            x = rng.standard_normal((B, C, HW, HW)) * 0.5

            def make(C=C, O=O, k=k):
                layer = nn.Conv2d(C, O, k, rng=1)
                layer.name = "layer"
                return layer

            rows.append((f"Conv {C}->{O} {k}x{k} {HW}x{HW}, b{B}", make, x))
        for label, make, x in rows:
            ctx = nn.Context(policy, seed=1)
            xq = ctx.round("activations", x, "x")
            td, ta, share, c = bench(make, xq, policy, setting, args.repeats)
            print(f"{pname:17} {label:28} {c.kept:>4}/{c.pairs:<4} "
                  f"{c.macs / c.dense_macs:>8.2f} "
                  f"{c.backward_macs / c.backward_dense_macs:>8.2f} {td * 1e3:>9.2f} "
                  f"{ta * 1e3:>10.2f} {td / ta:>7.2f}x {share:>7.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
