"""The training loop: mini-batch training under a policy, evaluation, history, checkpoints.

:func:`train` runs a :class:`TrainConfig` under a :class:`~fixedsim.nn.Policy`. Everything
random derives from ``config.seed``: the initial weights (the model's seed), the order of the
training images in each epoch (``SeedSequence([seed, 1, epoch])``) and every stochastic
rounding and dropout mask (``Context`` keys of ``(seed, phase, step, layer, purpose)``). A run
written to a directory keeps a checkpoint of the last finished epoch; :func:`train` with
``resume=True`` continues from it and produces exactly the bits of a run that never stopped.

A non-finite or exploding training loss stops the run with :class:`TrainingDiverged`; the last
good checkpoint and the history up to it stay on disk.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from .. import data as _data
from ..approx import parse_approx, parse_grad_approx
from ..approx.rescale import parse_rescale
from ..reuse.schedules import parse_reuse
from .core import Context, LayerCounters, Parameter, merge_counters
from .erasing import check_probability, erase_batch
from .kfac import KFAC, check_kfac_settings
from .layers import Conv2d, Linear, SoftmaxCrossEntropy
from .mixup import check_alpha, mix_batch
from .models import MODELS, build
from .normcap import cap_weight_norms, check_cap
from .optim import SGD, Adam, parse_schedule, spans_run
from .parallel import data_parallel_pass, parse_allreduce
from .policy import Policy, _build, _check_keys
from .smoothing import check_sigma, perturb_weights, restore_weights

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "RunFolderError", "train",
           "evaluate", "HISTORY_COLUMNS", "load_run", "provenance", "summary_warnings",
           "CHANCE_MARGIN", "SATURATION_SHARE"]

#: Columns of ``history.csv``, in order (counter totals follow them). ``seconds`` is the
#: epoch's wall time without Numba compilation, which ``compile_seconds`` holds apart.
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
                   "compile_seconds", "lr", "loss_scale", "skipped_steps", "steps")

CHECKPOINT = "checkpoint.npz"

#: A run whose best test accuracy is at most ``1 / classes + CHANCE_MARGIN`` has learnt
#: nothing: its summary warns (:func:`summary_warnings`).
CHANCE_MARGIN = 0.05

#: Saturation *dominates* a role when at least this share of the values rounded into it in
#: the last epoch overflowed the format's range (``ROLE.overflow / ROLE.roundings`` of the
#: history's counter totals): one value in ten clamped to the format's largest magnitude (or
#: wrapped, or sent to infinity, as the role's Overflow says).
SATURATION_SHARE = 0.10


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/infinite or exceeded ``TrainConfig.max_loss``."""


class RunFolderError(ValueError):
    """A run directory cannot be resumed: a missing or damaged ``run.json`` or
    ``checkpoint.npz``, or settings that contradict the stored run. The message names the
    file and what to do."""


