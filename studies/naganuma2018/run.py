"""Naganuma (2018): a trained LeNet with one layer at a time in FP16 (weights and
activations; FP16 or FP32 accumulation): the accuracy change, the predicted and measured
speed-up of that layer, and whether it is compute- or memory-bound.

1. Train the LeNet in float32 on the embedded Fashion-MNIST subset (fixedsim, exact float32
   products).
2. Inference on the test set with layer i alone in FP16: its operands (input and weights)
   rounded to FP16 (``forward.input``), its output stored in FP16 (``activations``), its
   products accumulated in FP16 (an FMA chain) or in FP32; every other layer in float32.
3. Per layer, the forward speed-up FP32 -> FP16 the cost model predicts (batch ``--batch``)
   on V100, H100 and this CPU (profile ``this``), with its bound; and the one measured with
   PyTorch on this CPU (the layer alone, float32 against float16 autocast).

Writes ``results/layers.csv`` and prints the table. Run:
``python studies/naganuma2018/run.py [--train-images 4000] [--epochs 2]``.
"""

import argparse
import csv
import pathlib

import numpy as np

import fixedsim as fs
from fixedsim import data as fdata
from fixedsim.cost import count_step
from fixedsim.cost.model import predict_rows
from fixedsim.cost.validate import measure
from fixedsim.nn import Context, Policy, Role
from fixedsim.nn.train import TrainConfig, train

HERE = pathlib.Path(__file__).parent


def fp16_policy(acc):
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(acc))
    return Policy(name=f"fp16-acc-{acc!r}", activations=Role(fs.FP16), forward=spec)


def accuracy(model, x, y, layer_policy, base, batch=500):
    correct = 0
    for s in range(0, len(x), batch):
        ctx_base = Context(base, training=False, phase=1, step=s)
        ctx_16 = Context(layer_policy, training=False, phase=1, step=s) if layer_policy else None
        h = ctx_base.round("activations", x[s:s + batch], "input")
        for layer in model.layers:
            use = ctx_16 if ctx_16 is not None and layer.name == accuracy.target else ctx_base
            h = layer.forward(h, use)
        correct += int((np.asarray(h).argmax(axis=1) == y[s:s + batch]).sum())
    return correct / len(x)


accuracy.target = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Policy.float32()
    cfg = TrainConfig(model="lenet", epochs=a.epochs, batch_size=64, train_size=a.train_images,
                      lr=0.05, seed=0)
    res = train(cfg, base, progress=False)
    model = res.model
    ds = fdata.load("embedded")
    x, y = ds.x_test, ds.y_test
    accuracy.target = None
    acc32 = accuracy(model, x, y, None, base)
    print(f"float32 test accuracy {acc32:.4f}")

    layers = [layer.name for layer in model.layers]
    p32 = count_step(model, base, a.batch, (1, 28, 28), training=False)
    rows = []
    pred = {}
    for acc in (fs.FP16, fs.FP32):
        pol = fp16_policy(acc)
        p16 = count_step(model, pol, a.batch, (1, 28, 28), training=False)
        for machine in ("v100", "h100", "this"):
            r32 = {r["layer"]: r for r in predict_rows([(p32, 1)], machine)
                   if r["product"] == "forward"}
            r16 = {r["layer"]: r for r in predict_rows([(p16, 1)], machine)
                   if r["product"] == "forward"}
            for name in layers:
                pred[(repr(acc), machine, name)] = (r32[name], r16[name])
    m32 = measure(model, "float32", a.batch, (1, 28, 28), test_images=a.batch,
                  eval_batch=a.batch, threads=a.threads)["eval_rows"]
    m16 = measure(model, "fp16", a.batch, (1, 28, 28), test_images=a.batch,
                  eval_batch=a.batch, threads=a.threads)["eval_rows"]
    for name in layers:
        for acc in (fs.FP16, fs.FP32):
            accuracy.target = name
            acc16 = accuracy(model, x, y, fp16_policy(acc), base)
            row = {"layer": name, "accumulation": repr(acc), "acc_float32": acc32,
                   "acc_fp16_layer": acc16, "delta_acc": acc16 - acc32}
            for machine in ("v100", "h100", "this"):
                r32, r16 = pred[(repr(acc), machine, name)]
                row[f"{machine}_speedup"] = (r32["predicted_s"] / r16["predicted_s"]
                                             if r16["predicted_s"] else "")
                roof32 = max(r32["compute_s"], r32["memory_s"])
                roof16 = max(r16["compute_s"], r16["memory_s"])
                row[f"{machine}_roofline_speedup"] = roof32 / roof16 if roof16 else ""
                row[f"{machine}_bound_fp32"] = r32["bound"]
                row[f"{machine}_bound_fp16"] = r16["bound"]
            t32 = m32.get(("eval", name, "forward"))
            t16 = m16.get(("eval", name, "forward"))
            row["measured_cpu_speedup"] = t32 / t16 if t32 and t16 else ""
            rows.append(row)
            print(row)
    with open(out / "layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", out / "layers.csv")


if __name__ == "__main__":
    main()
