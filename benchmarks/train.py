"""One training epoch of the LeNet or the MLP, side by side: fixedsim policies against PyTorch on
the CPU.

    python benchmarks/train.py [--model lenet|mlp] [--images N] [--batch-size B] [--data NAME]
                               [--policies P ...] [--threads T] [--markdown PATH] [--floor]

Every implementation trains the same network (``fixedsim.nn.lenet``: conv 5x5 16, pool, conv
5x5 32, pool, FC 128, FC 10; or ``fixedsim.nn.mlp``: 784-1000-1000-10, Gupta et al.'s MLP) from
the same initial weights on the same mini-batches in the same order (SGD, lr 0.02, momentum
0.9), for one epoch over the first ``N`` training images (default 60,000 of Fashion-MNIST;
``--data embedded`` uses the shipped 10,000). Timed: the whole epoch
loop (forward, loss, backward, optimizer step); not timed: data loading and one warm-up step
per implementation (Numba loads or compiles its kernels; PyTorch initialises its pools), nor
Numba's compiling of a kernel first needed later in the epoch (reported under the table).

PyTorch (optional: ``pip install torch==2.13.0``) is the yardstick a user would pick instead:
float32 with its own CPU kernels (oneDNN/BLAS sums in its own order). fixedsim rounds every
product and tensor as the policy says, bit for bit. Reported: seconds per epoch, images per
second, the ratio to PyTorch, the ratio of each policy to fixedsim's float32, and the per-layer
breakdown of fixedsim's time (forward and backward of each layer, measured by Sequential;
"optimizer" is the SGD step; "rest" the loss, batching and bookkeeping).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
import time

import numpy as np

#: The clock: wall time, or process CPU time with --cpu-time (meaningful at --threads 1 on a
#: shared machine, where other jobs stretch wall time).
_clock = time.perf_counter


def _batches(n, batch_size, seed=0):
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _model(name, seed, in_shape):
    import fixedsim.nn as nn

    return nn.build(name, seed, in_shape=in_shape)


class _Trainer:
    """One implementation's epoch, run a chunk of batches at a time (``run(chunk)`` returns
    the chunk's seconds), so that implementations can take turns (``--interleave``): on a
    shared machine whose speed changes over minutes, each then sees the same machine."""

    def __init__(self, step, context=contextlib.nullcontext):
        self._step, self._context = step, context  # context(): entered around each chunk
        self.seconds, self.losses, self.counters, self.i = 0.0, [], {}, 0
        self.compile_seconds, self.compiled = 0.0, []

    def run(self, chunk) -> float:
        """The chunk's seconds, less those Numba spent compiling in it: a kernel first needed
        after the warm-up step (a path that step did not take) is compiled once, on an empty
        cache, and belongs to the warm-up, not to the steady speed measured here. What was
        compiled is kept (``compiled``, ``compile_seconds``) and reported."""
        from fixedsim.compiling import CompileWatch

        with self._context(), CompileWatch() as watch:
            t0 = _clock()
            for idx in chunk:
                self.losses.append(self._step(self.i, idx, self.counters))
                self.i += 1
            dt = _clock() - t0
        dt = max(0.0, dt - watch.seconds)
        self.compile_seconds += watch.seconds
        self.compiled += watch.names
        self.seconds += dt
        return dt

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses[-20:]))


def fixedsim_trainer(policy_name, x, y, batches, seed=0, model_name="lenet"):
    """A :class:`_Trainer` of the fixedsim policy (warmed up on the first batch, then
    restarted from the initial weights)."""
    import fixedsim.nn as nn
    from fixedsim.nn.optim import SGD
    from fixedsim.nn.train import _init_weights

    policy = nn.Policy.parse(policy_name)
    lossf = nn.SoftmaxCrossEntropy()

    def fresh():
        model = _model(model_name, seed, x.shape[1:])
        _init_weights(model, policy, seed)
        return model, SGD(model.named_parameters(), lr=0.02, momentum=0.9)

    state = {}

    def step(i, idx, counters):
        model, opt = state["model"], state["opt"]
        ctx = nn.Context(policy, seed=seed, step=i)
        logits = model.forward(x[idx], ctx)
        loss = lossf(logits, y[idx], ctx)
        model.backward(lossf.backward(ctx), ctx)
        t0 = time.perf_counter()  # wall time, as Sequential's per-layer seconds
        opt.step(ctx)
        counters["optimizer"] = counters.get("optimizer", 0.0) + time.perf_counter() - t0
        for name, lc in ctx.counters.items():
            if lc.forward_seconds or lc.backward_seconds:
                f, b = counters.get(name, (0.0, 0.0))
                counters[name] = (f + lc.forward_seconds, b + lc.backward_seconds)
        return loss

    from threadpoolctl import threadpool_limits

    def one_blas_thread():  # as fixedsim.nn.train does
        return threadpool_limits(limits=1, user_api="blas")

    with one_blas_thread():
        state["model"], state["opt"] = fresh()
        step(0, batches[0], {})  # warm-up, not timed; the epoch starts afresh
    state["model"], state["opt"] = fresh()
    return _Trainer(step, one_blas_thread)


def run_fixedsim(policy_name, x, y, batches, seed=0, model_name="lenet"):
    """``(seconds, mean loss of the last 20 batches, per-layer seconds)`` of one epoch."""
    t = fixedsim_trainer(policy_name, x, y, batches, seed, model_name)
    t.run(batches)
    return t.seconds, t.loss, t.counters


def torch_trainer(x, y, batches, seed=0, threads=None, model_name="lenet"):
    """A :class:`_Trainer` of the same network in PyTorch (float32, its CPU kernels), from
    the same initial weights; ``trainer.version`` is PyTorch's."""
    import torch

    import fixedsim.nn as nn

    if threads:
        torch.set_num_threads(threads)
    ours = _model(model_name, seed, x.shape[1:])
    layers = []
    for layer in ours.layers:  # the same network, layer by layer, with the same weights
        if isinstance(layer, nn.Conv2d):
            t = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                layer.stride, layer.padding)
            w = layer.weight.value
        elif isinstance(layer, nn.Linear):
            t = torch.nn.Linear(layer.in_features, layer.out_features)
            w = layer.weight.value.T
        elif isinstance(layer, nn.MaxPool2d):
            t = torch.nn.MaxPool2d(layer.kernel_size, layer.stride)
        else:
            t = {"ReLU": torch.nn.ReLU, "Flatten": torch.nn.Flatten}[type(layer).__name__]()
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                t.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, np.float32)))
                t.bias.copy_(torch.from_numpy(layer.bias.value.astype(np.float32)))
        layers.append(t)
    net = torch.nn.Sequential(*layers)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    lossf = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    state = {"opt": torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)}

    def step(i, idx, counters):
        opt = state["opt"]
        idx = torch.from_numpy(idx)
        opt.zero_grad()
        loss = lossf(net(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        return float(loss.detach())

    step(0, batches[0], {})  # warm-up
    net.load_state_dict(init)
    state["opt"] = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    trainer = _Trainer(step)
    trainer.version = torch.__version__
    return trainer


def run_torch(x, y, batches, seed=0, threads=None, model_name="lenet"):
    """``(seconds, mean loss of the last 20 batches, PyTorch's version)`` of one epoch."""
    t = torch_trainer(x, y, batches, seed, threads, model_name)
    t.run(batches)
    return t.seconds, t.loss, t.version


def blas_floor(model_name, in_shape, batch_size, threads, repeats=5, seed=0):
    """Seconds the products of one training step take as plain BLAS calls, float64 and
    float32: ``{dtype: seconds}``.

    The shapes are those a native library multiplies (``fixedsim.cost.count_step``'s
    ``gemm`` rows: each layer's forward product and both gradients, a convolution's input
    gradient as ``G @ W``). An exact float32 step (``Policy.float32()``: exact sums rounded
    once, proven on float64 BLAS) cannot take less than the float64 figure; PyTorch's float32
    step runs the float32 ones (in its own kernels). Each product is timed best of
    ``repeats`` on standard normal data, at ``threads`` BLAS threads."""
    from threadpoolctl import threadpool_limits

    import fixedsim.nn as nn
    from fixedsim.cost.counts import count_step

    model = _model(model_name, seed, in_shape)
    shapes = [g[:3] for row in count_step(model, nn.Policy.float32(), batch_size, in_shape).rows
              for g in row.gemm]
    rng = np.random.default_rng(seed)
    out = {}
    with threadpool_limits(limits=threads, user_api="blas"):
        for dt in (np.float64, np.float32):
            total = 0.0
            for M, N, K in shapes:
                a = rng.standard_normal((M, K)).astype(dt)
                b = rng.standard_normal((K, N)).astype(dt)
                a @ b  # warm-up
                best = np.inf
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    a @ b
                    best = min(best, time.perf_counter() - t0)
                total += best
            out[np.dtype(dt).name] = total
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["lenet", "mlp"], default="lenet",
                    help="lenet (default) or mlp (784-1000-1000-10)")
    ap.add_argument("--images", type=int, default=60000, help="training images (default 60000)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", default="fashion-mnist",
                    help="fashion-mnist (default), embedded, or a folder of IDX files")
    ap.add_argument("--policies", nargs="+", default=["float32", "fixed:16:14:stochastic"])
    ap.add_argument("--threads", type=int, default=None,
                    help="Numba and PyTorch threads (default: all cores)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time (use with --threads 1 on a busy machine)")
    ap.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    ap.add_argument("--interleave", type=int, default=0, metavar="STEPS",
                    help="run the implementations in turns, STEPS batches each (default 0: "
                         "each its whole epoch, one after the other); on a shared machine "
                         "whose speed changes over minutes, turns give every implementation "
                         "the same machine")
    ap.add_argument("--floor", action="store_true",
                    help="also time the step's products as plain float64 and float32 BLAS "
                         "calls (what an exact float32 step cannot go below), per epoch")
    args = ap.parse_args(argv)

    import numba

    import fixedsim
    from fixedsim import data as fdata

    global _clock
    if args.cpu_time:
        _clock = time.process_time
    if args.threads:
        numba.set_num_threads(args.threads)
    ds = fdata.load(args.data)
    n = min(args.images, len(ds.x_train))
    x, y = ds.x_train[:n], ds.y_train[:n]
    batches = _batches(n, args.batch_size)
    cmd = sys.argv[1:] if argv is None else argv
    title = {"lenet": "LeNet", "mlp": "MLP 784-1000-1000-10"}[args.model]
    lines = [f"# {title}, one epoch of {n:,} images ({ds.name}), batch {args.batch_size}",
             "",
             f"command: `python benchmarks/train.py {shlex.join(cmd)}`",
             f"machine: {platform.node()}, {os.cpu_count()} CPUs, load before start "
             f"{os.getloadavg()[0]:.2f}; fixedsim {fixedsim.__version__}, numpy {np.__version__}, "
             f"numba {numba.__version__} ({numba.get_num_threads()} threads); "
             f"{'process CPU time' if args.cpu_time else 'wall time'}"
             + (f"; in turns of {args.interleave} batches" if args.interleave else ""), ""]
    trainers = []  # (name, policy or None, trainer)
    if not args.no_torch:
        try:
            t = torch_trainer(x, y, batches, threads=args.threads, model_name=args.model)
            trainers.append((f"PyTorch {t.version} float32 (CPU)", None, t))
        except ModuleNotFoundError:
            lines.append("PyTorch is not installed (`pip install torch==2.13.0`): no yardstick.")
    for pol in args.policies:
        trainers.append((f"fixedsim {pol}", pol, fixedsim_trainer(pol, x, y, batches,
                                                                  model_name=args.model)))
    chunk = args.interleave or len(batches)
    for start in range(0, len(batches), chunk):  # in turns: each sees the same machine
        for _, _, t in trainers:
            t.run(batches[start:start + chunk])
    rows, breakdowns = [], []
    torch_s = f32_s = None
    for name, pol, t in trainers:
        rows.append((name, t.seconds, t.loss))
        if pol is None:
            torch_s = t.seconds
            continue
        if pol == "float32":
            f32_s = t.seconds
        breakdowns.append((pol, t.seconds, t.counters))
        print(f"{pol}: {t.seconds:.1f} s", file=sys.stderr)
    lines += ["| implementation | seconds / epoch | images / s | vs PyTorch | vs fixedsim float32 "
              "| mean loss, last 20 batches |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, secs, loss in rows:
        vt = f"{secs / torch_s:.2f}x" if torch_s else "-"
        vf = f"{secs / f32_s:.2f}x" if f32_s and name.startswith("fixedsim") else "-"
        lines.append(f"| {name} | {secs:.1f} | {n / secs:,.0f} | {vt} | {vf} | {loss:.4f} |")
    for name, _, t in trainers:
        if t.compiled:
            lines += ["", f"{name} compiled {len(t.compiled)} kernel signature(s) after its "
                      f"warm-up step ({', '.join(sorted(set(t.compiled)))}): "
                      f"{t.compile_seconds:.1f} s, not counted above (part of the warm-up; the "
                      "per-layer seconds below include it)."]
    for pol, secs, counters in breakdowns:
        lines += ["", f"## fixedsim {pol}: where the time goes", ""]
        if args.cpu_time:  # the per-layer seconds are wall time: shares of their sum
            lines += ["Per-layer seconds are wall time (Sequential measures them); shares are "
                      "of their sum.", ""]
            secs = sum(sum(v) if isinstance(v, tuple) else v for v in counters.values())
        lines += ["| layer | forward s | backward s | share |", "| --- | ---: | ---: | ---: |"]
        accounted = 0.0
        for name, v in counters.items():
            if name == "optimizer":
                continue
            f, b = v
            accounted += f + b
            lines.append(f"| {name} | {f:.2f} | {b:.2f} | {100 * (f + b) / secs:.0f}% |")
        o = counters.get("optimizer", 0.0)
        lines.append(f"| optimizer | {o:.2f} | | {100 * o / secs:.0f}% |")
        rest = secs - accounted - o
        if not args.cpu_time:
            lines.append(f"| rest | {rest:.2f} | | {100 * rest / secs:.0f}% |")
    if args.floor:
        steps = len(batches)
        lines += ["", "## The products as plain BLAS calls (the floor of an exact float32 "
                  "epoch)", "",
                  "| BLAS threads | float64 ms / step | s / epoch | float32 ms / step | "
                  "s / epoch |", "| ---: | ---: | ---: | ---: | ---: |"]
        for t in sorted({1, args.threads or os.cpu_count()}):
            fl = blas_floor(args.model, x.shape[1:], args.batch_size, t)
            f64, f32 = fl["float64"], fl["float32"]
            lines.append(f"| {t} | {1e3 * f64:.2f} | {f64 * steps:.2f} | {1e3 * f32:.2f} | "
                         f"{f32 * steps:.2f} |")
        lines += ["", "Wall time, best of 5 per product, one step's products times the "
                  f"{steps} steps; fixedsim runs its products at one BLAS thread (a "
                  "multi-threaded OpenBLAS keeps its workers spinning after each call, "
                  "which stalls the Numba kernels between the calls)."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
