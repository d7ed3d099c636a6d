"""Reuse error and remain ratio as functions of L and H on real im2col matrices.

    python studies/deep_reuse/error_vs_LH.py [--run RUN_DIR] [--images N] [--out DIR]

The network is a LeNet trained on the embedded Fashion-MNIST subset (float32 policy, 3
epochs, seed 0; trained here into ``OUT/lenet`` unless ``--run`` names a finished
``fixedsim train`` run of a LeNet). On the first ``N`` test images (default 256):

* for each conv layer, its im2col matrix ``X`` (rows: output positions of all images) and
  weights ``W``; for every sub-vector length ``L`` and hyperplane count ``H`` the remain ratio
  ``r_c`` of the batch scope and the relative error of the reused product,
  ``||X W - Xt W||_F / ||X W||_F`` (float64 centroids and products: the reuse error alone);
* for ``L = 25`` (one block in conv1, 16 in conv2) and each ``H``: the test accuracy of the
  whole network on all 2,000 test images with both conv layers reused at inference, and the
  inference wall time against dense (best of 3, BLAS on one thread), both with the forward
  products accumulated exactly and rounded once into FP32 (``MatmulSpec(output=FP32)``).

Writes ``OUT/error_vs_LH.csv``, ``OUT/inference.csv`` and ``OUT/figures/*.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
LS = {"0.conv2d": [1, 5, 10, 25], "3.conv2d": [5, 10, 25, 50, 100, 200, 400]}
HS = [2, 4, 6, 8, 10, 12, 16, 20, 24, 32]


def _model(args):
    import fixedsim.nn as nn
    from fixedsim.nn.train import TrainConfig, _load_checkpoint, load_run, train

    run = pathlib.Path(args.run) if args.run else args.out / "lenet"
    if not (run / "checkpoint.npz").is_file():
        cfg = TrainConfig(model="lenet", data="embedded", epochs=3, batch_size=32, lr=0.02,
                          schedule="cosine:3", seed=0)
        train(cfg, nn.Policy.float32(), out=run, progress=False)
    config, policy = load_run(run)
    model = nn.build(config.model, seed=config.seed, in_shape=(1, 28, 28), classes=10,
                     **config.model_options)
    opt = config.make_optimizer(model.named_parameters())
    from fixedsim.nn.train import _Scaler

    _load_checkpoint(run, model, opt, _Scaler(policy.loss_scale))
    return model, policy


def _conv_inputs(model, policy, x):
    import fixedsim.nn as nn

    ctx = nn.Context(policy, seed=0, training=False, phase=1)
    out, h = {}, x
    for layer in model.layers:
        if isinstance(layer, nn.Conv2d):
            out[layer.name] = (layer, h)
        h = layer.forward(h, ctx)
    return out


def _accuracy(model, policy, x, y, reuse, batch=500):
    import fixedsim.nn as nn

    for layer in model.layers:
        if isinstance(layer, nn.Conv2d):
            layer.set_reuse(reuse)
    correct, t = 0, 0.0
    for i in range(0, len(x), batch):
        ctx = nn.Context(policy, seed=0, step=i, training=False, phase=1)
        t0 = time.perf_counter()
        logits = model.forward(x[i:i + batch], ctx)
        t += time.perf_counter() - t0
        correct += int((np.asarray(logits).argmax(1) == y[i:i + batch]).sum())
    rc = [ctx.counters[n].reuse.remain_ratio for n in ctx.counters
          if ctx.counters[n].reuse.calls]
    for layer in model.layers:
        if isinstance(layer, nn.Conv2d):
            layer.set_reuse(None)
    return correct / len(x), t, rc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a finished `fixedsim train` run of a LeNet")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--out", type=pathlib.Path, default=HERE / "results-LH")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from threadpoolctl import threadpool_limits

    import fixedsim as fs
    import fixedsim.data as data
    from fixedsim.matmul import _im2col
    from fixedsim.reuse import Reuse, cluster

    ds = data.load("embedded")
    with threadpool_limits(1):
        model, policy = _model(args)
        rows = []
        for name, (layer, x) in _conv_inputs(model, policy, ds.x_test[:args.images]).items():
            kh, kw = layer.kernel_size
            Ho, Wo = x.shape[2] - kh + 1, x.shape[3] - kw + 1
            X = _im2col(np.asarray(x, np.float64), kh, kw, (1, 1), (0, 0), Ho, Wo)
            W = layer.weight.value.reshape(layer.out_channels, -1).T.astype(np.float64)
            Y = X @ W
            ny = np.linalg.norm(Y)
            for L in LS[name]:
                for H in HS:
                    cl = cluster(X, L, H, seed=7)  # float64 centroids
                    Yr = cl.reconstruct() @ W
                    macs = sum(len(n) * (k1 - k0) for n, (k0, k1) in
                               zip(cl.counts, cl.bounds, strict=True))
                    rows.append({"layer": name, "rows": X.shape[0], "K": X.shape[1], "L": L,
                                 "H": H, "remain_ratio": cl.remain_ratio,
                                 "rel_error": float(np.linalg.norm(Yr - Y) / ny),
                                 "macs_fraction": macs / (X.shape[0] * X.shape[1]),
                                 "hash_fraction": H / W.shape[1]})
                    r = rows[-1]
                    print(f"{name} L={L:<3d} H={H:<2d} r_c={r['remain_ratio']:.4f} "
                          f"error={r['rel_error']:.4f}", flush=True)
        _write(args.out / "error_vs_LH.csv", rows)
        # inference with exact accumulation and one rounding into FP32, where the reused
        # forward product is computed per cluster (under FP32 chains it would be dense)
        policy = dataclasses.replace(policy, forward=fs.MatmulSpec(output=fs.FP32))
        inf = []
        acc, t, _ = _accuracy(model, policy, ds.x_test, ds.y_test, None)
        _accuracy(model, policy, ds.x_test[:500], ds.y_test[:500], None)  # warm-up
        t = min(_accuracy(model, policy, ds.x_test, ds.y_test, None)[1] for _ in range(3))
        inf.append({"H": 0, "setting": "dense", "test_acc": acc, "seconds": t,
                    "rc_conv1": 1.0, "rc_conv2": 1.0, "speedup": 1.0})
        dense_t = t
        for H in HS:
            r = Reuse(L=25, H=H)
            acc, _, rc = _accuracy(model, policy, ds.x_test, ds.y_test, r)
            t = min(_accuracy(model, policy, ds.x_test, ds.y_test, r)[1] for _ in range(3))
            inf.append({"H": H, "setting": str(r), "test_acc": acc, "seconds": t,
                        "rc_conv1": rc[0], "rc_conv2": rc[1], "speedup": dense_t / t})
            print(f"inference {r}: acc {acc:.4f} r_c {rc[0]:.3f}/{rc[1]:.3f} "
                  f"{t:.2f} s (dense {dense_t:.2f} s)", flush=True)
        _write(args.out / "inference.csv", inf)
    _figures(rows, inf, args.out / "figures")


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _figures(rows, inf, figdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(2, len(layers), figsize=(5 * len(layers), 7), squeeze=False)
    for j, name in enumerate(layers):
        for L in LS[name]:
            sel = [r for r in rows if r["layer"] == name and r["L"] == L]
            hs = [r["H"] for r in sel]
            axes[0][j].semilogy(hs, [r["remain_ratio"] for r in sel], "o-", label=f"L={L}")
            axes[1][j].semilogy(hs, [max(r["rel_error"], 1e-17) for r in sel], "o-",
                                label=f"L={L}")
        K = next(r["K"] for r in rows if r["layer"] == name)
        axes[0][j].set_title(f"{name} (K={K})")
        axes[0][j].set_ylabel("remain ratio r_c")
        axes[1][j].set_ylabel("relative error of the layer output")
        axes[1][j].set_xlabel("hyperplanes H")
        axes[0][j].legend(fontsize=8)
        axes[1][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figdir / "rc_error_vs_H.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in layers:
        for L in LS[name]:
            sel = [r for r in rows if r["layer"] == name and r["L"] == L]
            ax.loglog([r["remain_ratio"] for r in sel],
                      [max(r["rel_error"], 1e-17) for r in sel], "o-", ms=3,
                      label=f"{name} L={L}")
    ax.set_xlabel("remain ratio r_c")
    ax.set_ylabel("relative error of the layer output")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(figdir / "error_vs_rc.png", dpi=120)
    plt.close(fig)
    fig, ax1 = plt.subplots(figsize=(6, 4.5))
    sel = [r for r in inf if r["H"]]
    ax1.plot([r["H"] for r in sel], [100 * r["test_acc"] for r in sel], "o-", label="reuse")
    ax1.axhline(100 * inf[0]["test_acc"], color="k", ls="--", label="dense")
    ax1.set_xlabel("hyperplanes H (L = 25, both conv layers)")
    ax1.set_ylabel("test accuracy (%)")
    ax2 = ax1.twinx()
    ax2.plot([r["H"] for r in sel], [r["speedup"] for r in sel], "s:", color="C1",
             label="inference speed-up")
    ax2.set_ylabel("inference speed-up over dense")
    ax1.legend(loc="lower center")
    ax2.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(figdir / "inference.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
