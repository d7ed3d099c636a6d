"""One training epoch of the LeNet, side by side: fixedsim policies against PyTorch on the CPU.

    python benchmarks/train.py [--images N] [--batch-size B] [--data NAME]
                               [--policies P ...] [--threads T] [--markdown PATH]

Every implementation trains the same network (``fixedsim.nn.lenet``: conv 5x5 16, pool, conv
5x5 32, pool, FC 128, FC 10) from the same initial weights on the same mini-batches in the same
order (SGD, lr 0.02, momentum 0.9), for one epoch over the first ``N`` training images (default
60,000 of Fashion-MNIST; ``--data embedded`` uses the shipped 10,000). Timed: the whole epoch
loop (forward, loss, backward, optimizer step); not timed: data loading and one warm-up step
per implementation (Numba loads or compiles its kernels; PyTorch initialises its pools).

PyTorch (optional: ``pip install torch==2.13.0``) is the yardstick a user would pick instead:
float32 with its own CPU kernels (oneDNN/BLAS sums in its own order). fixedsim rounds every
product and tensor as the policy says, bit for bit. Reported: seconds per epoch, images per
second, the ratio to PyTorch, the ratio of each policy to fixedsim's float32, and the per-layer
breakdown of fixedsim's time (forward and backward of each layer, measured by Sequential;
"optimizer" is the SGD step; "rest" the loss, batching and bookkeeping).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np


def _batches(n, batch_size, seed=0):
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def run_fixedsim(policy_name, x, y, batches, seed=0):
    import fixedsim.nn as nn
    from fixedsim.nn.optim import SGD
    from fixedsim.nn.train import _init_weights

    policy = nn.Policy.parse(policy_name)
    model = nn.lenet(seed, in_shape=x.shape[1:])
    _init_weights(model, policy, seed)
    opt = SGD(model.named_parameters(), lr=0.02, momentum=0.9)
    lossf = nn.SoftmaxCrossEntropy()

    def step(i, idx, counters):
        ctx = nn.Context(policy, seed=seed, step=i)
        logits = model.forward(x[idx], ctx)
        loss = lossf(logits, y[idx], ctx)
        model.backward(lossf.backward(ctx), ctx)
        t0 = time.perf_counter()
        opt.step(ctx)
        counters["optimizer"] = counters.get("optimizer", 0.0) + time.perf_counter() - t0
        for name, lc in ctx.counters.items():
            if lc.forward_seconds or lc.backward_seconds:
                f, b = counters.get(name, (0.0, 0.0))
                counters[name] = (f + lc.forward_seconds, b + lc.backward_seconds)
        return loss

    step(0, batches[0], {})  # warm-up, not timed; the epoch below starts afresh
    model = nn.lenet(seed, in_shape=x.shape[1:])
    _init_weights(model, policy, seed)
    opt = SGD(model.named_parameters(), lr=0.02, momentum=0.9)
    counters, losses = {}, []
    t0 = time.perf_counter()
    for i, idx in enumerate(batches):
        losses.append(step(i, idx, counters))
    total = time.perf_counter() - t0
    return total, float(np.mean(losses[-20:])), counters


def run_torch(x, y, batches, seed=0, threads=None):
    import torch

    import fixedsim.nn as nn

    if threads:
        torch.set_num_threads(threads)
    ours = nn.lenet(seed, in_shape=x.shape[1:])
    c1, c2 = ours.layers[0], ours.layers[3]
    f1, f2 = ours.layers[7], ours.layers[9]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(c1.in_channels, c1.out_channels, 5), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c2.in_channels, c2.out_channels, 5), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(f1.in_features, f1.out_features), torch.nn.ReLU(),
        torch.nn.Linear(f2.in_features, f2.out_features))
    with torch.no_grad():
        for tl, ol in ((net[0], c1), (net[3], c2)):
            tl.weight.copy_(torch.from_numpy(ol.weight.value.astype(np.float32)))
            tl.bias.copy_(torch.from_numpy(ol.bias.value.astype(np.float32)))
        for tl, ol in ((net[7], f1), (net[9], f2)):
            tl.weight.copy_(torch.from_numpy(ol.weight.value.T.astype(np.float32)))
            tl.bias.copy_(torch.from_numpy(ol.bias.value.astype(np.float32)))
    init = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    lossf = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step(idx):
        opt.zero_grad()
        loss = lossf(net(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        return float(loss.detach())

    step(torch.from_numpy(batches[0]))  # warm-up
    net.load_state_dict(init)
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    losses = []
    t0 = time.perf_counter()
    for idx in batches:
        losses.append(step(torch.from_numpy(idx)))
    return time.perf_counter() - t0, float(np.mean(losses[-20:])), torch.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=60000, help="training images (default 60000)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", default="fashion-mnist",
                    help="fashion-mnist (default), embedded, or a folder of IDX files")
    ap.add_argument("--policies", nargs="+", default=["float32", "fixed:16:14:stochastic"])
    ap.add_argument("--threads", type=int, default=None,
                    help="Numba and PyTorch threads (default: all cores)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    ap.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    args = ap.parse_args(argv)

    import numba
    from threadpoolctl import threadpool_limits

    import fixedsim
    from fixedsim import data as fdata

    if args.threads:
        numba.set_num_threads(args.threads)
    ds = fdata.load(args.data)
    n = min(args.images, len(ds.x_train))
    x, y = ds.x_train[:n], ds.y_train[:n]
    batches = _batches(n, args.batch_size)
    cmd = sys.argv[1:] if argv is None else argv
    lines = [f"# LeNet, one epoch of {n:,} images ({ds.name}), batch {args.batch_size}",
             "",
             f"command: `python benchmarks/train.py {shlex.join(cmd)}`",
             f"machine: {platform.node()}, {os.cpu_count()} CPUs, load before start "
             f"{os.getloadavg()[0]:.2f}; fixedsim {fixedsim.__version__}, numpy {np.__version__}, "
             f"numba {numba.__version__} ({numba.get_num_threads()} threads)", ""]
    rows, breakdowns = [], []
    torch_s = None
    if not args.no_torch:
        try:
            secs, loss, ver = run_torch(x, y, batches, threads=args.threads)
            torch_s = secs
            rows.append((f"PyTorch {ver} float32 (CPU)", secs, loss))
        except ModuleNotFoundError:
            lines.append("PyTorch is not installed (`pip install torch==2.13.0`): no yardstick.")
    f32_s = None
    for pol in args.policies:
        with threadpool_limits(limits=1, user_api="blas"):  # as fixedsim.nn.train does
            secs, loss, counters = run_fixedsim(pol, x, y, batches)
        rows.append((f"fixedsim {pol}", secs, loss))
        if pol == "float32":
            f32_s = secs
        breakdowns.append((pol, secs, counters))
        print(f"{pol}: {secs:.1f} s", file=sys.stderr)
    lines += ["| implementation | seconds / epoch | images / s | vs PyTorch | vs fixedsim float32 "
              "| mean loss, last 20 batches |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, secs, loss in rows:
        vt = f"{secs / torch_s:.2f}x" if torch_s else "-"
        vf = f"{secs / f32_s:.2f}x" if f32_s and name.startswith("fixedsim") else "-"
        lines.append(f"| {name} | {secs:.1f} | {n / secs:,.0f} | {vt} | {vf} | {loss:.4f} |")
    for pol, secs, counters in breakdowns:
        lines += ["", f"## fixedsim {pol}: where the time goes", "",
                  "| layer | forward s | backward s | share |", "| --- | ---: | ---: | ---: |"]
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
        lines.append(f"| rest | {rest:.2f} | | {100 * rest / secs:.0f}% |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