def model_option_names(model: str) -> list:
    """The options of ``model``'s constructor a config may set (``model_options``): every
    parameter but those the training loop fills in (seed, input shape, classes)."""
    import inspect

    params = inspect.signature(MODELS[model]).parameters
    return [p for p in params if p not in ("seed", "in_shape", "in_features", "classes")]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how; plain data, saved with every run.

    Parameters
    ----------
    model : str
        ``"mlp"``, ``"lenet"`` or ``"cifarnet"`` (:func:`fixedsim.nn.build`).
    model_options : dict
        Keyword arguments of the model constructor (e.g. ``{"hidden": [256]}``), JSON values:
        tuples are held as lists, so a config equals itself read back from ``run.json``.
    data : str
        A data set name or folder (:func:`fixedsim.data.load`): ``"embedded"``,
        ``"fashion-mnist"``, ``"mnist5k"``, ``"synthetic"`` or a directory of IDX files.
    train_size, test_size : int, optional
        Use only the first images of each part (the shipped subsets are in random,
        stratified order).
    epochs : int
    batch_size : int
        Default 16. The defaults (batch 16, SGD lr 0.02 with momentum 0.9, cosine over the
        run) are those under which ``fixedsim train --model lenet --policy float32 --epochs 3``
        reaches 85.6% test accuracy on the embedded data (docs/training.md); the studies
        write their settings out.
    optimizer : {"sgd", "adam", "kfac"}
        ``"kfac"``: :class:`fixedsim.nn.KFAC` (K-FAC preconditioning of the Linear and Conv2d
        layers, then SGD's step with ``momentum``, ``nesterov``, ``weight_decay``;
        docs/kfac.md).
    lr : float
        The base learning rate; ``schedule`` scales it.
    momentum, nesterov, weight_decay : SGD settings (``weight_decay`` also for Adam).
    schedule : str
        ``"cosine"`` (the default: cosine annealing to 0 over the run's epochs),
        ``"constant"``, ``"step:EPOCHS:GAMMA"``, ``"cosine:EPOCHS[:MIN_LR[:WARMUP]]"``,
        ``"poly:..."`` (:func:`fixedsim.nn.optim.parse_schedule`).
    seed : int
        The run seed (weights, shuffling, stochastic rounding).
    eval_batch_size : int
    max_loss : float
        A mean training loss above it (or NaN/inf) stops the run as diverged.
    reuse : str
        Adaptive Deep Reuse of the layers' forward products (:func:`fixedsim.reuse.schedules.
        parse_reuse`): ``""`` (none), ``"L=25,H=8[,scope=...]"``, ``"adaptive:..."`` or
        ``"cr-off:..."``.
    reuse_layers : {"conv", "linear", "all"}
        Which product layers the reuse setting applies to.
    approx : str
        Column-row sampling of the layers' products in training (:class:`fixedsim.approx.
        Approx`): ``""`` (none) or ``"METHOD:KEEP[:PRODUCT[+PRODUCT...]][:seed=N][:eps=E]"``, e.g.
        ``"crs:0.5:forward"`` (docs/approx.md). The draws derive from the run seed and the
        step, so a resumed run draws the same pairs.
    approx_layers : {"all", "conv", "linear"}
        Which product layers the sampling setting applies to (not those with reuse).
    grad_approx : str
        Gradient approximation of the layers' backward passes (:class:`fixedsim.approx.
        GradApprox`): ``""`` (none), ``"topk:KEEP"`` (meProp: the largest entries of each
        example's error), ``"random:P"`` (entries kept with probability P, scaled by 1/P) or
        ``"stale:N"`` (the weight gradient computed every N-th step), ``[:seed=N]``
        (docs/approx.md). A resumed run continues bit for bit (the stale gradients are in the
        checkpoint).
    grad_approx_layers : {"all", "conv", "linear", "hidden"}
        Which product layers the gradient approximation applies to (not those with reuse or
        column-row sampling); ``"hidden"``: all but the last (the classifier, whose error has
        one entry per class).
    rescale : str
        Kernel rescaling (:class:`fixedsim.approx.Rescale`): ``""`` (none) or
        ``"FACTOR:EPOCH"``: the first EPOCH epochs train the low-resolution network
        (:func:`fixedsim.approx.rescale.low_resolution_model`) on images downsampled by
        FACTOR, then its kernels are rescaled into the model, which continues at full
        resolution with a fresh optimizer state (docs/approx.md). Not with ``reuse``.
    damping, stat_decay, inv_interval, stat_interval, refresh, refresh_threshold : K-FAC
        settings (``optimizer="kfac"``; :class:`fixedsim.nn.KFAC`): Tikhonov damping (> 0),
        decay of the factors' running averages (in [0, 1)), refresh interval of the inverses
        (>= 1), interval of the statistics (>= 1), ``"fixed"`` or ``"adaptive"`` refresh and
        the relative change below which an adaptive refresh doubles its interval.
    damping_schedule : str
        K-FAC: the damping's schedule, a learning-rate schedule spelling applied to
        ``damping`` (e.g. ``"poly:30:2:0.0001"``); it must stay > 0 over the run. A changed
        damping takes effect at the next refresh of the inverses.
    workers : int
        Emulated data parallelism (docs/parallel.md): each global batch is cut into
        ``workers`` equal contiguous shards (``workers`` must divide ``batch_size``), each
        worker computes its gradient on its shard, and the gradients are summed by a ring
        all-reduce (:func:`fixedsim.nn.parallel.ring_allreduce`) before the one optimizer
        step. Not with ``reuse`` or ``grad_approx``. With ``optimizer="kfac"`` the workers'
        Kronecker factors are summed by the same all-reduce on the steps that gather
        statistics (docs/kfac.md).
    allreduce : str
        The all-reduce's communication format (:func:`fixedsim.nn.parallel.parse_allreduce`):
        ``""`` (float64 sums; with one worker: no all-reduce at all, the run of old) or
        ``"FORMAT[:ROUNDING][:scale=S][:overflow=RULE]"``, e.g. ``"bf16"``,
        ``"fp8_e5m2:scale=1024"``, ``"Q<16,12>:stochastic"``; every partial sum is rounded
        into it, in the ring's order.
    label_smoothing : float
        The training loss's label smoothing ``eps`` in [0, 1)
        (:class:`~fixedsim.nn.SoftmaxCrossEntropy`; the test loss is the plain one).
    smoothing_sigma : float
        Gaussian smoothing of the objective (>= 0; docs/kfac.md): each step's forward and
        backward run at weights ``w + sigma * eps`` (seeded, rounded into ``weights``,
        :func:`fixedsim.nn.smoothing.perturb_weights`), and the step updates ``w``.
    mixup : float
        Mixup's ``alpha`` (>= 0; 0: off): each training batch is mixed with a permutation of
        itself, ``lam ~ Beta(alpha, alpha)`` drawn per step (seeded), and trained against the
        mixed one-hot labels (:func:`fixedsim.nn.mixup.mix_batch`); the epoch's training
        accuracy is then the mean weight the mixed targets give the predicted class.
    random_erasing : float
        Random erasing's probability ``p`` in [0, 1] (0: off): each training image is, with
        probability ``p``, given a rectangle of random values (2% to 40% of the image,
        seeded; :func:`fixedsim.nn.erasing.erase_batch`), before mixup when both are on.
    weight_norm_cap : float
        SP-NGD's weight-norm cap's constant ``c`` (>= 0; 0: off; SP-NGD uses 2): after every
        update, a Linear or Conv2d weight whose norm exceeds ``sqrt(c * out_units)`` is
        scaled back to it and rounded into ``weights``
        (:func:`fixedsim.nn.normcap.cap_weight_norms`); the history counts the scalings
        (``weight_norm.capped``).
    """

    model: str = "lenet"
    model_options: dict = dataclasses.field(default_factory=dict)
    data: str = "embedded"
    train_size: int | None = None
    test_size: int | None = None
    epochs: int = 3
    batch_size: int = 16
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    eval_batch_size: int = 1000
    max_loss: float = 1e3
    reuse: str = ""
    reuse_layers: str = "conv"
    approx: str = ""
    approx_layers: str = "all"
    grad_approx: str = ""
    grad_approx_layers: str = "all"
    rescale: str = ""
    damping: float = 1e-3
    stat_decay: float = 0.95
    inv_interval: int = 20
    stat_interval: int = 1
    refresh: str = "fixed"
    refresh_threshold: float = 0.1
    damping_schedule: str = "constant"
    workers: int = 1
    allreduce: str = ""
    label_smoothing: float = 0.0
    smoothing_sigma: float = 0.0
    mixup: float = 0.0
    random_erasing: float = 0.0
    weight_norm_cap: float = 0.0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig {name} must be an int >= 1, got {v!r}")
        for name in ("train_size", "test_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"TrainConfig {name} must be an int >= 1 or None, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainConfig seed must be an int >= 0, got {self.seed!r}")
        if self.optimizer not in ("sgd", "adam", "kfac"):
            raise ValueError(f"TrainConfig optimizer must be 'sgd', 'adam' or 'kfac', "
                             f"got {self.optimizer!r}")
        if self.model not in MODELS:
            raise ValueError(f"TrainConfig model must be one of {', '.join(MODELS)}, "
                             f"got {self.model!r}")
        if not isinstance(self.model_options, dict):
            raise ValueError(f"TrainConfig model_options must be a dict, "
                             f"got {self.model_options!r}")
        allowed = model_option_names(self.model)
        unknown = [k for k in self.model_options if k not in allowed]
        if unknown:
            raise ValueError(f"TrainConfig model_options: model {self.model!r} has no option "
                             f"{', '.join(map(repr, unknown))}; its options are "
                             f"{', '.join(allowed)}")
        try:  # stored as JSON in run.json: hold it as JSON gives it back (tuples as lists)
            opts = json.loads(json.dumps(self.model_options, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrainConfig model_options must hold JSON values (numbers, "
                             f"strings, lists, dicts), got {self.model_options!r}: {e}") from None
        object.__setattr__(self, "model_options", opts)
        if not (isinstance(self.max_loss, (int, float)) and self.max_loss > 0):
            raise ValueError(f"TrainConfig max_loss must be > 0, got {self.max_loss!r}")
        parse_schedule(self.schedule, epochs=self.epochs)  # validates
        parse_reuse(self.reuse)
        if self.reuse_layers not in ("conv", "linear", "all"):
            raise ValueError(f"TrainConfig reuse_layers must be 'conv', 'linear' or 'all', "
                             f"got {self.reuse_layers!r}")
        if not isinstance(self.approx, str):
            raise ValueError(f"TrainConfig approx must be a string such as 'crs:0.5:forward' "
                             f"(or '' for none), got {self.approx!r}")
        parse_approx(self.approx)
        if self.approx_layers not in ("conv", "linear", "all"):
            raise ValueError(f"TrainConfig approx_layers must be 'conv', 'linear' or 'all', "
                             f"got {self.approx_layers!r}")
        if self.reuse and self.approx.strip() and (
                "all" in (self.reuse_layers, self.approx_layers)
                or self.reuse_layers == self.approx_layers):
            raise ValueError(f"TrainConfig: reuse (on {self.reuse_layers} layers) and approx "
                             f"(on {self.approx_layers} layers) would both apply to the same "
                             "layers; give them disjoint layer kinds (e.g. reuse_layers='conv', "
                             "approx_layers='linear')")
        if not isinstance(self.grad_approx, str):
            raise ValueError(f"TrainConfig grad_approx must be a string such as 'topk:0.3' "
                             f"(or '' for none), got {self.grad_approx!r}")
        parse_grad_approx(self.grad_approx)
        if self.grad_approx_layers not in ("conv", "linear", "all", "hidden"):
            raise ValueError(f"TrainConfig grad_approx_layers must be 'conv', 'linear', 'all' "
                             f"or 'hidden', got {self.grad_approx_layers!r}")
        if self.grad_approx.strip():
            for name, setting, layers in (("reuse", self.reuse, self.reuse_layers),
                                          ("approx", self.approx, self.approx_layers)):
                if setting.strip() and ("all" in (layers, self.grad_approx_layers)
                                        or self.grad_approx_layers == "hidden"
                                        or layers == self.grad_approx_layers):
                    raise ValueError(
                        f"TrainConfig: {name} (on {layers} layers) and grad_approx (on "
                        f"{self.grad_approx_layers} layers) would both apply to the same "
                        f"layers; give them disjoint layer kinds (e.g. {name}_layers='conv', "
                        "grad_approx_layers='linear')")
        if not isinstance(self.rescale, str):
            raise ValueError(f"TrainConfig rescale must be a string such as '2:3' (or '' for "
                             f"none), got {self.rescale!r}")
        if parse_rescale(self.rescale) is not None and self.reuse.strip():
            raise ValueError("TrainConfig: rescale and reuse cannot be combined (the reuse "
                             "tables and schedule follow one network); remove one")
        try:
            check_kfac_settings(**self._kfac_settings())
        except ValueError as err:
            raise ValueError(f"TrainConfig {err}") from None
        try:
            dsched = parse_schedule(self.damping_schedule, epochs=self.epochs)
        except ValueError as err:
            raise ValueError(f"TrainConfig damping_schedule: {err}") from None
        for e in (0, self.epochs):
            if not dsched(self.damping, e) > 0:
                raise ValueError(f"TrainConfig damping_schedule {self.damping_schedule!r} "
                                 f"takes the damping {self.damping:g} to "
                                 f"{dsched(self.damping, e):g} at epoch {e}; damping must stay "
                                 f"> 0 (give the schedule a MIN_LR > 0)")
        if self.optimizer == "kfac":
            for name in ("reuse", "approx", "grad_approx"):
                if getattr(self, name).strip():
                    raise ValueError(f"TrainConfig: optimizer 'kfac' needs the layers' dense "
                                     f"products; {name} {getattr(self, name)!r} cannot be "
                                     "combined with it (remove one)")
        self._check_parallel()
        try:
            SoftmaxCrossEntropy(label_smoothing=self.label_smoothing)
            check_sigma(self.smoothing_sigma)
            check_alpha(self.mixup)
            check_probability(self.random_erasing)
            check_cap(self.weight_norm_cap)
        except ValueError as err:
            raise ValueError(f"TrainConfig {err}") from None
        self.make_optimizer({"check": Parameter("check", np.zeros(1))})  # validates lr, ...

    def _check_parallel(self):
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"TrainConfig workers must be an int >= 1 (the number of emulated "
                             f"data-parallel workers), got {w!r}")
        if self.batch_size % w:
            raise ValueError(f"TrainConfig workers must divide batch_size (each global batch "
                             f"is split into {w} equal shards), got batch_size "
                             f"{self.batch_size} and workers {w}; choose a batch size that is a "
                             f"multiple of {w}")
        try:
            parse_allreduce(self.allreduce)
        except ValueError as err:
            raise ValueError(f"TrainConfig {err}") from None
        if w > 1:
            for name, bad in (("reuse", self.reuse.strip()),
                              ("grad_approx", self.grad_approx.strip())):
                if bad:
                    raise ValueError(f"TrainConfig: workers > 1 cannot be combined with {name} "
                                     f"(their per-layer state is not split over workers in this "
                                     f"model); use workers 1 or remove it")

    def _kfac_settings(self) -> dict:
        return {k: getattr(self, k) for k in ("damping", "stat_decay", "inv_interval",
                                              "stat_interval", "refresh", "refresh_threshold")}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
        """Inverse of :meth:`to_dict`; an unknown key or a bad value raises ValueError
        naming ``where``."""
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, where)
        return _build(cls, where, **d)

    def make_optimizer(self, params, model=None):
        """The optimizer of the run over ``params``; K-FAC takes ``model`` (its layers) and
        without one only checks its settings, returning SGD."""
        if self.optimizer == "kfac" and model is not None:
            return KFAC(model, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                        weight_decay=self.weight_decay, **self._kfac_settings())
        if self.optimizer == "adam":
            return Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                   weight_decay=self.weight_decay)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    history : list of dict
        One row per epoch (:data:`HISTORY_COLUMNS`, then counter totals).
    model : fixedsim.nn.Sequential
        The trained model.
    counters : dict of str to LayerCounters
        Per-layer counts of the last epoch (training and evaluation).
    out : pathlib.Path or None
        The run directory.
    reuse : list of dict
        With ``config.reuse``: one row per step and reused layer (remain ratio, MACs
        performed and dense, hashing, hits, the setting), as written to ``reuse.csv``.
    compile_seconds : float
        Wall time this call spent compiling Numba kernels (0 once they are in Numba's cache),
        left out of every epoch's ``seconds``.
    warnings : list of str
        :func:`summary_warnings` of the history: accuracy at chance or fallen to it,
        saturation dominating a role.
    """

    history: list
    model: object
    counters: dict
    out: pathlib.Path | None
    reuse: list = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    warnings: list = dataclasses.field(default_factory=list)


class _Scaler:
    """Loss-scaling state (static or dynamic), per :class:`~fixedsim.nn.LossScale`."""

    def __init__(self, ls):
        self.ls = ls
        self.scale = ls.init if ls is not None else 1.0
        self.good = 0

    def update(self, finite: bool) -> bool:
        """Record a step's gradient check; True when the step is to be applied (a step
        with non-finite gradients never is)."""
        if self.ls is None:
            return finite
        if not finite:
            if self.ls.dynamic:
                self.scale *= self.ls.backoff
            self.good = 0
            return False
        self.good += 1
        if self.ls.dynamic and self.good >= self.ls.growth_interval:
            self.scale *= self.ls.growth
            self.good = 0
        return True


def _load_data(config: TrainConfig, data=None):
    ds = data if data is not None else _data.load(config.data)
    xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if config.train_size is not None:
        xtr, ytr = xtr[:config.train_size], ytr[:config.train_size]
    if config.test_size is not None:
        xte, yte = xte[:config.test_size], yte[:config.test_size]
    return ds, xtr, ytr, xte, yte


def evaluate(model, policy: Policy, x, y, *, seed: int = 0, epoch: int = 0,
             batch_size: int = 1000, counters: dict | None = None):
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in evaluation mode, under ``policy``.

    Stochastic roundings draw from the evaluation phase of the run's streams (``epoch`` keys
    them), so an evaluation never perturbs training. Layers with cross-batch reuse start the
    evaluation with an empty evaluation table (so it does not depend on earlier ones).
    """
    for layer in getattr(model, "layers", []):
        if getattr(layer, "reuse_eval_table", None) is not None:
            layer.reuse_eval_table.clear()
    lossf = SoftmaxCrossEntropy()
    total_loss, correct = 0.0, 0
    for i, start in enumerate(range(0, len(x), batch_size)):
        ctx = Context(policy, seed=seed, step=epoch * 1_000_000 + i, training=False, phase=1)
        logits = model.forward(x[start:start + batch_size], ctx)
        yb = y[start:start + batch_size]
        total_loss += lossf(logits, yb, ctx) * len(yb)
        correct += int((np.asarray(logits).argmax(axis=1) == yb).sum())
        if counters is not None:
            merge_counters(counters, ctx.counters)
    n = max(len(x), 1)
    return total_loss / n, correct / n


def _totals(counters: dict) -> dict:
    tot = LayerCounters()
    for v in counters.values():
        tot += v
    return tot.as_dict()


def _checkpoint_epoch(out, resume) -> int:
    """The last finished epoch of the checkpoint a resumed run continues from (-1: none, or
    unreadable: the load then says why)."""
    if not resume or out is None:
        return -1
    path = pathlib.Path(out) / CHECKPOINT
    try:
        with np.load(path) as z:
            return int(json.loads(bytes(z["meta"]).decode())["epoch"])
    except Exception:  # noqa: BLE001 - a damaged file is reported by the load itself
        return -1


def _expand(low, full, in_shape, factor, policy, seed, step):
    """Kernel rescaling at the switch: the full model's parameters from the low-resolution
    network's (:func:`fixedsim.approx.rescale.expand_model`), rounded into ``weights`` (keys
    ``(seed, phase 2, step, "rescale", name)``); BatchNorm buffers copied."""
    from ..approx.rescale import expand_model

    values = expand_model(low, full, in_shape, factor)
    ctx = Context(policy, seed=seed, step=step, phase=2)
    for name, p in full.named_parameters().items():
        p.value = ctx.round("weights", values[name], "rescale", name)
    lb = low.buffers()
    for k, v in full.buffers().items():
        if k in lb and lb[k].shape == v.shape:
            v[...] = lb[k]


def _init_weights(model, policy, seed):
    ctx = Context(policy, seed=seed, step=0, phase=2)
    for name, p in model.named_parameters().items():
        p.value = ctx.round("weights", p.value, "init", name)


def _atomic_write(path: pathlib.Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _history_csv(history) -> str:
    cols = list(HISTORY_COLUMNS)
    for row in history:
        cols += [k for k in row if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow(row)
    return buf.getvalue()


def _reuse_targets(model, which):
    """The Conv2d/Linear layers a reuse setting applies to."""
    kinds = {"conv": (Conv2d,), "linear": (Linear,), "all": (Conv2d, Linear)}[which]
    return [m for m in getattr(model, "layers", []) if isinstance(m, kinds)]


def _grad_targets(model, which):
    """The Conv2d/Linear layers a gradient approximation applies to (``"hidden"``: all but
    the last)."""
    if which == "hidden":
        return _reuse_targets(model, "all")[:-1]
    return _reuse_targets(model, which)


def _reuse_rows(ctx, targets, epoch, step, setting):
    rows = []
    for layer in targets:
        lc = ctx.counters.get(layer.name)
        if lc is None or not lc.reuse.calls:
            continue
        r = lc.reuse
        rows.append({"epoch": epoch + 1, "step": step, "layer": layer.name,
                     "setting": str(setting), "remain_ratio": r.remain_ratio,
                     "macs": r.macs, "dense_macs": r.dense_macs,
                     "backward_macs": r.backward_macs,
                     "backward_dense_macs": r.backward_dense_macs, "hash_ops": r.hash_ops,
                     "hits": r.hits, "table_hits": r.table_hits})
    return rows


def _save_checkpoint(out, model, opt, scaler, epoch, step, history, counters_rows,
                     reuse=None, stale_targets=(), rescale=None):
    arrays = {f"param/{k}": p.value for k, p in model.named_parameters().items()}
    arrays.update({f"grad_approx/{layer.name}": layer.stale_grad for layer in stale_targets
                   if layer.stale_grad is not None})
    arrays.update({f"buffer/{k}": v for k, v in model.buffers().items()})
    scalars = {}
    for k, v in opt.state_dict().items():
        if np.ndim(v) == 0:  # exact in JSON: ints, and floats by their shortest repr
            scalars[k] = v.item() if isinstance(v, np.generic) else v
        else:
            arrays[f"optim/{k}"] = np.asarray(v)
    meta = {"epoch": epoch, "step": step, "scale": scaler.scale, "good": scaler.good,
            "optim": scalars, "history": history, "counters": counters_rows}
    if rescale is not None:
        meta["rescale"] = rescale.state_dict()
    if reuse is not None:
        sched, targets, reuse_rows = reuse
        meta["reuse"] = {"schedule": sched.state_dict(), "rows": reuse_rows}
        for layer in targets:
            if getattr(layer, "reuse_table", None) is not None:
                for k, v in layer.reuse_table.state_dict().items():
                    arrays[f"reuse/{layer.name}/{k}"] = v
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    _atomic_write(out / CHECKPOINT, lambda f: np.savez(f, **arrays))
    text = _history_csv(history)
    _atomic_write(out / "history.csv", lambda f: f.write(text.encode()))
    if counters_rows:
        _write_rows(out / "counters.csv", counters_rows)
    if reuse is not None and reuse[2]:
        _write_rows(out / "reuse.csv", reuse[2])


def _write_rows(path, rows):
    """Rows of equal keys as a CSV file, written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _load_reuse(out, meta, sched, targets):
    """Restore the reuse schedule and the cross-batch tables of a checkpoint."""
    state = meta.get("reuse")
    if state is None:
        return []
    sched.load_state_dict(state["schedule"])
    for layer in targets:
        layer.set_reuse(sched.current())
    with np.load(out / CHECKPOINT) as z:
        for layer in targets:
            prefix = f"reuse/{layer.name}/"
            tab = {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
            if tab and getattr(layer, "reuse_table", None) is not None:
                layer.reuse_table.load_state_dict(tab)
    return state["rows"]


def _load_checkpoint(out, model, opt, scaler):
    with np.load(out / CHECKPOINT) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        for k, p in model.named_parameters().items():
            value = z[f"param/{k}"]
            if value.shape != p.value.shape:
                raise ValueError(f"parameter {k} has shape {value.shape}, the model "
                                 f"{p.value.shape}")
            p.value = value.copy()
        for k, v in model.buffers().items():
            v[...] = z[f"buffer/{k}"]
        opt.load_state_dict({**meta["optim"], **{k[len("optim/"):]: z[k] for k in z.files
                                                 if k.startswith("optim/")}})
    scaler.scale, scaler.good = meta["scale"], meta["good"]
    return meta


def _resume_from_checkpoint(out, model, opt, scaler, reuse_sched, reuse_targets,
                            stale_targets=()):
    """Load ``out/checkpoint.npz``; a damaged file is a :class:`RunFolderError` saying so."""
    import zipfile

    path = out / CHECKPOINT
    try:
        meta = _load_checkpoint(out, model, opt, scaler)
        reuse_rows = _load_reuse(out, meta, reuse_sched, reuse_targets)
        if stale_targets:
            with np.load(path) as z:
                for layer in stale_targets:
                    key = f"grad_approx/{layer.name}"
                    layer.stale_grad = z[key].copy() if key in z.files else None
        missing = [k for k in ("epoch", "step", "history", "counters") if k not in meta]
        if missing:
            raise KeyError(f"no {', '.join(missing)} in its meta data")
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, TypeError) as err:
        raise RunFolderError(
            f"{path} is damaged and cannot be resumed from ({type(err).__name__}: {err}). "
            f"Remove it to train the run again from its first epoch (rm {path}; then "
            f"fixedsim train --resume {out}), or start a new run in another folder") from None
    return meta, reuse_rows


def _resume_check(out, config, policy, stored_config, stored_policy):
    """Refuse settings that contradict the stored run (all but ``epochs``), naming them."""
    diffs = [f"{f.name} {getattr(config, f.name)!r} (the run has "
             f"{getattr(stored_config, f.name)!r})"
             for f in dataclasses.fields(TrainConfig)
             if f.name != "epochs" and getattr(config, f.name) != getattr(stored_config, f.name)]
    if policy != stored_policy:
        diffs.append(f"policy {policy.name!r} (the run has {stored_policy.name!r}"
                     + (", with other settings" if policy.name == stored_policy.name else "")
                     + ")")
    if diffs:
        raise RunFolderError(
            f"resume {out}: the run stored there differs in {'; '.join(diffs)}. A resumed run "
            f"continues with its stored settings (only epochs may change: more epochs "
            f"continue it); leave the others out, or start a new run in another folder")


def provenance() -> dict:
    """Where a result comes from: fixedsim version, git commit (when run from a checkout),
    Python and NumPy versions, machine, platform and Numba threads."""
    import platform

    from .. import __version__

    commit = None
    try:
        import subprocess

        here = pathlib.Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import numba

        threads = numba.get_num_threads()
    except Exception:  # pragma: no cover - numba always present
        threads = None
    return {"fixedsim_version": __version__, "git_commit": commit,
            "python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.node(), "platform": platform.platform(),
            "numba_threads": threads}


def load_run(out) -> tuple[TrainConfig, Policy]:
    """The config and policy of a run directory (written by :func:`train`)."""
    out = pathlib.Path(out)
    path = out / "run.json"
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such run directory")
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a fixedsim run directory (no run.json: "
                                f"train writes it when a run starts)")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunFolderError(f"{path} is damaged ({type(err).__name__}: {err}): it holds the "
                             f"run's config and policy, without which the run cannot be "
                             f"resumed; start a new run in another folder") from None
    if not isinstance(d, dict) or not isinstance(d.get("config"), dict) \
            or not isinstance(d.get("policy"), dict):
        raise RunFolderError(f"{path} is damaged: expected a JSON object with the tables "
                             f"'config' and 'policy'; start a new run in another folder")
    try:
        return (TrainConfig.from_dict(d["config"], f"{path} config"),
                Policy.from_dict(d["policy"], f"{path} policy"))
    except (TypeError, ValueError) as err:
        raise RunFolderError(f"{path} is damaged: {err}") from None


def train(config: TrainConfig, policy: Policy, out=None, *, resume: bool = False,
          progress: bool = True, data=None, log=None, stop_after_epoch: int | None = None,
          blas_threads: int | None = 1, compile_notice=None):
    """Train ``config.model`` on ``config.data`` under ``policy``.

    Parameters
    ----------
    config : TrainConfig
    policy : Policy
    out : path, optional
        Run directory: ``run.json`` (config, policy, provenance), ``policy.toml``,
        ``history.csv``,
        ``counters.csv`` (per layer and epoch), ``checkpoint.npz`` (after every epoch, written
        atomically) and ``curves.png``. None: nothing is written.
    resume : bool
        Continue the run in ``out`` from its checkpoint; ``config`` and ``policy`` must equal
        the stored ones, except ``config.epochs``, which may grow (the run continues to the
        new number of epochs, exactly as a run started with it; ``run.json`` records it).
        Without a checkpoint the run starts from the beginning.
    progress : bool
        Show a progress bar (tqdm, on stderr).
    data : fixedsim.data.Dataset, optional
        Use this data set instead of loading ``config.data``.
    log : callable, optional
        Called with one line of text per epoch (default: print to stdout when ``progress``).
    stop_after_epoch : int, optional
        Stop (as if interrupted) after this epoch is checkpointed; for tests and staging.
    blas_threads : int or None, default 1
        Limit of the BLAS thread pool during the run (threadpoolctl; None: unchanged). One
        thread keeps OpenBLAS from competing with the Numba kernels for the cores: the
        products of a training step are small, and on 2 busy cores a multi-threaded OpenBLAS
        made them an order of magnitude slower. Results do not depend on it (BLAS is used
        only where it is exact).
    compile_notice : str or callable, optional
        Printed to stderr (a string) or called (a callable) once, when a Numba kernel starts
        compiling (:class:`fixedsim.compiling.CompileWatch`). Compile time is measured either
        way and left out of every epoch's ``seconds`` (it is ``compile_seconds``).

    Returns
    -------
    TrainResult

    Raises
    ------
    TrainingDiverged
        The training loss became NaN/inf or exceeded ``config.max_loss``; the checkpoint and
        history of the last good epoch are kept.
    RunFolderError
        (a ``ValueError``) ``resume`` with a damaged ``run.json`` or ``checkpoint.npz``, or
        with settings that contradict the stored run; the message names them.
    FileExistsError
        ``out`` holds a run and ``resume`` is False.
    """
    from ..compiling import CompileWatch

    with blas_limit(blas_threads), CompileWatch(notice=compile_notice) as watch:
        res = _train(config, policy, out, resume=resume, progress=progress, data=data,
                     log=log, stop_after_epoch=stop_after_epoch, watch=watch)
    res.compile_seconds = watch.seconds
    return res


def blas_limit(blas_threads: int | None):
    """A context manager limiting the BLAS thread pool to ``blas_threads`` threads
    (threadpoolctl; None: a context that changes nothing), as :func:`train` runs."""
    import contextlib

    from threadpoolctl import threadpool_limits

    if blas_threads is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=blas_threads, user_api="blas")


def _train(config: TrainConfig, policy: Policy, out=None, *, resume: bool = False,
           progress: bool = True, data=None, log=None, stop_after_epoch: int | None = None,
           watch=None):
    """The loop of :func:`train`."""
    from tqdm import tqdm

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {config!r}")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy, got {policy!r}")
    if log is None:
        log = print if progress else (lambda line: None)
    ds, xtr, ytr, xte, yte = _load_data(config, data)
    try:
        model = build(config.model, seed=config.seed, in_shape=xtr.shape[1:],
                      classes=len(ds.classes), **config.model_options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model {config.model!r} with options {config.model_options!r} "
                         f"cannot be built for {ds.name} images of shape {xtr.shape[1:]}: "
                         f"{err}") from None
    _init_weights(model, policy, config.seed)
    rescale = parse_rescale(config.rescale)
    full_model, low_model, in_shape = model, None, tuple(xtr.shape[1:])
    if rescale is not None:
        from ..approx.rescale import downsample, low_resolution_model

        low_model = low_resolution_model(model, in_shape, rescale.factor,
                                         seed=np.random.SeedSequence([config.seed, 3]))
        _init_weights(low_model, policy, config.seed)
        low_data = (downsample(xtr, rescale.factor), downsample(xte, rescale.factor))
        if _checkpoint_epoch(out, resume) < rescale.epoch:
            model = low_model
    params = model.named_parameters()
    opt = config.make_optimizer(params, model)
    schedule = parse_schedule(config.schedule, epochs=config.epochs)
    damping_schedule = parse_schedule(config.damping_schedule, epochs=config.epochs)
    scaler = _Scaler(policy.loss_scale)
    lossf = SoftmaxCrossEntropy(label_smoothing=config.label_smoothing)
    history, counter_rows, start_epoch, step = [], [], 0, 0
    reuse_sched = parse_reuse(config.reuse)
    reuse_targets = _reuse_targets(model, config.reuse_layers)
    for layer in reuse_targets:
        layer.set_reuse(reuse_sched.current())
    reuse_rows: list = []
    approx = parse_approx(config.approx)
    grad_approx = parse_grad_approx(config.grad_approx)
    for m in (full_model, low_model) if low_model is not None else (full_model,):
        for layer in _reuse_targets(m, config.approx_layers) if approx is not None else []:
            layer.set_approx(approx)
        for layer in (_grad_targets(m, config.grad_approx_layers) if grad_approx is not None
                      else []):
            layer.set_grad_approx(grad_approx)

    def stale_layers(m):
        return (_grad_targets(m, config.grad_approx_layers)
                if grad_approx is not None and grad_approx.method == "stale" else [])

    stale_targets = stale_layers(model)

    if out is not None:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"config": config.to_dict(), "policy": policy.to_dict(),
                  "data": {"name": ds.name, "source": ds.source, "train": len(xtr),
                           "test": len(xte)}}
        if resume and (out / "run.json").is_file():
            stored_config, stored_policy = load_run(out)
            _resume_check(out, config, policy, stored_config, stored_policy)
            if (out / CHECKPOINT).is_file():
                meta, reuse_rows = _resume_from_checkpoint(out, model, opt, scaler,
                                                           reuse_sched, reuse_targets,
                                                           stale_targets)
                start_epoch, step = meta["epoch"] + 1, meta["step"]
                if rescale is not None:
                    try:
                        rescale.load_state_dict(meta.get("rescale", {}))
                    except ValueError as err:
                        raise RunFolderError(f"resume {out}: {err}") from None
                history, counter_rows = meta["history"], meta["counters"]
                spanning = [f"{name} {text!r}" for name, text in
                            (("schedule", config.schedule),
                             ("damping_schedule", config.damping_schedule))
                            if spans_run(text)]
                if config.epochs != stored_config.epochs and spanning:
                    raise RunFolderError(
                        f"resume {out}: the {' and '.join(spanning)} anneal(s) over the "
                        f"run's {stored_config.epochs} epochs, so the run cannot change them "
                        f"(the rate would jump); train a new run with epochs = "
                        f"{config.epochs}, or give the schedule its own length "
                        f"(cosine:TOTAL_EPOCHS) in a new run")
                if config.epochs < start_epoch:
                    raise RunFolderError(f"resume {out}: the run has finished {start_epoch} "
                                         f"epoch(s), more than epochs = {config.epochs}; give "
                                         f"epochs >= {start_epoch}")
                log(f"resuming {out} after epoch {meta['epoch'] + 1} (step {step})"
                    + (f"; epochs {stored_config.epochs} -> {config.epochs} (run.json "
                       f"updated)" if config.epochs != stored_config.epochs else ""))
            elif config.epochs != stored_config.epochs:
                log(f"{out}: no finished epoch to resume from; starting with epochs "
                    f"{config.epochs} (the run had {stored_config.epochs})")
        elif resume and (out / CHECKPOINT).is_file():
            raise RunFolderError(f"{out} holds a checkpoint but no run.json (the run's config "
                                 f"and policy), so it cannot be resumed; start a new run in "
                                 f"another folder")
        elif (out / CHECKPOINT).is_file() and not resume:
            raise FileExistsError(f"{out} already holds a run; use resume=True (--resume) to "
                                  "continue it or choose another directory")
        record["provenance"] = provenance()
        text = json.dumps(record, indent=2, default=str)
        _atomic_write(out / "run.json", lambda f: f.write(text.encode()))
        policy.save(out / "policy.toml")  # reusable as --policy RUN_DIR/policy.toml

    n = len(xtr)
    steps_per_epoch = -(-n // config.batch_size)
    allreduce = parse_allreduce(config.allreduce)
    parallel = config.workers > 1 or allreduce is not None
    counters: dict = {}
    compiled = (lambda: watch.seconds) if watch is not None else (lambda: 0.0)
    for epoch in range(start_epoch, config.epochs):
        t0, c0 = time.perf_counter(), compiled()
        counters = {}
        if rescale is not None and epoch == rescale.epoch and model is low_model:
            _expand(low_model, full_model, in_shape, rescale.factor, policy, config.seed, step)
            model = full_model
            params = model.named_parameters()
            opt = config.make_optimizer(params, model)
            stale_targets = stale_layers(model)
            log(f"epoch {epoch + 1}: kernels rescaled by {rescale.factor}; full resolution "
                f"from now on")
        if rescale is not None and model is low_model:
            xtr_e, xte_e = low_data
        else:
            xtr_e, xte_e = xtr, xte
        order = np.random.default_rng(np.random.SeedSequence([config.seed, 1, epoch])) \
            .permutation(n)
        tot_loss, correct, skipped, seen, sent_bytes, capped = 0.0, 0, 0, 0, 0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, file=sys.stderr, leave=False, unit="batch")
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size:(i + 1) * config.batch_size]
            xb, yb = xtr_e[idx], ytr[idx]
            ctx = Context(policy, seed=config.seed, step=step, training=True)
            tb = yb  # the loss's labels: yb, or mixup's target distributions
            if config.random_erasing:
                xb, _ = erase_batch(xb, config.random_erasing, ctx)
            if config.mixup:
                xb, tb, _ = mix_batch(xb, yb, len(ds.classes), config.mixup, ctx)
            scale = scaler.scale
            saved = perturb_weights(params, ctx, config.smoothing_sigma)  # None at sigma 0
            if parallel:  # forward and backward per worker, gradients all-reduced
                logits, loss, sent = data_parallel_pass(
                    model, lossf, xb, tb, ctx, config.workers, allreduce, scale,
                    kfac=opt if config.optimizer == "kfac" else None)
                sent_bytes += sent
            else:
                logits = model.forward(xb, ctx)
                loss = lossf(logits, tb, ctx)
            if not math.isfinite(loss) or loss > config.max_loss:
                bar.close()
                merge_counters(counters, ctx.counters)
                why = ("not finite" if not math.isfinite(loss)
                       else f"> max_loss {config.max_loss:g}")
                hint = ("; K-FAC whose damping is small for its step diverges as plain "
                        "natural gradient does: try a larger damping (the LeNet trains at "
                        "0.1 with the default rate; docs/kfac.md)"
                        if config.optimizer == "kfac" else "")
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch + 1}, step {step}: loss {loss:.4g} "
                    f"({why}) under policy {policy.name!r}; "
                    + (f"the checkpoint of the last good epoch is in {out}" if out is not None
                       and history else "no epoch finished") + hint)
            if not parallel:
                model.backward(lossf.backward(ctx, scale), ctx)
            restore_weights(params, saved)
            finite = all(bool(np.isfinite(p.grad).all()) for p in params.values())
            if scaler.update(finite):
                at = epoch + i / steps_per_epoch
                opt.lr = schedule(config.lr, at)
                if config.optimizer == "kfac":
                    opt.damping = damping_schedule(config.damping, at)
                opt.step(ctx, grad_scale=scale)
                capped += cap_weight_norms(model.layers, ctx, config.weight_norm_cap)
            else:
                skipped += 1
            merge_counters(counters, ctx.counters)
            if config.reuse:
                reuse_rows += _reuse_rows(ctx, reuse_targets, epoch, step,
                                          reuse_sched.current())
                if reuse_sched.observe(step, loss):
                    for layer in reuse_targets:
                        layer.set_reuse(reuse_sched.current())
                    log(f"step {step}: reuse now {reuse_sched.current() or 'dense'}")
            tot_loss += loss * len(yb)
            pred = np.asarray(logits).argmax(axis=1)
            correct += (int((pred == yb).sum()) if tb is yb
                        else float(tb[np.arange(len(yb)), pred].sum()))
            seen += len(yb)
            step += 1
            bar.set_postfix(loss=f"{tot_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
            bar.update()
        bar.close()
        test_loss, test_acc = evaluate(model, policy, xte_e, yte, seed=config.seed, epoch=epoch,
                                       batch_size=config.eval_batch_size, counters=counters)
        compile_s = compiled() - c0
        row = {"epoch": epoch + 1, "train_loss": tot_loss / seen, "train_acc": correct / seen,
               "test_loss": test_loss, "test_acc": test_acc,
               "seconds": time.perf_counter() - t0 - compile_s, "compile_seconds": compile_s,
               "lr": schedule(config.lr, epoch + 1), "loss_scale": scaler.scale,
               "skipped_steps": skipped, "steps": steps_per_epoch}
        if rescale is not None:
            row["rescale.factor"] = rescale.factor if model is low_model else 1
        row.update(_totals(counters))
        if config.weight_norm_cap:
            row["weight_norm.capped"] = capped
        if parallel:
            row["allreduce.bytes_per_worker"] = sent_bytes
        history.append(row)
        for layer, lc in counters.items():
            counter_rows.append({"epoch": epoch + 1, "layer": layer, **lc.as_dict()})
        counter_rows = _uniform(counter_rows)
        log(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | "
            f"{row['seconds']:.1f} s" + (f" (+ {compile_s:.1f} s compiling kernels)"
                                         if compile_s >= 0.05 else "")
            + (f" | {skipped} steps skipped" if skipped else ""))
        if out is not None:
            _save_checkpoint(out, model, opt, scaler, epoch, step, history, counter_rows,
                             (reuse_sched, reuse_targets, reuse_rows) if config.reuse
                             else None, stale_targets, rescale)
            plot_history(history, out / "curves.png", title=f"{config.model} · {policy.name}")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return TrainResult(history=history, model=model, counters=counters, out=out,
                       reuse=reuse_rows, warnings=summary_warnings(history, len(ds.classes),
                                                                   policy))


def summary_warnings(history, classes: int, policy: Policy | None = None) -> list:
    """What a run's summary should warn about, from its history.

    - **accuracy at chance**: the best test accuracy of all epochs is at most
      ``1 / classes + CHANCE_MARGIN`` (the model has learnt nothing it can show);
    - **accuracy fell to chance**: an epoch was above that, the last one is not (the run
      learnt, then collapsed: a divergence whose loss stayed under ``TrainConfig.max_loss``,
      or a format that saturated); the message gives the best epoch and the highest training
      loss;
    - **saturation dominates a role**: in the last epoch, at least :data:`SATURATION_SHARE`
      of the values rounded into a role (``weights``, ``activations``, ``errors``,
      ``weight_grads``, ``update``, ``momentum``) or into a product stage
      (``products.input``, ``.product``, ``.accumulator``, ``.output``) overflowed its
      format's range (the counters ``ROLE.overflow`` and ``ROLE.roundings`` of the history's
      last row).

    Parameters
    ----------
    history : list of dict
        Rows of ``history.csv`` (:data:`HISTORY_COLUMNS` and counter totals).
    classes : int
        Number of classes of the data set.
    policy : Policy, optional
        Names the role's format and range in the message.

    Returns
    -------
    list of str
        One sentence per finding (empty: nothing to warn about).

    Examples
    --------
    >>> row = {"test_acc": 0.1, "activations.roundings": 1000, "activations.overflow": 318}
    >>> for w in summary_warnings([row], classes=10): print(w)
    test accuracy stayed at chance: best 10.00% over 1 epoch(s), chance is 10.00% (1 of 10 classes)
    saturation dominates activations: 31.8% of its values overflowed their format's range
    """
    out = []
    if not history:
        return out
    last = history[-1]
    top = max(history, key=lambda r: float(r["test_acc"]))
    best = float(top["test_acc"])
    chance = 1.0 / classes
    if best <= chance + CHANCE_MARGIN:
        out.append(f"test accuracy stayed at chance: best {100 * best:.2f}% over "
                   f"{len(history)} epoch(s), chance is {100 * chance:.2f}% (1 of {classes} "
                   f"classes)")
    elif float(last["test_acc"]) <= chance + CHANCE_MARGIN:
        losses = [r for r in history if r.get("train_loss") not in (None, "")]
        worst = max(losses, key=lambda r: float(r["train_loss"])) if losses else None
        out.append(f"test accuracy fell to chance: {100 * float(last['test_acc']):.2f}% "
                   f"in the last epoch after a best of {100 * best:.2f}% in epoch "
                   f"{top.get('epoch', '?')}, chance is {100 * chance:.2f}%"
                   + (f"; highest training loss {float(worst['train_loss']):.4g} in epoch "
                      f"{worst.get('epoch', '?')}" if worst else ""))
    roles = [k[:-len(".roundings")] for k in last if k.endswith(".roundings")]
    for role in roles:
        n, o = last.get(f"{role}.roundings"), last.get(f"{role}.overflow")
        try:
            n, o = int(n or 0), int(o or 0)
        except (TypeError, ValueError):
            continue
        if n and o >= SATURATION_SHARE * n:
            what = _role_range(policy, role)
            out.append(f"saturation dominates {role}: {100 * o / n:.1f}% of its values "
                       f"overflowed {what}")
    return out


def _role_range(policy, role) -> str:
    """``the range [-2, 2) of Q<16,14>`` for a policy role, else ``their format's range``."""
    r = getattr(policy, role, None) if policy is not None and "." not in role else None
    fmt = getattr(r, "fmt", None)
    if fmt is None:
        return "their format's range"
    from ..formats import FixedFormat

    if isinstance(fmt, FixedFormat):
        hi = (fmt.max_code + 1) * 2.0 ** -fmt.frac_length
        return f"the range [{fmt.min:g}, {hi:g}) of {fmt!r}"
    return f"the range [{fmt.min:g}, {fmt.max:g}] of {fmt!r}"


def _uniform(rows):
    """Give every counters row the same keys (missing counts are 0)."""
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return [{k: r.get(k, 0) for k in keys} for r in rows]


def plot_history(history, path, title: str = ""):
    """Loss and accuracy per epoch (training and test) as a PNG/PDF figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    a1.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    a1.plot(ep, [r["test_loss"] for r in history], "s--", label="test")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy loss")
    a1.legend()
    a2.plot(ep, [100 * r["train_acc"] for r in history], "o-", label="train")
    a2.plot(ep, [100 * r["test_acc"] for r in history], "s--", label="test")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    if title:
        fig.suptitle(title)
    tmp = pathlib.Path(path)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
