"""Accuracy, MACs and wall time of the deep-reuse sweep, per reuse setting (mean and spread
over the seeds), as a Markdown table and a figure.

    python studies/deep_reuse/summarize.py [RESULTS_DIR]

RESULTS_DIR (default ``studies/deep_reuse/results/study``) is the output of
``fixedsim sweep studies/deep_reuse/study.toml``. MACs are those every matrix product of the
run performed (all layers, training and the per-epoch evaluations, from the per-epoch
counters), relative to the dense runs; the conv columns count the reused layers only
(forward, and backward weight and input gradients; steps an adaptive schedule ran dense count
in full), with the remain ratio averaged over the calls that reused.
Test accuracy is as the run measured it (the reuse setting active in evaluation) and, in the
"evaluated dense" column, of the final weights with every layer dense.
Writes ``RESULTS_DIR/summary_reuse.md`` and ``RESULTS_DIR/figures/reuse_tradeoff.png``.
"""

from __future__ import annotations

import csv
import pathlib
import sys
from collections import defaultdict

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = pathlib.Path(argv[0]) if argv else HERE / "results" / "study"
    with open(out / "results.csv") as f:
        results = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    with open(out / "histories.csv") as f:
        hist = defaultdict(list)
        for r in csv.DictReader(f):
            hist[r["run_id"]].append(r)
    per = defaultdict(list)
    for r in results:
        h = hist[r["run_id"]]
        tot = {k: sum(_f(e.get(k)) if e.get(k) not in (None, "") else 0.0 for e in h)
               for k in ("macs", "reuse.macs", "reuse.dense_macs", "reuse.backward_macs",
                         "reuse.backward_dense_macs", "reuse.rows", "reuse.clusters",
                         "reuse.hash_ops")}
        per[r["train.reuse"] or "dense"].append({
            "acc": _f(r["final_test_acc"]), "best": _f(r["best_test_acc"]),
            "dense_acc": _dense_eval(out / "runs" / r["run_id"]),
            "seconds": _f(r["seconds"]), **tot})
    dense = per.get("dense")
    base_macs = np.mean([x["macs"] for x in dense]) if dense else float("nan")
    base_t = np.mean([x["seconds"] for x in dense]) if dense else float("nan")
    lines = ["| reuse setting | runs | final test acc (%) | best (%) | evaluated dense (%) | "
             "r_c (conv) | conv MACs / dense | all MACs / dense | hashing / dense conv MACs | "
             "wall time (s) | speed-up |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    # the conv layers' dense MACs of a whole run (the same for every run: same model, data and
    # epochs); a run that spent some steps dense (an adaptive schedule's last stage) did those
    # dense, so they count in full
    conv_dense = max((x["reuse.dense_macs"] + x["reuse.backward_dense_macs"]
                      for xs in per.values() for x in xs), default=0.0)
    rows = []
    for name, xs in per.items():
        acc = np.array([x["acc"] for x in xs]) * 100
        best = np.array([x["best"] for x in xs]) * 100
        t = np.array([x["seconds"] for x in xs])
        allm = np.mean([x["macs"] for x in xs]) / base_macs
        dm = sum(x["reuse.dense_macs"] + x["reuse.backward_dense_macs"] for x in xs)
        done = sum(x["reuse.macs"] + x["reuse.backward_macs"] for x in xs)
        conv = (done + len(xs) * conv_dense - dm) / (len(xs) * conv_dense) if dm else 1.0
        hashf = sum(x["reuse.hash_ops"] for x in xs) / (len(xs) * conv_dense) if dm else 0.0
        rr = sum(x["reuse.clusters"] for x in xs) / max(1.0, sum(x["reuse.rows"] for x in xs))
        rc = rr if dm else 1.0
        rows.append((name, acc, t, conv, allm, rc))
        dacc = np.array([x["dense_acc"] for x in xs]) * 100
        lines.append(f"| `{name}` | {len(xs)} | {acc.mean():.1f} ± {acc.std():.1f} | "
                     f"{best.mean():.1f} | {dacc.mean():.1f} ± {dacc.std():.1f} | {rc:.3f} | "
                     f"{conv:.3f} | {allm:.3f} | {hashf:.3f} | "
                     f"{t.mean():.0f} ± {t.std():.0f} | {base_t / t.mean():.2f}x |")
    text = "\n".join(lines) + "\n"
    (out / "summary_reuse.md").write_text(text)
    print(text)
    _figure(rows, out / "figures" / "reuse_tradeoff.png")


def _dense_eval(run_dir):
    """Test accuracy of a run's final weights with every layer dense (no reuse)."""
    import fixedsim.data as data
    import fixedsim.nn as nn
    from fixedsim.nn.train import _load_checkpoint, _Scaler, evaluate, load_run

    config, policy = load_run(run_dir)
    ds = data.load(config.data)
    model = nn.build(config.model, seed=config.seed, in_shape=ds.x_train.shape[1:],
                     classes=len(ds.classes), **config.model_options)
    _load_checkpoint(run_dir, model, config.make_optimizer(model.named_parameters()),
                     _Scaler(policy.loss_scale))
    x, y = ds.x_test[:config.test_size], ds.y_test[:config.test_size]
    return evaluate(model, policy, x, y, seed=config.seed, epoch=config.epochs - 1,
                    batch_size=config.eval_batch_size)[1]


def _figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (name, acc, t, conv, _, _) in enumerate(rows):
        kw = dict(color=f"C{i}", label=name if len(name) < 40 else name[:37] + "...")
        a1.errorbar(conv, acc.mean(), yerr=acc.std(), fmt="o", capsize=3, **kw)
        a2.errorbar(t.mean(), acc.mean(), xerr=t.std(), yerr=acc.std(), fmt="o", capsize=3,
                    **kw)
    a1.set_xscale("log")
    a1.set_xlabel("conv-layer MACs performed / dense (forward + backward)")
    a1.set_ylabel("final test accuracy (%)")
    a2.set_xlabel("wall time of the run (s)")
    a2.set_ylabel("final test accuracy (%)")
    a2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)


if __name__ == "__main__":
    main()
