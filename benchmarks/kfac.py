"""One K-FAC step against one SGD step on the LeNet, side by side in one run.

    python benchmarks/kfac.py [--batch-size 1024] [--steps 20] [--inv-interval 20]
                              [--policy float32] [--data embedded] [--every-step] [--markdown PATH]

Both optimizers train ``fixedsim.nn.lenet`` (conv 5x5 16, pool, conv 5x5 32, pool, FC 128,
FC 10) from the same initial weights on the same mini-batches, under one policy. Timed: whole
steps (forward, loss, backward, optimizer step), ``--steps`` of them after one untimed
warm-up step (Numba loads or compiles its kernels); the variants' steps are interleaved (step
i of each, then step i + 1), so that a shared machine's changing load falls on all alike.
K-FAC runs with statistics only on refresh steps (``stat_interval = inv_interval``,
SP-NGD's stale statistics) and, with ``--every-step``, also with statistics every step
(``stat_interval 1``, Martens and Grosse); the inverses are refreshed every
``--inv-interval`` steps in both, so ``--steps`` should be a multiple of it (the timed steps
2 to 21 hold one refresh, step 21). Settings: lr 0.01, momentum 0.9, damping 0.1.

Reported: seconds per step, the ratio to SGD, and K-FAC's own time split into statistics
(factor products and running averages), inversion, preconditioning (two products per layer)
and the SGD update that follows, beside the forward and backward passes. The CPU model is
printed (``lscpu``); timings on a shared machine vary with its load (printed too).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _Timer:
    """Wraps methods of an object to add their wall time to ``parts[name]``."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    def wrap(self, obj, method, name):
        fn = getattr(obj, method)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t0

        setattr(obj, method, timed)


def _setup(kind, x, policy, inv_interval, stat_interval=1, seed=0):
    """(model, optimizer, timer) of one variant, from the same initial weights."""
    import fixedsim.nn as nn
    from fixedsim.nn.train import _init_weights

    model = nn.build("lenet", seed, in_shape=x.shape[1:])
    _init_weights(model, policy, seed)
    if kind == "sgd":
        opt = nn.SGD(model.named_parameters(), lr=0.01, momentum=0.9)
    else:
        opt = nn.KFAC(model, lr=0.01, momentum=0.9, damping=0.1,
                      inv_interval=inv_interval, stat_interval=stat_interval)
    timer = _Timer()
    timer.wrap(model, "forward", "forward")
    timer.wrap(model, "backward", "backward")
    if kind == "kfac":
        timer.wrap(opt, "_update_factors", "statistics")
        timer.wrap(opt, "_invert", "inversion")
        timer.wrap(opt, "preconditioned", "preconditioning")
    timer.wrap(opt, "step", "optimizer step (all)")
    return model, opt, timer


def run(variants, x, y, batches, policy, inv_interval, seed=0):
    """Seconds per step and the per-part breakdown of each variant over ``len(batches) - 1``
    timed steps, the variants' steps interleaved (step i of every variant, then step i + 1),
    so that a change in the machine's load falls on all of them alike."""
    import fixedsim.nn as nn

    runs = [_setup(kind, x, policy, inv_interval, si, seed) for kind, si in variants]
    lossf = nn.SoftmaxCrossEntropy()
    totals = [0.0] * len(runs)
    for i, idx in enumerate(batches):
        for r, (model, opt, timer) in enumerate(runs):
            if i == 1:
                timer.parts.clear()
            t0 = time.perf_counter()
            ctx = nn.Context(policy, seed=seed, step=i)
            lossf(model.forward(x[idx], ctx), y[idx], ctx)
            model.backward(lossf.backward(ctx), ctx)
            opt.step(ctx)
            if i >= 1:
                totals[r] += time.perf_counter() - t0
    n = len(batches) - 1
    out = []
    for (kind, _), (_, _, timer), total in zip(variants, runs, totals, strict=True):
        parts = {k: v / n for k, v in timer.parts.items()}
        if kind == "kfac":
            parts["SGD update"] = parts["optimizer step (all)"] - sum(
                parts.get(k, 0.0) for k in ("statistics", "inversion", "preconditioning"))
        out.append((total / n, parts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--inv-interval", type=int, default=20)
    ap.add_argument("--policy", default="float32")
    ap.add_argument("--data", default="embedded")
    ap.add_argument("--every-step", action="store_true",
                    help="also time K-FAC with statistics every step (slow at batch 1,024)")
    ap.add_argument("--markdown", default=None, metavar="PATH")
    args = ap.parse_args(argv)

    from threadpoolctl import threadpool_limits

    import fixedsim.nn as nn
    from fixedsim import data

    ds = data.load(args.data)
    need = args.batch_size * (args.steps + 1)
    reps = -(-need // len(ds.x_train))
    x = np.concatenate([ds.x_train] * reps)[:need]
    y = np.concatenate([ds.y_train] * reps)[:need]
    batches = [np.arange(i, i + args.batch_size) for i in range(0, need, args.batch_size)]
    policy = nn.Policy.parse(args.policy)
    lines = [f"CPU: {_cpu()} ({os.cpu_count()} logical cores), load average "
             f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}",
             f"LeNet, batch {args.batch_size}, policy {policy.name}, {args.steps} timed steps, "
             f"inverses refreshed every {args.inv_interval} steps",
             "command: python benchmarks/kfac.py "
             + " ".join(sys.argv[1:] if argv is None else argv),
             ""]
    cols = ("forward", "backward", "statistics", "inversion", "preconditioning", "SGD update",
            "optimizer step (all)")
    lines.append("| optimizer | s/step | ratio to SGD | " + " | ".join(cols) + " |")
    lines.append("|---" * 10 + "|")
    variants = [("sgd", 1, "SGD"),
                ("kfac", args.inv_interval, "K-FAC, statistics on refresh steps (SP-NGD)")]
    if args.every_step:
        variants.append(("kfac", 1, "K-FAC, statistics every step"))
    with threadpool_limits(limits=1, user_api="blas"):
        res = run([(k, si) for k, si, _ in variants], x, y, batches, policy, args.inv_interval)
    sgd = res[0][0]
    for (_, _, label), (t, parts) in zip(variants, res, strict=True):
        lines.append(f"| {label} | {t:.3f} | {t / sgd:.2f}x | "
                     + " | ".join(f"{parts.get(k, 0.0):.3f}" for k in cols) + " |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
