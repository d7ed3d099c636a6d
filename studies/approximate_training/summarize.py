"""Summary of the approximate-training study: accuracy against MACs against wall time, one row
per (study file, model, policy, method), mean ± standard deviation over its replicates (and
each replicate's final accuracy).

    python studies/approximate_training/summarize.py [RESULTS_DIR]

RESULTS_DIR (default ``studies/approximate_training/results``) holds one folder per study file
(``fixedsim sweep studies/approximate_training/<name>.toml``). MACs are every matrix product
the run performed (training and the per-epoch evaluations, all layers, from the per-epoch
counters), relative to the dense run of the same network and recipe: the same model and model
options, policy, learning rate, training-set size, epochs and batch (a dense run in the same
study file first, else one in another file; replicate r against dense replicate r where there
is one, else against the dense replicates' mean). "approximated products kept" is, over the
products an approximation touched, the MACs it kept against their dense count (sampling: the
forward products and their backward; gradient approximation: the backward products of the
sparsified errors, which the emulation still runs densely, so that only this column shows
their saving; deep reuse: the reused convolutions). The time is the run's training time,
relative to dense. Writes ``RESULTS_DIR/summary.md``.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
KEYS = ("approx", "grad_approx", "rescale", "reuse")
ORDER = ["full-sampling", "full-mlp", "full-gradient", "full-fixed", "full-fixed-ratios",
         "full-fixed-gradient", "full-rescaling", "full-reuse", "sampling", "crs-mixing",
         "gradient", "rescaling", "reuse", "q16-sampling", "q16-backward"]


def _runs(root):
    for study in sorted(p for p in root.iterdir() if (p / "results.csv").exists()):
        with open(study / "results.csv", newline="") as f:
            for r in csv.DictReader(f):
                hist = None
                if r["status"] == "ok":
                    with open(study / "runs" / r["run_id"] / "history.csv", newline="") as h:
                        hist = list(csv.DictReader(h))
                yield study.name, r, hist


def _kept(hist):
    kept = None
    for pre in ("approx", "reuse"):
        num = sum(float(h.get(f"{pre}.macs") or 0) + float(h.get(f"{pre}.backward_macs") or 0)
                  for h in hist)
        den = sum(float(h.get(f"{pre}.dense_macs") or 0)
                  + float(h.get(f"{pre}.backward_dense_macs") or 0) for h in hist)
        if den:
            kept = num / den
    return kept


def _run(study, r, hist):
    tr = json.loads(r["config"]).get("train", {})
    method = "; ".join(f"{k} {tr[k]}" for k in KEYS if tr.get(k)) or "dense"
    recipe = (r["model"], json.dumps(tr.get("model_options") or {}, sort_keys=True),
              r["policy_name"], tr.get("lr"), tr.get("train_size"), tr.get("epochs"),
              tr.get("batch_size"))
    ok = hist is not None
    return dict(study=study, recipe=recipe, method=method, replicate=int(r["replicate"]),
                model=r["model"], policy=r["policy_name"], lr=tr.get("lr"),
                size=tr.get("train_size"), status=r["status"],
                acc=float(r["final_test_acc"]) if ok else None,
                best=float(r["best_test_acc"]) if ok else None,
                macs=sum(float(h["macs"]) for h in hist) if ok else None,
                kept=_kept(hist) if ok else None,
                sec=float(r["seconds"]) if ok else None)


def _dense_for(x, dense):
    """The dense runs that ``x`` is measured against: same recipe, same study file first."""
    same = [d for d in dense if d["recipe"] == x["recipe"]]
    own = [d for d in same if d["study"] == x["study"]]
    return own or [d for d in same if d["study"] == min(d["study"] for d in same)]


def _ratio(x, base, key):
    match = [d for d in base if d["replicate"] == x["replicate"]]
    ref = match[0][key] if match else np.mean([d[key] for d in base])
    return x[key] / ref


def _pm(values, fmt):
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values, ddof=1))}"


def main(argv):
    root = pathlib.Path(argv[0]) if argv else HERE / "results"
    runs = [_run(*t) for t in _runs(root)]
    dense = [x for x in runs if x["method"] == "dense" and x["acc"] is not None]
    groups = {}
    for x in runs:
        groups.setdefault((x["study"], x["model"], x["policy"], x["lr"], x["method"]),
                          []).append(x)
    lines = ["| file | model | policy | lr | training images | method | n | final test acc | "
             "each seed | best | MACs vs dense | approximated products kept | time vs dense |",
             "|---" * 13 + "|"]
    rank = {name: i for i, name in enumerate(ORDER)}
    for key in sorted(groups, key=lambda k: (rank.get(k[0], 99), k[1], k[2], k[3],
                                             k[4] != "dense", k[4])):
        xs = groups[key]
        ok = [x for x in xs if x["acc"] is not None]
        study, model, policy, lr, method = key
        size = xs[0]["size"] or 60000
        n = f"{len(ok)}" + (f" ({len(xs) - len(ok)} failed)" if len(ok) < len(xs) else "")
        head = f"| {study} | {model} | {policy} | {lr} | {size:,} | {method} | {n} |"
        if not ok:
            lines.append(head + " " + " | ".join([xs[0]["status"]] + ["-"] * 5) + " |")
            continue
        base = _dense_for(ok[0], dense)
        macs = _pm([_ratio(x, base, "macs") for x in ok], "{:.2f}") if base else "-"
        tim = _pm([_ratio(x, base, "sec") for x in ok], "{:.2f}") if base else "-"
        kept = _pm([x["kept"] for x in ok if x["kept"] is not None], "{:.2f}")
        seeds = ", ".join(f"{100 * x['acc']:.1f}" for x in sorted(ok, key=lambda x:
                                                                 x["replicate"]))
        lines.append(head + f" {_pm([100 * x['acc'] for x in ok], '{:.1f}')}% | {seeds} | "
                     f"{_pm([100 * x['best'] for x in ok], '{:.1f}')}% | {macs} | {kept} | "
                     f"{tim} |")
    text = "\n".join(lines) + "\n"
    (root / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
