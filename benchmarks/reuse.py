"""Adaptive Deep Reuse, side by side: a reused conv layer against the same layer dense.

    python benchmarks/reuse.py [--batch-size B] [--policies P ...] [--settings L,H ...]
                               [--repeats R] [--cpu-time] [--markdown PATH]

For each policy and each conv layer of the LeNet (``fixedsim.nn.lenet``: conv1 1->16 5x5 on
28x28 images; conv2 16->32 5x5 on the 12x12 maps after conv1, ReLU and pooling), on real
Fashion-MNIST inputs (the shipped embedded subset), one forward and one backward pass
(weight, bias and input gradients) of the layer are timed dense and with each reuse setting
``L,H`` (scope: the mini-batch; input gradient through the centroids). The time includes the
im2col, the hashing, the clustering and every rounding the policy asks for; the first call
of each configuration is a warm-up (Numba loads its kernels) and the best of ``--repeats`` is
reported. BLAS runs on one thread (as in training), Numba on its default threads.

Reported per row: the remain ratio ``r_c`` reached, the forward and backward MACs performed
over the dense layer's, the dense and reused times, the speed-up (dense / reused), and the
share of the reused time spent hashing and clustering (``cluster()`` timed alone), which is
what eats the gain where the products are already cheap.

Policies: ``fixed`` (``Policy.fixed(16, 12)``: exact wide accumulation and one rounding, where
reuse computes each product once per cluster), ``float32`` (FP32 FMA chains: the reused
product must then be computed densely on the reconstructed input, so reuse cannot save time
there; shown to say so), ``float32-exact`` (float32 roles with exact accumulation and one
rounding into FP32).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time

import numpy as np


def _policy(name):
    import fixedsim as fs
    from fixedsim.nn import Policy

    if name == "fixed":
        return Policy.fixed(16, 12)
    if name == "float32":
        return Policy.float32()
    if name == "float32-exact":
        s = fs.MatmulSpec(output=fs.FP32)
        return dataclasses.replace(Policy.float32(), name="float32-exact", forward=s,
                                   grad_input=s, grad_weight=s)
    raise SystemExit(f"unknown policy {name!r}: fixed, float32 or float32-exact")


def _inputs(batch_size, policy):
    """Real inputs of conv1 and conv2 of an (untrained, He-initialised) LeNet."""
    import fixedsim.data as data
    import fixedsim.nn as nn
    from fixedsim.nn.train import _init_weights

    ds = data.load("embedded")
    x = ds.x_train[:batch_size]
    model = nn.lenet(0, in_shape=x.shape[1:])
    _init_weights(model, policy, 0)
    ctx = nn.Context(policy, seed=0, training=True)
    ins, h = {}, ctx.round("activations", x, "input")
    for layer in model.layers:
        if isinstance(layer, nn.Conv2d):
            ins[layer.name] = (layer, h)
        h = layer.forward(h, ctx)
    return ins


def _time(fn, repeats, clock):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def run(args):
    import fixedsim.nn as nn
    from fixedsim.reuse import Reuse, cluster

    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = []
    for pname in args.policies:
        policy = _policy(pname)
        for lname, (layer, x) in _inputs(args.batch_size, policy).items():
            rng = np.random.default_rng(1)

            def step(reuse, layer=layer, x=x, policy=policy, rng=rng):
                layer.set_reuse(reuse)
                ctx = nn.Context(policy, seed=0, step=1)
                y = layer.forward(x, ctx)
                g = ctx.round("errors", rng.standard_normal(y.shape) * 1e-2, "g")
                layer.backward(g, ctx, need_input_grad=True)
                return ctx.counters[layer.name]

            t_dense = _time(lambda: step(None), args.repeats, clock)  # noqa: B023
            for setting in args.settings:
                L, H = (int(v) for v in setting.split(","))
                r = Reuse(L=L, H=H)
                lc = step(r)
                t = _time(lambda: step(r), args.repeats, clock)  # noqa: B023
                cols = layer._clustering.reconstruct()  # shape of the im2col matrix
                fmt = policy.activations.fmt
                t_hash = _time(lambda: cluster(cols, L, H, seed=3,  # noqa: B023
                                               centroid_format=fmt),  # noqa: B023
                               args.repeats, clock)
                ru = lc.reuse
                rows.append({
                    "policy": pname, "layer": lname, "L": L, "H": H,
                    "rows": cols.shape[0],
                    "K": cols.shape[1], "r_c": ru.remain_ratio,
                    "fwd_macs": ru.macs / ru.dense_macs,
                    "bwd_macs": ru.backward_macs / max(1, ru.backward_dense_macs),
                    "path": "dense" if ru.dense_path else "reuse",
                    "dense_ms": t_dense * 1e3, "reuse_ms": t * 1e3,
                    "speedup": t_dense / t, "hash_share": t_hash / t})
                r_ = rows[-1]
                print(f"{pname:14s} {lname:9s} L={L:<4d} H={H:<3d} r_c={r_['r_c']:.3f} "
                      f"fwd MACs {r_['fwd_macs']:.3f} bwd MACs {r_['bwd_macs']:.3f} "
                      f"[{r_['path']}]  dense {r_['dense_ms']:7.1f} ms  reuse "
                      f"{r_['reuse_ms']:7.1f} ms  x{r_['speedup']:.2f}  "
                      f"hashing {100 * r_['hash_share']:.0f}%", flush=True)
            layer.set_reuse(None)
    return rows


def markdown(rows, args) -> str:
    import numba

    from fixedsim import __version__

    lines = [f"Command: `python benchmarks/reuse.py {shlex.join(sys.argv[1:])}`  ",
             f"fixedsim {__version__}, NumPy {np.__version__}, Numba {numba.__version__} "
             f"({numba.config.NUMBA_NUM_THREADS} threads), BLAS 1 thread, "
             f"{platform.machine()}, {os.cpu_count()} CPUs; "
             f"{'process CPU' if args.cpu_time else 'wall'} time, best of {args.repeats}; "
             f"batch {args.batch_size}.", "",
             "| policy | layer | L | H | r_c | fwd MACs | bwd MACs | product | dense ms | "
             "reuse ms | speed-up | hashing share |",
             "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['layer']} | {r['L']} | {r['H']} | {r['r_c']:.3f} | "
                     f"{r['fwd_macs']:.3f} | {r['bwd_macs']:.3f} | {r['path']} | "
                     f"{r['dense_ms']:.1f} | {r['reuse_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{100 * r['hash_share']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--policies", nargs="+", default=["fixed", "float32-exact", "float32"])
    p.add_argument("--settings", nargs="+", default=["25,4", "25,8", "25,12", "5,6", "5,10"],
                   help="reuse settings L,H")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-time", action="store_true",
                   help="process CPU time instead of wall time (steadier on a busy machine)")
    p.add_argument("--markdown", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        rows = run(args)
    text = markdown(rows, args)
    print()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
