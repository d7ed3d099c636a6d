"""The time model: a roofline per layer and product, summed over an epoch.

For each row of :mod:`fixedsim.cost.counts` (a layer's forward, input-gradient or
weight-gradient pass, in one step) on a machine :class:`~fixedsim.cost.profiles.Profile`::

    compute  = sum over its products of  M N K / (rate[c] * efficiency[c](min(M, N, K)))
               (a convolution's own product: conv_efficiency[c.pass](input channels)
               instead, and a Linear layer's times linear_efficiency[c.pass], when the
               machine's profile has them)
    memory   = bytes read and written / bandwidth   (the cache's when they fit in it; the
               machine's own rate for a kind of layer it measured, ``kind_bandwidth``)
    overhead = native operations launched * per_call (backward_call in backward passes)
    time     = max(compute, memory) + overhead

``c`` is the narrowest native format of the machine that holds the operands' formats
(:func:`~fixedsim.cost.profiles.native_class`); ``M N K`` are the dimensions a native library
multiplies (a convolution's input gradient without the transposed convolution's zeros). The
epoch is the sum over its steps (:func:`~fixedsim.cost.counts.count_epoch`). This is the
layer-wise roofline of Paleo (Qi, Sparks and Talwalkar, ICLR 2017), with the formats of the
policy setting the rates and the bytes. See docs/cost.md for a worked example.
"""

from __future__ import annotations

import csv
import dataclasses
import io

from .counts import count_epoch
from .profiles import NATIVE, ProfileError, load_profile, native_class

__all__ = ["Prediction", "predict", "predict_rows", "resolve_model", "COLUMNS"]

#: The columns of a prediction's CSV, in order.
COLUMNS = ("phase", "layer", "kind", "product", "calls", "launches", "macs", "native_macs",
           "bytes",
           "bytes_read", "bytes_written", "roundings", "elementwise", "operands", "native",
           "compute_s", "memory_s", "overhead_s", "bound", "predicted_s")


def _widest(classes):
    return max(classes, key=NATIVE.index)


def _row_time(row, prof):
    compute, natives, nmacs = 0.0, [], 0
    for i, (M, N, K, _lab, _acc, fa, fb) in enumerate(row.gemm):
        nmacs += M * N * K
        try:
            cls = _widest([native_class(fa, prof.rates), native_class(fb, prof.rates)])
        except ValueError as err:
            raise ProfileError(f"machine {prof.name!r} cannot run layer {row.layer} "
                               f"({row.product}): {err}") from None
        natives.append(cls)
        eff = prof.gemm_efficiency(M, N, K, cls)
        if i == 0 and row.kind == "Conv2d":  # the layer's own product (a bias's follows)
            conv = prof.conv_efficiency_at(row.product, row.channels, cls)
            eff = eff if conv is None else conv
        elif i == 0 and row.kind == "Linear":
            eff *= prof.linear_factor(row.product, cls)
        compute += M * N * K / (prof.rates[cls] * eff)
    nbytes = row.bytes
    memory = nbytes / prof.memory_rate(nbytes, f"{row.kind}.{row.product}") if nbytes else 0.0
    per = prof.per_call_s
    if row.product in ("grad_input", "grad_weight") and prof.backward_call_s is not None:
        per = prof.backward_call_s
    overhead = row.launches * per
    native = ",".join(dict.fromkeys(natives))
    return compute, memory, overhead, native, nmacs


@dataclasses.dataclass
class Prediction:
    """Predicted time per layer and product, and the epoch.

    Attributes
    ----------
    rows : list of dict
        One per (phase, layer, product) with the columns :data:`COLUMNS`; ``phase`` is
        ``train`` (the training steps) or ``eval`` (the test set's forward passes).
    epoch_s : float
        The sum of ``predicted_s``.
    machine : Profile
    meta : dict
        What was predicted: model, policy, batch, images, test images, machine.
    """

    rows: list
    epoch_s: float
    machine: object
    meta: dict

    def csv_rows(self) -> list:
        """The rows, then the ``epoch`` row (sums)."""
        tot = {c: "" for c in COLUMNS}
        tot.update(phase="all", layer="epoch", kind="", product="")
        for c in ("calls", "launches", "macs", "native_macs", "bytes", "bytes_read",
                  "bytes_written",
                  "roundings", "elementwise", "compute_s", "memory_s", "overhead_s",
                  "predicted_s"):
            tot[c] = sum(r[c] for r in self.rows)
        return [*self.rows, tot]

    def to_csv(self, path=None, extra: dict | None = None) -> str:
        """Write (and return) the CSV: one row per layer and product and the ``epoch`` row;
        ``extra`` maps a column name to values per row, epoch row included."""
        rows = self.csv_rows()
        cols = list(COLUMNS) + list(extra or {})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for i, r in enumerate(rows):
            out = {c: r.get(c, "") for c in COLUMNS}
            for k, vals in (extra or {}).items():
                out[k] = vals[i]
            w.writerow(out)
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(text)
        return text

    def table(self) -> str:
        """A readable table of the rows and the epoch."""
        head = (f"{'phase':5} {'layer':12} {'product':11} {'MACs':>13} {'bytes':>12} "
                f"{'native':7} {'bound':7} {'predicted':>11}")
        lines = [head]
        for r in self.rows:
            if not (r["macs"] or r["bytes"] or r["launches"]):
                continue
            lines.append(f"{r['phase']:5} {r['layer']:12} {r['product']:11} {r['macs']:>13,} "
                         f"{r['bytes']:>12,} {r['native'] or '-':7} {r['bound']:7} "
                         f"{_fmt_s(r['predicted_s']):>11}")
        lines.append(f"{'':5} {'epoch':12} {'':11} {sum(r['macs'] for r in self.rows):>13,} "
                     f"{sum(r['bytes'] for r in self.rows):>12,} {'':7} {'':7} "
                     f"{_fmt_s(self.epoch_s):>11}")
        return "\n".join(lines)


