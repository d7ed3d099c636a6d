"""Tables and figures from a sweep's output folder (``fixedsim report DIR``).

A *configuration* is one combination of the sweep's axes other than ``replicate``; tables
give the mean and standard deviation (``ddof=1``) over its replicates that finished ok.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib
import re

from .runner import _DERIVED as _RUN_DERIVED
from .runner import _METRICS as _RUN_METRICS
from .runner import _TAIL as _RUN_TAIL
from .runner import RESULT_COLUMNS, _atomic_write_text, _ordered, load_records
from .spec import StudyError

__all__ = ["report", "Report", "load_results"]

#: Metrics every record has (derived: ``final_test_error = 1 - final_test_acc`` and
#: ``best_test_error``).
METRICS = ("final_test_acc", "best_test_acc", "final_test_error", "best_test_error",
           "final_test_loss", "final_train_acc", "final_train_loss", "seconds",
           "wall_seconds")
_TABLE_METRICS = ("final_test_acc", "best_test_acc", "final_test_loss", "seconds")
#: Columns derived from each run's policy and config that may serve as --x / --hue.
DERIVED = ("policy_name", "model", "data", "replicate", "format", "word_length",
           "frac_length", "rounding")


@dataclasses.dataclass
class Report:
    """What :func:`report` returns.

    Attributes
    ----------
    markdown : str
        The Markdown table (also in ``DIR/report.md``).
    csv : str
        The summary CSV (also in ``DIR/summary.csv``).
    figures : list of pathlib.Path
        Every PNG and PDF written to ``DIR/figures/``.
    rows : list of dict
        One per configuration: its axis values, ``n_runs``, ``n_ok``, ``n_failed`` and
        ``METRIC_mean`` / ``METRIC_std`` of every metric.
    """

    markdown: str
    csv: str
    figures: list
    rows: list


def _num(v):
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and re.fullmatch(r"-?\d+", str(v).strip()) else f


def load_results(out) -> tuple[list, list]:
    """The records of a sweep folder and its axes (without ``replicate``).

    Reads ``OUT/results/*.json`` (the authoritative, atomically written records); a folder
    with only a ``results.csv`` (and ``histories.csv``) is read from those.

    Returns
    -------
    records : list of dict
        Each with ``axes`` (dict), the derived columns, the metrics and ``history``.
    axes : list of str
    """
    out = pathlib.Path(out)
    recs = list(load_records(out).values())
    if not recs and (out / "results.csv").is_file():
        recs = _records_from_csv(out)
    if not recs:
        raise StudyError(f"{out}: no results (neither results/*.json nor results.csv); run "
                         f"`fixedsim sweep STUDY.toml --out {out}` first")
    axes = []
    study_json = out / "study.json"
    if study_json.is_file():
        try:
            axes = [a for a in json.loads(study_json.read_text()).get("axes", {})
                    if a != "replicate"]
        except ValueError:  # pragma: no cover
            axes = []
    for r in recs:
        axes += [a for a in r.get("axes", {}) if a not in axes and a != "replicate"]
        for m in ("final", "best"):
            acc = r.get(f"{m}_test_acc")
            r[f"{m}_test_error"] = None if acc is None else 1.0 - acc
    return _ordered(recs), axes


def _records_from_csv(out: pathlib.Path) -> list:
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    hist: dict = {}
    if (out / "histories.csv").is_file():
        with open(out / "histories.csv", newline="") as f:
            for h in csv.DictReader(f):
                hist.setdefault(h["run_id"], []).append({k: _num(v) for k, v in h.items()})
    # every column results.csv has besides the axes (runner.result_rows writes them)
    fixed = {*RESULT_COLUMNS, *_RUN_DERIVED, *_RUN_METRICS, *_RUN_TAIL, *DERIVED, *METRICS}
    recs = []
    for row in rows:
        rec = {k: _num(v) for k, v in row.items() if k in fixed}
        rec["run_id"], rec["status"] = row["run_id"], row["status"]
        rec["axes"] = {k: _num(v) for k, v in row.items() if k not in fixed}
        if rec.get("replicate") is not None:  # an axis of the run, as its record has it
            rec["axes"]["replicate"] = rec["replicate"]
        rec["history"] = hist.get(row["run_id"], [])
        recs.append(rec)
    return recs


def _value(rec, key):
    if key in rec.get("axes", {}):
        return rec["axes"][key]
    return rec.get(key)


def _mean_std(values):
    vals = [float(v) for v in values if v is not None and not isinstance(v, str)
            and math.isfinite(float(v))]
    if not vals:
        return None, None, 0
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None, len(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var), len(vals)


def _groups(records, keys):
    """Ordered {tuple of values of keys: [records]}."""
    groups: dict = {}
    for r in records:
        groups.setdefault(tuple(_value(r, k) for k in keys), []).append(r)
    return groups


def _is_percent(metric):
    return "acc" in metric or "error" in metric


def _fmt(metric, m, s):
    if m is None:
        return "—"
    if _is_percent(metric):
        txt = f"{100 * m:.2f}" + ("" if s is None else f" ± {100 * s:.2f}")
    else:
        txt = f"{m:.4g}" + ("" if s is None else f" ± {s:.2g}")
    return txt


def _label(keys, values):
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=False)) or "all runs"


def _safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_")


def report(out, *, metric: str = "final_test_acc", x: str | None = None,
           hue: str | None = None, figures: bool = True) -> Report:
    """Write ``report.md``, ``summary.csv`` and ``figures/`` for the sweep in ``out``.

    Parameters
    ----------
    out : path
        A sweep output folder (:func:`run_study`).
    metric : str, default "final_test_acc"
        The metric of the axis figures and the headline column: a record column such as
        ``final_test_acc``, ``best_test_acc``, ``final_test_error``, ``final_test_loss``,
        ``seconds``.
    x : str, optional
        The axis (or derived column: ``frac_length``, ``rounding``, ``model``, ...) on the
        x axis of the metric figure. By default one figure per sweep axis.
    hue : str, optional
        One line per value of this column (the other axes averaged over). By default one
        line per combination of the other axes.
    figures : bool, default True
        Also draw the figures (PNG and PDF in ``out/figures/``).

    Returns
    -------
    Report

    Raises
    ------
    StudyError
        No results in ``out``, or ``metric``, ``x`` or ``hue`` names no column.
    """
    out = pathlib.Path(out)
    records, axes = load_results(out)
    available = sorted({*axes, *DERIVED, *METRICS})
    numeric = set(METRICS) | {k for r in records for k, v in r.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metric not in numeric:
        raise StudyError(f"report: unknown metric {metric!r}; choose one of "
                         f"{', '.join(sorted(set(METRICS) | numeric - {'index', 'pid'}))}")
    for name, v in (("--x", x), ("--hue", hue)):
        if v is not None and v not in available and not any(v in r for r in records):
            raise StudyError(f"report: {name} {v!r} is no column of the results; choose one "
                             f"of {', '.join(available)}")

    metrics = list(_TABLE_METRICS)
    if metric not in metrics:
        metrics.insert(0, metric)
    groups = _groups(records, axes)
    rows = []
    for key, recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        row = dict(zip(axes, key, strict=True))
        row.update(n_runs=len(recs), n_ok=len(ok), n_failed=len(recs) - len(ok))
        for m in dict.fromkeys([*metrics, *METRICS]):
            mean, std, _ = _mean_std(_value(r, m) for r in ok)
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        rows.append(row)

    # Markdown
    head = [*axes, "runs ok"] + [f"{m} (%)" if _is_percent(m) else m for m in metrics]
    lines = [f"# Sweep results: {out}", "",
             f"Mean ± standard deviation over the replicates that finished ok "
             f"({len(records)} runs, {sum(r['n_ok'] for r in rows)} ok).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for row in rows:
        cells = [str(row[a]) for a in axes] + [f"{row['n_ok']}/{row['n_runs']}"]
        cells += [_fmt(m, row[f"{m}_mean"], row[f"{m}_std"]) if row["n_ok"] else "failed"
                  for m in metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    fails = [r for r in records if r.get("status") != "ok"]
    if fails:
        lines += ["", "Failed runs:", ""]
        for r in fails:
            lines.append(f"- `{r['run_id']}` ({_label(axes, [_value(r, a) for a in axes])}): "
                         f"{r.get('error_type')}: {r.get('error')}")
    markdown = "\n".join(lines) + "\n"

    # CSV
    cols = [*axes, "n_runs", "n_ok", "n_failed"]
    for m in dict.fromkeys([*metrics, *METRICS]):
        cols += [f"{m}_mean", f"{m}_std"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    csv_text = buf.getvalue()
    _atomic_write_text(out / "report.md", markdown)
    _atomic_write_text(out / "summary.csv", csv_text)

    written = []
    if figures:
        fig_dir = out / "figures"
        fig_dir.mkdir(exist_ok=True)
        written += _fig_epochs(records, axes, fig_dir)
        written += _fig_frac_bits(records, axes, fig_dir)
        xs = [x] if x is not None else [a for a in axes
                                        if len({_value(r, a) for r in records}) > 1]
        for xa in xs:
            written += _fig_axis(records, axes, xa, hue, metric, fig_dir)
    return Report(markdown=markdown, csv=csv_text, figures=written, rows=rows)


# -- figures ------------------------------------------------------------------------------------
def _figure(**kw):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kw)


def _save(fig, path_stem: pathlib.Path) -> list:
    paths = []
    for ext in ("png", "pdf"):
        p = path_stem.parent / f"{path_stem.name}.{ext}"
        fig.savefig(p, dpi=150 if ext == "png" else None)
        paths.append(p)
    return paths


def _legend(ax, n):
    """A legend inside the axes when it is small, else below them (the figure grows)."""
    if not n:
        return
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) <= 6 and max(map(len, labels), default=0) <= 40:
        ax.legend(fontsize=8, loc="best", frameon=False)
        return
    import textwrap

    labels = [textwrap.fill(lab, 90, subsequent_indent="    ") for lab in labels]
    fig = ax.figure
    w, h = fig.get_size_inches()
    fig.set_size_inches(w, h + 0.14 * sum(lab.count("\n") + 1 for lab in labels) + 0.3)
    fig.legend(handles, labels, loc="outside lower center", fontsize=7, frameon=False)


def _fig_epochs(records, axes, fig_dir) -> list:
    """Test error (%) per epoch, mean over replicates, one line per configuration."""
    groups = _groups([r for r in records if r.get("status") == "ok" and r.get("history")],
                     axes)
    if not groups:
        return []
    fig = _figure(figsize=(6.4, 4.2), constrained_layout=True)
    ax = fig.add_subplot()
    for key, recs in groups.items():
        by_epoch: dict = {}
        for r in recs:
            for h in r["history"]:
                if h.get("test_acc") is not None:
                    by_epoch.setdefault(int(h["epoch"]), []).append(1 - float(h["test_acc"]))
        ep = sorted(by_epoch)
        stats = [_mean_std(by_epoch[e]) for e in ep]
        mean = [100 * s[0] for s in stats]
        ax.plot(ep, mean, "o-", ms=3, label=_label(axes, key))
        lo = [100 * (s[0] - (s[1] or 0)) for s in stats]
        hi = [100 * (s[0] + (s[1] or 0)) for s in stats]
        if any(s[1] for s in stats):
            ax.fill_between(ep, lo, hi, alpha=0.15)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_title("Test error per epoch (mean ± std over replicates)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, len(groups))
    return _save(fig, fig_dir / "test_error_vs_epoch")


def _fig_frac_bits(records, axes, fig_dir) -> list:
    """Final test error vs fractional bits, one line per (rounding, word length); panels per
    combination of the non-policy axes; float policies as horizontal lines."""
    ok = [r for r in records if r.get("status") == "ok"]
    fracs = {r.get("frac_length") for r in ok if r.get("frac_length") is not None}
    if len(fracs) < 2:
        return []
    others = [a for a in axes if a != "policy" and not a.startswith("policy.")]
    panels = _groups(ok, others)
    fig = _figure(figsize=(5.2 * len(panels), 4.0), constrained_layout=True)
    axs = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (pkey, recs) in zip(axs, panels.items(), strict=True):
        fixed = [r for r in recs if r.get("frac_length") is not None]
        wls = {r.get("word_length") for r in fixed}
        lines = _groups(fixed, ["rounding", "word_length"])
        for (rnd, wl), lrecs in lines.items():
            pts = _groups(lrecs, ["frac_length"])
            fl = sorted(k[0] for k in pts)
            st = [_mean_std(1 - r["final_test_acc"] for r in pts[(f,)]) for f in fl]
            label = str(rnd) + (f", WL {wl}" if len(wls) > 1 else "")
            ax.errorbar(fl, [100 * s[0] for s in st], yerr=[100 * (s[1] or 0) for s in st],
                        marker="o", ms=4, capsize=3, label=label)
        floats = _groups([r for r in recs if r.get("frac_length") is None], ["policy_name"])
        for i, ((name,), frecs) in enumerate(floats.items()):
            m, _, _ = _mean_std(1 - r["final_test_acc"] for r in frecs)
            ax.axhline(100 * m, ls="--", lw=1, color=f"C{(len(lines) + i) % 10}",
                       label=str(name))
        ax.set_xlabel("fractional bits (FL)" + (f", word length {next(iter(wls))}"
                                               if len(wls) == 1 else ""))
        ax.set_ylabel("final test error (%)")
        ax.set_xticks(sorted({r["frac_length"] for r in fixed}))
        if others:
            ax.set_title(_label(others, pkey), fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax, len(lines) + len(floats))
    fig.suptitle("Final test error vs fractional bits, per rounding mode", fontsize=10)
    return _save(fig, fig_dir / "final_test_error_vs_frac_length")


def _fig_axis(records, axes, x, hue, metric, fig_dir) -> list:
    ok = [r for r in records if r.get("status") == "ok" and _value(r, metric) is not None]
    if not ok:
        return []
    if hue is not None:
        hue_keys = [hue]
        averaged = [a for a in axes if a not in (x, hue)]
    else:
        hue_keys = [a for a in axes if a != x]
        averaged = []
    xvals = list(dict.fromkeys(_value(r, x) for r in ok))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xvals)
    if numeric:
        xvals.sort()
    pos = {v: (v if numeric else i) for i, v in enumerate(xvals)}
    lines = _groups(ok, hue_keys)
    fig = _figure(figsize=(6.4, 4.2), constrained_layout=True)
    ax = fig.add_subplot()
    pct = _is_percent(metric)
    k = len(lines)
    for j, (hkey, recs) in enumerate(lines.items()):
        pts = _groups(recs, [x])
        xs = [v for v in xvals if (v,) in pts]
        st = [_mean_std(_value(r, metric) for r in pts[(v,)]) for v in xs]
        off = 0 if numeric or k == 1 else (j - (k - 1) / 2) * 0.08
        scale = 100 if pct else 1
        ax.errorbar([pos[v] + off for v in xs], [scale * s[0] for s in st],
                    yerr=[scale * (s[1] or 0) for s in st], marker="o", ms=4, capsize=3,
                    ls="-" if numeric else "none", label=_label(hue_keys, hkey) if hue_keys
                    else None)
    if numeric:
        pos_vals = [v for v in xvals if v > 0]
        if len(pos_vals) == len(xvals) and len(xvals) > 2 and max(xvals) / min(xvals) >= 100:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(xvals)))
        ax.set_xticklabels([str(v) for v in xvals], rotation=20, ha="right", fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(metric + (" (%)" if pct else ""))
    title = f"{metric} vs {x} (mean ± std over replicates"
    title += f"; averaged over {', '.join(averaged)})" if averaged else ")"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    _legend(ax, len(lines) if hue_keys else 0)
    return _save(fig, fig_dir / f"{_safe(metric)}_vs_{_safe(x)}")
