"""Summary of the large-batch study: one row per setting (batch, optimizer, smoothing, mixup,
random erasing, curvature or all-reduce format), mean and spread over its replicates.

    python studies/large_batch/summarize.py [RESULTS_DIR]

RESULTS_DIR (default ``studies/large_batch/results``) holds one folder per study file
(``fixedsim sweep studies/large_batch/<name>.toml``). Columns: final and best test accuracy
(mean ± standard deviation over the replicates, n of them), the epochs and optimizer steps to
reach 80% and 85% test accuracy (the first epoch whose evaluation reaches it; "-" never), each
replicate's final test accuracy in replicate order (those at chance included, marked *), the
generalization gap (final train minus final test accuracy) and the wall time per run.
A run whose test accuracy ended at chance (``summary_warnings``: it stayed there or fell to
it, as a divergence under ``max_loss`` does) is left out of the means and counted beside n
("+1 at chance"), as a failed run is. Writes ``RESULTS_DIR/summary.md``.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import numpy as np

from fixedsim.nn.train import summary_warnings

HERE = pathlib.Path(__file__).resolve().parent
TARGETS = (0.80, 0.85)
CLASSES = 10  # Fashion-MNIST


def _runs(root):
    for study in sorted(p for p in root.iterdir() if (p / "results.csv").exists()):
        with open(study / "results.csv", newline="") as f:
            for r in csv.DictReader(f):
                if r["status"] != "ok":
                    yield study.name, r, None
                    continue
                with open(study / "runs" / r["run_id"] / "history.csv", newline="") as h:
                    yield study.name, r, list(csv.DictReader(h))


def _setting(study, r):
    cfg = json.loads(r["config"])
    tr = cfg.get("train", cfg)
    b = tr.get("batch_size")
    opt = tr.get("optimizer")
    bits = [f"batch {b}", opt]
    if (tr.get("model_options") or {}).get("batchnorm"):
        bits.append("BatchNorm")
    if opt == "kfac" and float(tr.get("damping", 0.1)) != 0.1:  # 0.1: the study's usual
        bits.append(f"damping {tr['damping']}")
    if float(tr.get("smoothing_sigma") or 0):
        bits.append(f"smoothing {tr['smoothing_sigma']}")
    if float(tr.get("mixup") or 0):
        bits.append(f"mixup {tr['mixup']}")
    if float(tr.get("random_erasing") or 0):
        bits.append(f"random erasing {tr['random_erasing']}")
    if float(tr.get("weight_norm_cap") or 0):
        bits.append(f"weight-norm cap {tr['weight_norm_cap']}")
    cur = cfg.get("policy", {}).get("curvature")
    if cur:
        bits.append(f"curvature {cur['format']}")
    if tr.get("allreduce"):
        bits.append(f"{tr.get('workers')} workers, all-reduce {tr['allreduce']}")
    return int(b), ", ".join(bits), float(tr.get("lr"))


def _reach(hist, target, steps_per_epoch):
    for row in hist:
        if float(row["test_acc"]) >= target:
            e = int(row["epoch"])
            return e, e * steps_per_epoch
    return None


def _at_chance(hist):
    """The run's test accuracy ended at chance (it never left it, or fell back to it)."""
    return any(w.startswith(("test accuracy stayed at chance", "test accuracy fell to chance"))
               for w in summary_warnings(hist, CLASSES))


def main(argv):
    root = pathlib.Path(argv[0]) if argv else HERE / "results"
    groups = {}
    for study, r, hist in _runs(root):
        b, name, lr = _setting(study, r)
        groups.setdefault((b, name, lr), {"lr": lr, "runs": []})["runs"].append((r, hist))
    lines = ["| setting | lr | n | final test acc | best | train - test | "
             + " | ".join(f"epochs (steps) to {t:.0%}" for t in TARGETS)
             + " | each seed | s/run |",
             "|---|---|---|---|---|---|" + "---|" * len(TARGETS) + "---|---|"]
    for (_b, name, _lr), g in sorted(groups.items()):
        done = [(r, h, _at_chance(h)) for r, h in g["runs"] if h]
        ok = [(r, h) for r, h, chanced in done if not chanced]
        aside = (f"{len(g['runs']) - len(done)} failed" if len(done) < len(g["runs"]) else "",
                 f"{len(done) - len(ok)} at chance" if len(ok) < len(done) else "")
        aside = ", ".join(a for a in aside if a)
        seeds = ", ".join(f"{100 * float(r['final_test_acc']):.2f}" + ("*" if chanced else "")
                          for r, _, chanced in sorted(done, key=lambda d: int(d[0]["replicate"])))
        if not ok:
            lines.append(f"| {name} | {g['lr']} | 0 ({aside}) | - | - | - |"
                         + " - |" * len(TARGETS) + f" {seeds or '-'} | - |")
            continue
        fin = np.array([float(r["final_test_acc"]) for r, _ in ok])
        best = np.array([float(r["best_test_acc"]) for r, _ in ok])
        gap = np.array([float(r["final_train_acc"]) - float(r["final_test_acc"]) for r, _ in ok])
        spe = int(ok[0][1][0]["steps"])  # optimizer steps per epoch
        reach = []
        for t in TARGETS:
            hits = [_reach(h, t, spe) for _, h in ok]
            got = [x for x in hits if x]
            reach.append("-" if not got else
                         f"{np.mean([x[0] for x in got]):.1f} ({np.mean([x[1] for x in got]):.0f})"
                         + ("" if len(got) == len(hits) else f" [{len(got)}/{len(hits)}]"))
        sec = np.mean([float(r["seconds"]) for r, _ in ok])
        sd = f" ± {fin.std(ddof=1):.1%}" if fin.size > 1 else ""
        lines.append(f"| {name} | {g['lr']} | {fin.size}{f' (+{aside})' if aside else ''}"
                     f" | {fin.mean():.1%}{sd} | {best.mean():.1%} | {gap.mean():+.1%} | "
                     + " | ".join(reach) + f" | {seeds} | {sec:.0f} |")
    text = "\n".join(lines) + "\n"
    (root / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
