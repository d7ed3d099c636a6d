"""Figures of the large-batch study, from the committed results (summarize.py's rows).

    python studies/large_batch/figures.py [RESULTS_DIR]

RESULTS_DIR (default ``studies/large_batch/results-full``) holds one folder per study file.
Writes into ``RESULTS_DIR/figures/``:

- ``accuracy_vs_batch.png``: the final test accuracy and the train - test gap against the
  batch size, SGD and K-FAC, the LeNet and its BatchNorm variant (the study's base settings:
  no smoothing, mixup, erasing or format variant; K-FAC at 8,192 with damping 0.3, the one
  that trains); each seed a dot, the line through the means of the seeds that did not end
  at chance (those drawn as crosses at their accuracy);
- ``test_acc_vs_epoch.png``: test accuracy after each epoch, one panel per batch size, each
  seed a line (SGD and K-FAC, plain LeNet);
- ``variants_b1024.png``: at batch 1,024 with K-FAC, each seed's final test accuracy under
  each regularizer and number format the study varied, beside the plain seeds.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from summarize import _at_chance, _runs, _setting  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
STYLE = {("sgd", False): ("tab:blue", "o", "-", "SGD"),
         ("kfac", False): ("tab:red", "s", "-", "K-FAC"),
         ("sgd", True): ("tab:cyan", "o", "--", "SGD, BatchNorm"),
         ("kfac", True): ("tab:orange", "s", "--", "K-FAC, BatchNorm")}


def _base(name):
    """``(optimizer, batchnorm)`` of a base setting's name, else None (K-FAC at 8,192: the
    setting with damping 0.3, the one that trains)."""
    batch, opt, *parts = name.split(", ")
    if opt == "kfac" and batch == "batch 8192" and "damping 0.3" not in parts:
        return None
    rest = [p for p in parts if p not in ("BatchNorm", "damping 0.3")]
    return None if rest else (opt, "BatchNorm" in parts)


def _groups(root):
    out = {}
    for study, r, hist in _runs(root):
        if hist is None:
            continue
        b, name, _ = _setting(study, r)
        out.setdefault((b, name), []).append((r, hist, _at_chance(hist)))
    return out


def accuracy_vs_batch(groups, plt, path):
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (opt, bn), (color, marker, ls, label) in STYLE.items():
        xs, means, gaps = [], [], []
        for (b, name), runs in sorted(groups.items()):
            if _base(name) != (opt, bn):
                continue
            ok = [(r, h) for r, h, chance in runs if not chance]
            for r, _, chance in runs:
                acc = 61.0 if chance else 100 * float(r["final_test_acc"])
                ax.plot(b * (1.06 if opt == "kfac" else 0.94), acc, "x" if chance else marker,
                        color=color, ms=5, alpha=0.6, mfc="none" if bn else color)
            if ok:
                xs.append(b)
                means.append(100 * np.mean([float(r["final_test_acc"]) for r, _ in ok]))
                gaps.append(100 * np.mean([float(r["final_train_acc"])
                                           - float(r["final_test_acc"]) for r, _ in ok]))
        if xs:
            ax.plot(xs, means, ls, color=color, label=label)
            gx.plot(xs, gaps, ls, color=color, marker=marker, label=label,
                    mfc="none" if bn else color)
    for a, ylabel in ((ax, "final test accuracy (%)"), (gx, "train - test accuracy (points)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("batch size")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
    ax.set_ylim(60, 93)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("LeNet, Fashion-MNIST, 8 epochs (dots: seeds; x at the bottom: a seed that "
                 "ended at chance)", fontsize=9)
    gx.set_title("generalization gap (means of the seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def test_acc_vs_epoch(groups, plt, path):
    batches = sorted({b for b, name in groups if _base(name) == ("sgd", False)})
    fig, axes = plt.subplots(1, len(batches), figsize=(3.2 * len(batches), 3.4), sharey=True)
    for ax, b in zip(np.atleast_1d(axes), batches, strict=True):
        for (bb, name), runs in groups.items():
            base = _base(name)
            if bb != b or base is None or base[1]:
                continue
            color, _, _, label = STYLE[base]
            for i, (_, hist, _) in enumerate(runs):
                ax.plot([int(h["epoch"]) for h in hist],
                        [100 * float(h["test_acc"]) for h in hist], color=color, lw=1,
                        alpha=0.8, label=label if i == 0 else None)
        steps = int(next(h for (bb, _), rs in groups.items() if bb == b
                         for _, h, _ in rs)[0]["steps"])
        ax.set_title(f"batch {b} ({steps} steps an epoch)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(60, 93)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (%)")
    np.atleast_1d(axes)[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def variants_b1024(groups, plt, path):
    rows = sorted((name for b, name in groups if b == 1024 and name.split(", ")[1] == "kfac"),
                  key=lambda n: (n != "batch 1024, kfac", n))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.2))
    plain = [100 * float(r["final_test_acc"]) for r, _, _ in groups[(1024, rows[0])]]
    ax.axvspan(min(plain), max(plain), color="tab:red", alpha=0.12,
               label="plain K-FAC seeds' range")
    for i, name in enumerate(rows):
        accs = [100 * float(r["final_test_acc"]) for r, _, _ in groups[(1024, name)]]
        ax.plot(accs, [i] * len(accs), "o", color="tab:red")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n.removeprefix("batch 1024, kfac").strip(", ") or "plain"
                        for n in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final test accuracy (%), each seed")
    ax.set_title("K-FAC at batch 1,024: regularizers and number formats", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = pathlib.Path(argv[0]) if argv else HERE / "results-full"
    out = root / "figures"
    out.mkdir(exist_ok=True)
    groups = _groups(root)
    accuracy_vs_batch(groups, plt, out / "accuracy_vs_batch.png")
    test_acc_vs_epoch(groups, plt, out / "test_acc_vs_epoch.png")
    variants_b1024(groups, plt, out / "variants_b1024.png")
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))


if __name__ == "__main__":
    main(sys.argv[1:])
