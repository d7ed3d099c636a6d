"""The prediction against native runs: the same network in PyTorch, timed layer by layer.

:func:`measure` builds the PyTorch twin of a :class:`fixedsim.nn.Sequential` (same layers,
same shapes), and times, for each layer, its forward pass, its input gradient and its weight
gradient separately (``torch.autograd.grad`` asked for the one gradient), the loss, the
optimizer step, and a whole training epoch of ``images`` images. The dtype follows the
policy: ``float32``; ``bf16``/``fp16`` run under ``torch.autocast`` (FP32 master weights,
products and activations in the low format, as the policies say). :func:`validate` sets these
times beside :func:`fixedsim.cost.predict`'s rows. With one PyTorch thread the times are the
process's CPU time (what the work costs when it has the core, whatever else the machine
runs); with more, wall time.

PyTorch is optional (``pip install torch``, the ``bench`` extra); without it, validation says
so and stops.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

from .model import Prediction, predict

__all__ = ["measure", "validate", "Validation", "native_dtype", "NATIVE_POLICIES"]

#: Policies a native PyTorch run can stand for, and how it runs them.
NATIVE_POLICIES = {"float32": ("float32", None), "fp32": ("float32", None),
                   "bf16": ("float32", "bfloat16"), "fp16": ("float32", "float16"),
                   "fp16_mixed": ("float32", "float16")}


def native_dtype(policy_name: str):
    """``(parameter dtype, autocast dtype or None)`` of the native run standing for a policy,
    or ValueError saying which policies have one."""
    key = policy_name.lower()
    if key not in NATIVE_POLICIES:
        raise ValueError(f"validate: no native PyTorch run stands for policy {policy_name!r} "
                         f"(fixed point and FP8 have no PyTorch CPU training kernels); "
                         f"validate float32, bf16 or fp16")
    return NATIVE_POLICIES[key]


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("validate needs PyTorch (pip install torch --index-url "
                          "https://download.pytorch.org/whl/cpu); the prediction alone is "
                          "`fixedsim cost predict`", name="torch") from None
    return torch


def _twin(model, torch):
    """The PyTorch layers of a fixedsim Sequential, with its weights."""
    from ..nn import layers as L

    nn = torch.nn
    out = []
    for layer in model.layers:
        if isinstance(layer, L.Conv2d):
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                          stride=layer.stride, padding=layer.padding,
                          bias=layer.bias is not None)
            with torch.no_grad():
                m.weight.copy_(torch.as_tensor(layer.weight.value))
        elif isinstance(layer, L.Linear):
            m = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                m.weight.copy_(torch.as_tensor(layer.weight.value).T)
        elif isinstance(layer, L.ReLU):
            m = nn.ReLU()
        elif isinstance(layer, L.MaxPool2d):
            m = nn.MaxPool2d(layer.kernel_size, layer.stride)
        elif isinstance(layer, L.AvgPool2d):
            m = nn.AvgPool2d(layer.kernel_size, layer.stride)
        elif isinstance(layer, L.Flatten):
            m = nn.Flatten()
        elif isinstance(layer, L.Dropout):
            m = nn.Dropout(layer.p)
        elif isinstance(layer, L.BatchNorm2d):
            m = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        else:
            raise ValueError(f"validate: no PyTorch twin for layer {layer.name} "
                             f"({type(layer).__name__})")
        out.append((layer.name, m))
    return out


#: The clock of the measurements: wall time, or with one thread the process's CPU time, which
#: leaves out the time other processes of a shared machine hold the core (set by measure()).
_clock = time.perf_counter


def _time(fn, reps: int, min_round: float = 0.01) -> float:
    """Seconds per call of ``fn``: the least over ``reps`` rounds, each as many calls as
    take ``min_round`` seconds, after a warm-up call. The least, not the median: on a shared
    machine the other processes only ever add time."""
    fn()
    t0 = _clock()
    fn()
    one = max(_clock() - t0, 1e-7)
    inner = max(1, min(1000, int(min_round / one)))
    best = math.inf
    for _ in range(reps):
        t0 = _clock()
        for _ in range(inner):
            fn()
        best = min(best, (_clock() - t0) / inner)
    return best


def measure(model, policy_name: str, batch: int, in_shape, *, images: int = 0,
            test_images: int = 0, eval_batch: int = 1000, reps: int = 5, classes: int = 10,
            momentum: float = 0.9, threads: int | None = None) -> dict:
    """Native seconds per step: ``{(phase, layer, product): s}`` and the epoch.

    Returns
    -------
    dict
        ``"rows"``: seconds of one step (``train``) or one evaluation batch (``eval``) per
        (phase, layer, product); ``"epoch_s"``: the measured time of a training epoch of
        ``images`` images (and the evaluation of ``test_images``), the least of ``reps``
        epochs, or None when ``images`` is 0; ``"device"``, ``"torch"``, ``"threads"``.
    """
    global _clock
    torch = _torch()
    if threads is not None:
        torch.set_num_threads(threads)
    _clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    pdt, adt = native_dtype(policy_name)
    cast = getattr(torch, adt) if adt else None
    twin = _twin(model, torch)
    first = model.first_trained  # no input gradient there and before (as Sequential.backward)
    gen = torch.Generator().manual_seed(0)

    def ctx():
        import contextlib

        return (torch.autocast("cpu", dtype=cast) if cast is not None
                else contextlib.nullcontext())

    def step_rows(n, training):
        rows = {}
        phase = "train" if training else "eval"
        x0 = torch.rand((n, *in_shape), generator=gen)
        rows[(phase, "input", "forward")] = _time(
            lambda: x0.to(cast or torch.float32, copy=True), reps)
        x = x0
        inputs = []
        for i, (name, m) in enumerate(twin):
            m.train(training)
            xi = x.detach().requires_grad_(training and i > first)
            with ctx():
                rows[(phase, name, "forward")] = _time(lambda m=m, xi=xi: m(xi), reps)
                y = m(xi)
            inputs.append((name, m, xi, y, i))
            x = y.detach()
        labels = torch.randint(0, classes, (n,), generator=gen)
        lossf = torch.nn.functional.cross_entropy
        logits = x.float().requires_grad_(training)
        rows[(phase, "loss", "forward")] = _time(lambda: lossf(logits, labels), reps)
        if not training:
            return rows
        loss = lossf(logits, labels)
        rows[(phase, "loss", "grad_input")] = _time(
            lambda: torch.autograd.grad(loss, logits, retain_graph=True), reps)
        for name, m, xi, y, i in inputs:
            g = torch.randn(y.shape, generator=gen).to(y.dtype)
            params = [p for p in m.parameters()]
            if params:
                rows[(phase, name, "grad_weight")] = _time(
                    lambda y=y, g=g, params=params: torch.autograd.grad(
                        y, params, g, retain_graph=True), reps)
            if i > first and y.grad_fn is not None:
                rows[(phase, name, "grad_input")] = _time(
                    lambda y=y, g=g, xi=xi: torch.autograd.grad(y, xi, g, retain_graph=True),
                    reps)
        params = [p for _, m in twin for p in m.parameters()]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.SGD(params, lr=1e-6, momentum=momentum)
        rows[(phase, "optim", "update")] = _time(opt.step, reps)
        for p in params:
            p.grad = None
        return rows

    rows = step_rows(batch, True)
    if images % batch:
        rows_rest = step_rows(images % batch, True)
    else:
        rows_rest = {}
    eval_rows = {}
    if test_images:
        eval_rows = step_rows(min(eval_batch, test_images), False)
    epoch_s = None
    if images:
        epoch_s = _epoch(torch, twin, ctx, batch, images, test_images, eval_batch, in_shape,
                         classes, momentum, gen, reps)
    return {"rows": rows, "rows_rest": rows_rest, "eval_rows": eval_rows, "epoch_s": epoch_s,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": adt or pdt,
            "clock": "process CPU time" if _clock is time.process_time else "wall time"}


def _epoch(torch, twin, ctx, batch, images, test_images, eval_batch, in_shape, classes,
           momentum, gen, reps=5):
    """Time of one native training epoch (and its evaluation), data made beforehand: the
    least of ``reps`` runs (the other processes of a shared machine only add time; the least
    of two moved by 40% from one command to the next, 0.71 to 0.97 s on the LeNet, while the
    sum of the layers' least times stayed within 0.5%)."""
    net = torch.nn.Sequential(*[m for _, m in twin])
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=momentum)
    xs = torch.rand((images, *in_shape), generator=gen)
    ys = torch.randint(0, classes, (images,), generator=gen)
    xt = torch.rand((test_images, *in_shape), generator=gen) if test_images else None
    lossf = torch.nn.functional.cross_entropy

    def one(n0, n1):
        with ctx():
            loss = lossf(net(xs[n0:n1]).float(), ys[n0:n1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch():
        net.train()
        t0 = _clock()
        for s in range(0, images, batch):
            one(s, min(s + batch, images))
        if test_images:
            net.eval()
            with torch.no_grad():
                for s in range(0, test_images, eval_batch):
                    with ctx():
                        lossf(net(xt[s:s + eval_batch]).float(),
                              torch.zeros(min(eval_batch, test_images - s), dtype=torch.long))
        return _clock() - t0

    net.train()
    one(0, min(batch, images))  # warm-up: first calls pick kernels and allocate
    return min(epoch() for _ in range(max(1, reps)))


@dataclasses.dataclass
class Validation:
    """Predicted against measured: per row and per epoch.

    Attributes
    ----------
    prediction : Prediction
    measured : list of float or None
        Measured seconds per row of ``prediction.csv_rows()`` (the epoch row last: the
        measured epoch wall time); None where nothing native corresponds.
    layer_errors : list of float
        ``predicted / measured - 1`` of every row with a measurement and a prediction (the
        input and the optimizer included), not the epoch.
    epoch_error : float or None
    sum_of_rows_s : float
        The measured rows summed over the epoch's steps (what the epoch would take without
        the time between operations).
    info : dict
        PyTorch version, threads, dtype, load average before and after.
    """

    prediction: Prediction
    measured: list
    layer_errors: list
    epoch_error: float | None
    sum_of_rows_s: float
    info: dict

    @property
    def median_layer_error(self) -> float | None:
        errs = [abs(e) for e in self.layer_errors]
        return statistics.median(errs) if errs else None

    def table(self) -> str:
        rows = self.prediction.csv_rows()
        lines = [f"{'phase':5} {'layer':12} {'product':11} {'bound':7} {'predicted':>11} "
                 f"{'measured':>11} {'error':>8}"]
        for r, m in zip(rows, self.measured, strict=True):
            if not (r["macs"] or r["bytes"] or r["launches"]) and m is None:
                continue
            err = "" if m in (None, 0) else f"{r['predicted_s'] / m - 1:+.0%}"
            ms = "-" if m is None else _s(m)
            lines.append(f"{r['phase']:5} {r['layer']:12} {r['product']:11} "
                         f"{r.get('bound', ''):7} {_s(r['predicted_s']):>11} {ms:>11} "
                         f"{err:>8}")
        med = self.median_layer_error
        lines.append(f"median |error| over {len(self.layer_errors)} rows: "
                     + ("-" if med is None else f"{med:.0%}"))
        if self.epoch_error is not None:
            lines.append(f"epoch: predicted {_s(self.prediction.epoch_s)}, measured "
                         f"{_s(self.measured[-1])} ({self.epoch_error:+.0%}); measured rows "
                         f"summed over the epoch: {_s(self.sum_of_rows_s)}")
        return "\n".join(lines)


def _s(v):
    from .model import _fmt_s

    return _fmt_s(v)


def validate(model, policy, machine="this", batch: int = 64, images: int = 4096, *,
             test_images: int = 0, eval_batch: int = 1000, in_shape=None, classes: int = 10,
             reps: int = 7, threads: int | None = None,
             model_options: dict | None = None) -> Validation:
    """Predict an epoch on ``machine`` and measure it natively with PyTorch on this CPU.

    ``policy`` is a name with a native twin (float32, bf16, fp16: :data:`NATIVE_POLICIES`).
    Per-layer rows are timed at the batch size (and the last, smaller batch when ``batch``
    does not divide ``images``) and multiplied by the steps; the epoch is timed whole.
    """
    import os

    from ..nn.policy import Policy
    from .model import resolve_model

    name = policy if isinstance(policy, str) else policy.name
    native_dtype(name)
    pol = Policy.parse(name) if isinstance(policy, str) else policy
    net, shape = resolve_model(model, in_shape, classes, model_options)
    load0 = os.getloadavg()[0]
    if threads is None:
        from .profiles import load_profile

        t = load_profile(machine).measured.get("threads")
        threads = int(t) if isinstance(t, (int, float)) and t >= 1 else None
    pred = predict(net, pol, machine, batch=batch, images=images, test_images=test_images,
                   in_shape=shape, classes=classes, eval_batch=eval_batch)
    meas = measure(net, name, batch, shape, images=images, test_images=test_images,
                   eval_batch=eval_batch, reps=reps, classes=classes, threads=threads)
    full, rest = divmod(images, batch)
    ev_full, ev_rest = divmod(test_images, eval_batch)
    measured, errs, total = [], [], 0.0
    for r in pred.rows:
        key = (r["phase"], r["layer"], r["product"])
        if r["phase"] == "train":
            m = meas["rows"].get(key)
            if m is not None:
                m = m * full + (meas["rows_rest"].get(key, m) if rest else 0.0)
        else:
            m = meas["eval_rows"].get(key)
            if m is not None:  # eval rows timed at one batch size: scaled by the elements
                m = m * (ev_full + (ev_rest / eval_batch if ev_rest else 0.0))
        measured.append(m)
        if m is not None:
            total += m
            if m > 0 and r["predicted_s"] > 0:
                errs.append(r["predicted_s"] / m - 1)
    ep = meas["epoch_s"]
    measured.append(ep)
    info = {"torch": meas["torch"], "threads": meas["threads"], "dtype": meas["dtype"],
            "clock": meas["clock"],
            "load_before": load0, "load_after": os.getloadavg()[0],
            "machine": pred.machine.name}
    return Validation(prediction=pred, measured=measured, layer_errors=errs,
                      epoch_error=None if not ep else pred.epoch_s / ep - 1,
                      sum_of_rows_s=total, info=info)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
