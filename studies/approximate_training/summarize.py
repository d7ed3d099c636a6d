"""Summary of the approximate-training study: accuracy against MACs against wall time, one row
per (model, policy, method).

    python studies/approximate_training/summarize.py [RESULTS_DIR]

RESULTS_DIR (default ``studies/approximate_training/results``) holds one folder per study file
(``fixedsim sweep studies/approximate_training/<name>.toml``). MACs are every matrix product
the run performed (training and the per-epoch evaluations, all layers, from the per-epoch
counters), relative to the dense run of the same model and policy (the ``sampling`` study's
``approx = ""``, or a dense run in the same study file); "approximated products kept" is, over
the products an approximation touched, the MACs it kept against their dense count (sampling:
the forward products and their backward; gradient approximation: the backward products of
the sparsified errors, which the emulation still runs densely, so that only this column shows
their saving; deep reuse: the reused convolutions). The time is the run's training time,
relative to dense. Writes ``RESULTS_DIR/summary.md``.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
KEYS = ("approx", "grad_approx", "rescale", "reuse")


def _runs(root):
    for study in sorted(p for p in root.iterdir() if (p / "results.csv").exists()):
        with open(study / "results.csv", newline="") as f:
            for r in csv.DictReader(f):
                hist = None
                if r["status"] == "ok":
                    with open(study / "runs" / r["run_id"] / "history.csv", newline="") as h:
                        hist = list(csv.DictReader(h))
                yield study.name, r, hist


def main(argv):
    root = pathlib.Path(argv[0]) if argv else HERE / "results"
    rows = []
    for study, r, hist in _runs(root):
        tr = json.loads(r["config"]).get("train", {})
        method = "; ".join(f"{k} {tr[k]}" for k in KEYS if tr.get(k)) or "dense"
        macs = sum(float(h["macs"]) for h in hist) if hist else None
        kept = None
        for pre in ("approx", "reuse"):
            num = sum(float(h.get(f"{pre}.macs") or 0) + float(h.get(f"{pre}.backward_macs") or 0)
                      for h in hist or [])
            den = sum(float(h.get(f"{pre}.dense_macs") or 0)
                      + float(h.get(f"{pre}.backward_dense_macs") or 0) for h in hist or [])
            if den:
                kept = num / den
        rows.append(dict(model=r["model"], policy=r["policy_name"], method=method, study=study,
                         lr=tr.get("lr"),
                         acc=float(r["final_test_acc"]) if hist else None,
                         best=float(r["best_test_acc"]) if hist else None,
                         macs=macs, kept=kept, sec=float(r["seconds"]) if hist else None,
                         status=r["status"]))
    dense = {}
    for x in rows:  # a dense run of the same study file first, else the sampling study's
        if x["method"] == "dense" and x["acc"]:
            dense[(x["model"], x["policy"], x["study"])] = x
            dense.setdefault((x["model"], x["policy"]), x)
    lines = ["| file | model | policy | lr | method | final test acc | best | MACs vs dense | "
             "approximated products kept | time vs dense |", "|---" * 10 + "|"]
    order = ["sampling", "crs-mixing", "gradient", "rescaling", "reuse", "q16-sampling",
             "q16-backward"]
    rank = {name: i for i, name in enumerate(order)}
    for x in sorted(rows, key=lambda x: (rank.get(x["study"], 99), x["model"], x["policy"],
                                         x["method"] != "dense", x["method"])):
        d = dense.get((x["model"], x["policy"], x["study"])) or dense.get((x["model"],
                                                                            x["policy"]))
        if x["acc"] is None:
            lines.append(f"| {x['study']} | {x['model']} | {x['policy']} | {x['lr']} | "
                         f"{x['method']} | {x['status']} | - | - | - | - |")
            continue
        rel = f"{x['macs'] / d['macs']:.2f}" if d else "-"
        tim = f"{x['sec'] / d['sec']:.2f}" if d else "-"
        kept = "-" if x["kept"] is None else f"{x['kept']:.2f}"
        lines.append(f"| {x['study']} | {x['model']} | {x['policy']} | {x['lr']} | "
                     f"{x['method']} | {x['acc']:.1%} | {x['best']:.1%} | {rel} | {kept} | "
                     f"{tim} |")
    text = "\n".join(lines) + "\n"
    (root / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