def _fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.2f} us"


def predict_rows(steps, machine) -> list:
    """Prediction rows from ``[(StepCounts, repeats), ...]`` on ``machine``, summed per
    (phase, layer, product) in the order of first appearance."""
    prof = load_profile(machine)
    out: dict = {}
    for step, times in steps:
        phase = "train" if step.training else "eval"
        for row in step.rows:
            compute, memory, overhead, native, nmacs = _row_time(row, prof)
            key = (phase, row.layer, row.product)
            d = out.get(key)
            if d is None:
                d = out[key] = {"phase": phase, "layer": row.layer, "kind": row.kind,
                                "product": row.product, "calls": 0, "launches": 0, "macs": 0,
                                "native_macs": 0,
                                "bytes": 0, "bytes_read": 0, "bytes_written": 0,
                                "roundings": 0, "elementwise": 0, "operands": row.operands,
                                "native": native, "compute_s": 0.0, "memory_s": 0.0,
                                "overhead_s": 0.0, "predicted_s": 0.0}
            d["calls"] += row.calls * times
            d["launches"] += row.launches * times
            d["macs"] += row.macs * times
            d["native_macs"] += nmacs * times
            d["bytes"] += row.bytes * times
            d["bytes_read"] += row.bytes_read * times
            d["bytes_written"] += row.bytes_written * times
            d["roundings"] += sum(row.roundings.values()) * times
            d["elementwise"] += row.elementwise * times
            d["compute_s"] += compute * times
            d["memory_s"] += memory * times
            d["overhead_s"] += overhead * times
            d["predicted_s"] += (max(compute, memory) + overhead) * times
    for d in out.values():
        d["bound"] = ("compute" if d["compute_s"] > d["memory_s"] else
                      "memory" if d["memory_s"] > 0 else "overhead" if d["overhead_s"] else "-")
    return list(out.values())


def resolve_model(model, in_shape=None, classes: int = 10, options: dict | None = None):
    """``(Sequential, in_shape)`` from a model name (``lenet``, ``mlp``, ``cifarnet``) or a
    :class:`fixedsim.nn.Sequential`."""
    from ..nn.models import build

    if isinstance(model, str):
        shape = tuple(in_shape) if in_shape is not None else (
            (3, 32, 32) if model == "cifarnet" else (1, 28, 28))
        return build(model, in_shape=shape, classes=classes, **(options or {})), shape
    return model, in_shape


def predict(model, policy, machine, batch: int = 64, images: int = 10_000, *,
            test_images: int = 0, in_shape=None, classes: int = 10, eval_batch: int = 1000,
            optimizer: str = "sgd", momentum: float = 0.9,
            model_options: dict | None = None) -> Prediction:
    """Predicted time of one training epoch of ``model`` under ``policy`` on ``machine``.

    Parameters
    ----------
    model : str or fixedsim.nn.Sequential
        ``"lenet"``, ``"mlp"``, ``"cifarnet"`` (built for ``in_shape`` and ``classes``) or a
        model.
    policy : fixedsim.nn.Policy or str
        A policy or its command-line name (``"fp16"``, ``"fixed:16:14"``, ...).
    machine : str, path or Profile
        A published profile name, ``"this"`` or a profile file (:func:`load_profile`).
    batch, images, test_images, eval_batch, optimizer, momentum
        As :func:`fixedsim.nn.train` runs an epoch: ``ceil(images / batch)`` training steps,
        then the test set in batches of ``eval_batch``.

    Examples
    --------
    >>> import fixedsim as fs
    >>> p = fs.cost.predict("lenet", "fp16", "h100", batch=64, images=60_000)
    >>> [r["native"] for r in p.rows if r["layer"] == "3.conv2d"]
    ['fp16', 'fp16', 'fp16']
    >>> round(p.epoch_s, 4) > 0
    True
    """
    from ..nn.policy import Policy

    if isinstance(policy, str):
        policy = Policy.parse(policy)
    prof = load_profile(machine)
    net, shape = resolve_model(model, in_shape, classes, model_options)
    steps = count_epoch(net, policy, batch, images, shape, test_images=test_images,
                        eval_batch=eval_batch, optimizer=optimizer, momentum=momentum)
    rows = predict_rows(steps, prof)
    meta = {"model": model if isinstance(model, str) else type(model).__name__,
            "policy": policy.name, "batch": batch, "images": images,
            "test_images": test_images, "machine": prof.name}
    return Prediction(rows=rows, epoch_s=sum(r["predicted_s"] for r in rows), machine=prof,
                      meta=meta)
