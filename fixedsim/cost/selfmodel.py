"""fixedsim as the machine: its own time for a policy, from its layers' measured cost per unit
of counted work.

The counts of :mod:`fixedsim.cost.counts` give, for every layer and pass, the work fixedsim
does: ``w = MACs + roundings`` (every product's MACs and every rounding of its stages and
roles). :func:`measure` runs two training steps and an evaluation batch of the model at two
small batch sizes, reads the seconds each layer's forward and backward pass took
(:class:`fixedsim.nn.LayerCounters` records them) and the optimizer's, and fits per layer and
pass

    t = t0 + s * w

(``s``: seconds per counted MAC and rounding of that layer's kernels; ``t0``: its calls).
:func:`predict_self` sums ``t`` over an epoch's steps at any batch size and image count.
Measuring compiles the policy's kernels, which the run would do anyway.

``fixedsim train`` prints the expected epoch before it starts, and ``fixedsim sweep
--dry-run`` each run's and the sweep's (docs/cost.md).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .counts import count_epoch, count_step

__all__ = ["SelfProfile", "measure", "predict_self", "expect_run"]

_PASS = {"forward": "forward", "grad_input": "backward", "grad_weight": "backward",
         "update": "update"}


@dataclasses.dataclass
class SelfProfile:
    """fixedsim's measured cost on this machine, per (phase, layer, pass).

    Attributes
    ----------
    fits : dict of (str, str, str) to (float, float)
        ``(t0, s)``: seconds per call and per unit of counted work (MACs + roundings) of the
        layer's ``forward``, ``backward`` or the optimizer's ``update``, in ``train`` or
        ``eval`` steps.
    batches : tuple of int
        The batch sizes measured.
    """

    fits: dict
    batches: tuple


def _work(step):
    """{(phase, layer, pass): MACs + roundings} of a step's rows (not of the rows where
    nothing runs: the backward pass of a layer before the first with parameters)."""
    phase = "train" if step.training else "eval"
    out = {}
    for r in step.rows:
        w = r.macs + sum(r.roundings.values()) + r.elementwise
        if w or r.launches:
            key = (phase, r.layer, _PASS[r.product])
            out[key] = out.get(key, 0) + w
    return out


def _timed_step(model, policy, x, y, training, optimizer, momentum, step):
    from ..nn.core import Context
    from ..nn.layers import SoftmaxCrossEntropy
    from ..nn.optim import SGD, Adam

    ctx = Context(policy, seed=0, step=step, training=training, phase=0 if training else 1)
    lossf = SoftmaxCrossEntropy()
    t0 = time.perf_counter()
    x = ctx.round("activations", x, "input")
    times = {("input", "forward"): time.perf_counter() - t0}
    for layer in model.layers:
        t0 = time.perf_counter()
        x = layer.forward(x, ctx)
        times[(layer.name, "forward")] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lossf(x, y, ctx)
    times[("loss", "forward")] = time.perf_counter() - t0
    if not training:
        return times
    t0 = time.perf_counter()
    g = lossf.backward(ctx, 1.0)
    times[("loss", "backward")] = time.perf_counter() - t0
    first = model.first_trained  # where Sequential.backward stops
    for i in range(len(model.layers) - 1, first - 1, -1):
        layer = model.layers[i]
        t0 = time.perf_counter()
        g = layer.backward(g, ctx, need_input_grad=i > first)
        times[(layer.name, "backward")] = time.perf_counter() - t0
    params = model.named_parameters()
    opt = (Adam(params, lr=0.0) if optimizer == "adam"
           else SGD(params, lr=0.0, momentum=momentum))
    t0 = time.perf_counter()
    opt.step(ctx)
    times[("optim", "update")] = time.perf_counter() - t0
    return times


def measure(policy, model=None, in_shape=None, batches=(8, 32), *, optimizer: str = "sgd",
            momentum: float = 0.9, classes: int = 10, reps: int = 3,
            blas_threads: int | None = 1) -> SelfProfile:
    """Time fixedsim's layers for ``policy`` at two batch sizes and fit ``t = t0 + s * w``
    per layer and pass (the least of ``reps`` timed steps after a warm-up step).

    The model's parameters are first rounded into the policy's ``weights`` role, and BLAS is
    limited to ``blas_threads`` threads (None: unchanged), as :func:`fixedsim.nn.train.train`
    runs (one thread by default): unrounded weights can take slower kernels, and a
    multi-threaded BLAS on cores that other work holds made a step up to 100 times slower.
    """
    from ..nn.train import blas_limit

    with blas_limit(blas_threads):
        return _measure(policy, model, in_shape, batches, optimizer, momentum, classes, reps)


def _measure(policy, model, in_shape, batches, optimizer, momentum, classes, reps):
    from ..nn.models import lenet
    from ..nn.train import _init_weights

    model = model if model is not None else lenet()
    if in_shape is None:
        in_shape = (1, 28, 28)
    params = model.named_parameters()
    saved = {name: p.value for name, p in params.items()}
    _init_weights(model, policy, 0)  # off the format's grid, products take other kernels
    try:
        obs = _observe(model, policy, in_shape, batches, optimizer, momentum, classes, reps)
    finally:
        for name, p in params.items():  # the caller's model as it was given
            p.value = saved[name]
    fits = {}
    for key, pts in obs.items():
        (w0, t0), (w1, t1) = pts[0], pts[-1]
        if w1 == w0:  # work that does not grow with the batch (the optimizer): a constant
            fits[key] = (min(t0, t1), 0.0)
            continue
        s = max((t1 - t0) / (w1 - w0), 0.0)
        fits[key] = (max(t0 - s * w0, 0.0), s)
    return SelfProfile(fits=fits, batches=tuple(batches))


def _observe(model, policy, in_shape, batches, optimizer, momentum, classes, reps):
    """{(phase, layer, pass): [(work, least seconds) per batch size]}."""
    rng = np.random.default_rng(0)
    obs: dict = {}
    for b in batches:
        x = rng.uniform(0, 1, (b, *in_shape)).astype(np.float32)
        y = rng.integers(0, classes, b)
        for training in (True, False):
            step = count_step(model, policy, b, in_shape, optimizer=optimizer,
                              momentum=momentum, training=training)
            work = _work(step)
            phase = "train" if training else "eval"
            best: dict = {}
            for k in range(reps + 1):  # the first compiles and warms
                t = _timed_step(model, policy, x, y, training, optimizer, momentum, k)
                if k:
                    for key, v in t.items():
                        best[key] = min(best.get(key, np.inf), v)
            for (layer, pss), v in best.items():
                key = (phase, layer, pss)
                obs.setdefault(key, []).append((work.get(key, 0), v))
    return obs


def predict_self(model, policy, batch: int, images: int, in_shape=None, *,
                 test_images: int = 0, eval_batch: int = 1000, optimizer: str = "sgd",
                 momentum: float = 0.9, profile: SelfProfile | None = None) -> dict:
    """fixedsim's expected seconds for one training epoch: ``{"epoch_s", "train_s",
    "eval_s", "rows": {(phase, layer, pass): s}}``."""
    prof = profile or measure(policy, model, in_shape, optimizer=optimizer, momentum=momentum)
    steps = count_epoch(model, policy, batch, images, in_shape, test_images=test_images,
                        eval_batch=eval_batch, optimizer=optimizer, momentum=momentum)
    rows, train_s, eval_s = {}, 0.0, 0.0
    for step, times in steps:
        for key, w in _work(step).items():
            t0, s = prof.fits.get(key, (0.0, 0.0))
            t = (t0 + s * w) * times
            rows[key] = rows.get(key, 0.0) + t
            if step.training:
                train_s += t
            else:
                eval_s += t
    return {"epoch_s": train_s + eval_s, "train_s": train_s, "eval_s": eval_s, "rows": rows}


def expect_run(config, policy, data=None, *, epochs: int | None = None,
               cache: dict | None = None, notice=None) -> dict:
    """fixedsim's expected time for the run ``config`` (a :class:`~fixedsim.nn.TrainConfig`)
    under ``policy`` on this machine, from :func:`measure` and :func:`predict_self`.

    Parameters
    ----------
    config : TrainConfig
    policy : Policy
    data : Dataset, optional
        The run's data set (default: ``fixedsim.data.load(config.data)``); only its shapes,
        sizes and classes are read.
    epochs : int, optional
        The epochs to expect (default ``config.epochs``; a resumed run: those left).
    cache : dict, optional
        Measured profiles by model, input shape, policy and optimizer: runs that share them
        are measured once (a sweep passes one dict for all its runs).
    notice : str or callable, optional
        Printed (or called) when measuring starts compiling a kernel
        (:class:`~fixedsim.compiling.CompileWatch`): on an empty cache the measurement is
        where a command's first compile pause falls.

    The layers are measured at the run's batch size ``B`` and at ``B // 4`` (least of two
    timed steps each, after a warm-up step): a training step's time is then read, not
    extrapolated; the evaluation's larger batches are extrapolated by the fit.

    Returns
    -------
    dict
        ``epoch_s`` (one epoch: its training steps and its evaluation), ``run_s``
        (``epochs`` of them; neither counts compiling), ``measure_s`` (the seconds this call
        spent measuring, 0 for a cached profile) and ``compile_s`` (of them, compiling
        kernels: work the run itself would otherwise do first).
    """
    import json

    from ..compiling import CompileWatch
    from ..data import load
    from ..nn.models import build

    ds = data if data is not None else load(config.data)
    images = len(ds.x_train) if config.train_size is None else min(config.train_size,
                                                                     len(ds.x_train))
    tests = len(ds.x_test) if config.test_size is None else min(config.test_size,
                                                                len(ds.x_test))
    in_shape = tuple(ds.x_train.shape[1:])
    model = build(config.model, seed=0, in_shape=in_shape, classes=len(ds.classes),
                  **config.model_options)
    key = (config.model, json.dumps(config.model_options, sort_keys=True), in_shape,
           len(ds.classes), json.dumps(policy.to_dict(), sort_keys=True), config.optimizer,
           config.momentum, config.batch_size)
    cache = {} if cache is None else cache
    measure_s = compile_s = 0.0
    if key not in cache:
        t0 = time.perf_counter()
        with CompileWatch(notice=notice) as watch:
            cache[key] = measure(policy, model, in_shape, _batches(config.batch_size),
                                 optimizer=config.optimizer, momentum=config.momentum,
                                 classes=len(ds.classes), reps=2)
        measure_s, compile_s = time.perf_counter() - t0, watch.seconds
    p = predict_self(model, policy, config.batch_size, images, in_shape, test_images=tests,
                     eval_batch=config.eval_batch_size, optimizer=config.optimizer,
                     momentum=config.momentum, profile=cache[key])
    n = config.epochs if epochs is None else epochs
    return {"epoch_s": p["epoch_s"], "run_s": n * p["epoch_s"], "measure_s": measure_s,
            "compile_s": compile_s}


def _batches(batch: int) -> tuple:
    """The two batch sizes :func:`expect_run` measures: the run's and a quarter of it."""
    return (max(1, batch // 4), batch) if batch > 1 else (1, 2)

