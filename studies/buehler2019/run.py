"""Bühler (2019): time per epoch as a function of the number formats, formula against
measurement.

Writes, beside this file (or into --out):

- ``predicted.csv``: the cost model's epoch (60,000 images, batch 64) for the LeNet and the MLP
  under float32, bf16, fp16, fixed<16,14> and fixed<8,4> on every machine profile that can run
  the formats (this CPU, V100, A100, H100, H200, Gupta et al.'s FPGA);
- ``measured.csv``: on this CPU, the prediction against a native PyTorch epoch (float32, bf16,
  fp16: the formats PyTorch trains in on a CPU), and fixedsim's own epoch predicted by its
  self model against a fixedsim training epoch;
- ``time_vs_format.png``: the predicted epoch per format and machine.

Run: ``python studies/buehler2019/run.py [--images N] [--threads 1]`` after
``fixedsim cost calibrate --threads 1`` (the profile ``this``).
"""

import argparse
import csv
import os
import pathlib
import time

import fixedsim as fs
from fixedsim.cost import ProfileError, predict
from fixedsim.cost.selfmodel import measure, predict_self
from fixedsim.cost.validate import validate
from fixedsim.nn.train import TrainConfig, train

HERE = pathlib.Path(__file__).parent
POLICIES = ["float32", "bf16", "fp16", "fixed:16:14:stochastic", "fixed:8:4:stochastic"]
MACHINES = ["this", "v100", "a100", "h100", "h200", "gupta2015_fpga"]
MODELS = ["lenet", "mlp"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--images", type=int, default=2048, help="images of the measured epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-fixedsim", action="store_true")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for model in MODELS:
        for pol in POLICIES:
            for m in MACHINES:
                try:
                    p = predict(model, pol, m, batch=64, images=60_000)
                except ProfileError as err:
                    rows.append({"model": model, "policy": pol, "machine": m,
                                 "predicted_s": "", "note": str(err)[:80]})
                    continue
                bound = {}
                for r in p.rows:
                    bound[r["bound"]] = bound.get(r["bound"], 0.0) + r["predicted_s"]
                rows.append({"model": model, "policy": pol, "machine": m,
                             "predicted_s": p.epoch_s,
                             "compute_bound_s": bound.get("compute", 0.0),
                             "memory_bound_s": bound.get("memory", 0.0),
                             "overhead_s": sum(r["overhead_s"] for r in p.rows), "note": ""})
    _write(out / "predicted.csv", rows)

    meas = []
    for model in MODELS:
        for pol in ("float32", "bf16", "fp16"):
            v = validate(model, pol, "this", batch=64, images=a.images, threads=a.threads)
            meas.append({"model": model, "policy": pol, "engine": "pytorch",
                         "images": a.images, "predicted_s": v.prediction.epoch_s,
                         "measured_s": v.measured[-1],
                         "median_layer_error": v.median_layer_error,
                         "load": os.getloadavg()[0]})
            print(model, pol, "pytorch", meas[-1])
    if not a.skip_fixedsim:
        import numba

        numba.set_num_threads(a.threads)
        for model in MODELS:
            for pol in POLICIES:
                policy = fs.nn.Policy.parse(pol)
                net = fs.nn.build(model)
                t0 = time.perf_counter()
                prof = measure(policy, net, (1, 28, 28))
                tm = time.perf_counter() - t0
                pred = predict_self(net, policy, 64, a.images, (1, 28, 28), test_images=64,
                                    eval_batch=64, profile=prof)
                cfg = TrainConfig(model=model, epochs=1, batch_size=64, train_size=a.images,
                                  test_size=64, eval_batch_size=64)
                res = train(cfg, policy, progress=False)
                h = res.history[-1]
                meas.append({"model": model, "policy": pol, "engine": "fixedsim",
                             "images": a.images, "predicted_s": pred["epoch_s"],
                             "measured_s": h["seconds"],
                             "median_layer_error": "", "load": os.getloadavg()[0],
                             "measure_s": tm})
                print(model, pol, "fixedsim", meas[-1])
    _write(out / "measured.csv", meas)
    _figure(rows, out / "time_vs_format.png")


def _write(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print("wrote", path)


def _figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(11, 4), sharey=False)
    for ax, model in zip(axes, MODELS, strict=True):
        for i, m in enumerate(MACHINES):
            ys = [next((r["predicted_s"] for r in rows if r["model"] == model
                        and r["policy"] == p and r["machine"] == m), "") for p in POLICIES]
            xs = [j + i * 0.13 for j in range(len(POLICIES))]
            ax.bar([x for x, y in zip(xs, ys, strict=True) if y != ""],
                   [y for y in ys if y != ""], width=0.13, label=m)
        ax.set_xticks([j + 0.33 for j in range(len(POLICIES))])
        ax.set_xticklabels([p.replace(":stochastic", "") for p in POLICIES], rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("predicted seconds per epoch (60,000 images)")
        ax.set_title(model)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
