"""K-FAC: natural-gradient steps with Kronecker-factored curvature, rounded by the policy.

:class:`KFAC` preconditions the gradient of every :class:`~fixedsim.nn.Linear` and
:class:`~fixedsim.nn.Conv2d` layer with the inverse of a Kronecker-factored approximation of
its Fisher block (Martens and Grosse, ICML 2015; for convolutions KFC, Grosse and Martens,
ICML 2016), then takes the step SGD takes (momentum, Nesterov, weight decay: see
:class:`~fixedsim.nn.SGD`). BatchNorm2d's ``gamma`` and ``beta`` are preconditioned unit-wise,
as SP-NGD does (Osawa et al.): per channel, the 2x2 Fisher of ``(gamma_c, beta_c)`` from the
per-example gradients ``(sum_hw dy * xhat, sum_hw dy)``, damped by ``lambda I`` (no pi
split); with ``unitwise_bn=False`` they, like every other parameter, take the plain SGD step.

Per layer, with ``a`` the layer's input row (Linear) or im2col patch (Conv2d), followed by a 1
when the layer has a bias, and ``e`` the per-example error of the layer's output (the gradient
of the example's loss with respect to the output, ``N * grad_y / loss_scale``):

- ``A = mean over rows of a a^T`` (Conv2d: over all ``N * Ho * Wo`` patches);
- ``G = (1/N) sum_n sum_t e_{n,t} e_{n,t}^T`` (Conv2d: summed over the output positions
  ``t``, as KFC; Linear: one position);
- running averages ``A <- stat_decay * A + (1 - stat_decay) * A_batch`` (the first batch
  sets them), every ``stat_interval`` steps and on every refresh step;
- on refresh steps (every ``inv_interval`` steps, the first step included; adaptive with
  ``refresh="adaptive"``), the damped inverses ``(A + pi sqrt(lambda) I)^-1`` and
  ``(G + sqrt(lambda) / pi I)^-1``, ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (the
  factored Tikhonov damping of Martens and Grosse, section 6.3), kept until the next refresh
  (stale, as SP-NGD);
- the preconditioned gradient ``P = A^-1 [dW; db] G^-1`` (Linear's ``(in + 1, out)``
  layout; Conv2d's weight reshaped to ``(O, C kh kw)`` and transposed), split back into the
  weight and bias.

The factors use the errors the backward pass propagates for the training labels: the
empirical Fisher (a sampled, "true" Fisher needs a second backward pass per step).

Numerics, each in its role of the :class:`~fixedsim.nn.Policy` (:data:`~fixedsim.nn.policy.
CURVATURE_ROLES`; a policy that does not set one uses its ``weight_grads`` role there):

- the products ``a^T a``, ``e^T e``, ``A^-1 [dW; db]`` and ``(.) G^-1`` go through
  :func:`fixedsim.matmul` with :meth:`Policy.curvature_spec` (``curvature_product``, else
  ``grad_weight``'s spec);
- the running averages, evaluated in float64 from the product and the stored factor, are
  rounded once into ``curvature``;
- the inversion is done in float64 (``numpy.linalg.eigh`` of the stored factor, eigenvalues
  below zero set to zero, damping added to the eigenvalues) and the inverse rounded once
  into ``inverse``;
- the preconditioned gradient is rounded once into ``preconditioned``; the intermediate
  ``A^-1 [dW; db]`` is the product's result as the spec delivers it (float64 for an exact
  spec); then momentum, update and weights round as in SGD.

Under emulated data parallelism (:func:`fixedsim.nn.parallel.data_parallel_pass`,
``TrainConfig.workers``) each worker computes its shard's factors weighted by ``shard / B``
(:meth:`KFAC.batch_factors` with ``batch=B``) on the steps that gather statistics
(:meth:`KFAC.gathers_statistics`); the gradients' all-reduce sums them and
:attr:`KFAC.reduced_factors` hands them to the step, which folds them into the running
averages as it would its own (docs/kfac.md).

Randomness of stochastic roles and products is keyed ``ctx.key("optim.<layer>", purpose)``:
the run seed, the step and the layer's name, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..matmul.engine import Bits as _Bits
from ..matmul.engine import im2col as _im2col
from ..matmul.engine import matmul as _matmul
from .core import Context, Module
from .layers import BatchNorm2d, Conv2d, Linear, Sequential, _pair
from .optim import COUNTER_KEY, SGD, _number

__all__ = ["KFAC", "check_kfac_settings", "REFRESH"]

#: How the inverses are refreshed: every ``inv_interval`` steps, or with an interval that
#: adapts to how much the factors changed (see :class:`KFAC`).
REFRESH = ("fixed", "adaptive")


def _int(v, what, low):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{what} must be an int >= {low}, got {v!r}")
    return int(v)


def check_kfac_settings(damping=1e-3, stat_decay=0.95, inv_interval=20, stat_interval=1,
                        refresh="fixed", refresh_threshold=0.1, max_interval=None) -> dict:
    """The K-FAC settings checked and normalised (as :class:`KFAC` takes them).

    Raises
    ------
    ValueError
        ``damping <= 0``, ``stat_decay`` outside ``[0, 1)``, an interval below 1, an unknown
        refresh, a threshold <= 0, or ``max_interval < inv_interval``; the message names the
        rule and the value.

    Examples
    --------
    >>> from fixedsim.nn.kfac import check_kfac_settings
    >>> check_kfac_settings(damping=0.0)
    Traceback (most recent call last):
    ...
    ValueError: damping must be > 0.0, got 0.0
    """
    d = {"damping": _number(damping, "damping", low=0.0, low_open=True),
         "stat_decay": _number(stat_decay, "stat_decay", low=0.0, high=1.0, high_open=True),
         "inv_interval": _int(inv_interval, "inv_interval (the refresh interval)", 1),
         "stat_interval": _int(stat_interval, "stat_interval", 1)}
    if refresh not in REFRESH:
        raise ValueError(f"refresh must be one of {', '.join(REFRESH)}, got {refresh!r}")
    d["refresh"] = refresh
    d["refresh_threshold"] = _number(refresh_threshold, "refresh_threshold", low=0.0,
                                     low_open=True)
    if max_interval is None:
        max_interval = 64 * d["inv_interval"]
    d["max_interval"] = _int(max_interval, "max_interval", d["inv_interval"])
    return d


def _layers_of(model) -> list:
    if isinstance(model, Sequential):
        return list(model.layers)
    if isinstance(model, Module):
        return [model]
    if isinstance(model, (list, tuple)) and all(isinstance(m, Module) for m in model):
        return list(model)
    raise ValueError(f"model must be a fixedsim.nn.Sequential (or a list of layers), got "
                     f"{type(model).__name__}")


class KFAC(SGD):
    """K-FAC with momentum and weight decay as SGD has them, rounded by the policy.

    See the module docstring for the factors, the damping and the roles. A step, per K-FAC
    layer (Linear, Conv2d), in order:

    1. on statistics steps (every ``stat_interval`` steps and every refresh step): the batch
       factors from the layer's kept forward input and output error, folded into the running
       averages (``curvature`` role);
    2. on refresh steps: the damped inverses (``inverse`` role);
    3. ``P = A^-1 [dW; db] G^-1`` (``preconditioned`` role), the gradients divided by the
       loss scale first;
    4. SGD's step with ``P`` for the gradient: ``g = P + weight_decay * w``, momentum,
       ``lr * direction``, ``w - step`` (roles ``momentum``, ``update``, ``weights``).

    BatchNorm2d layers: the same with the unit-wise 2x2 Fisher of each channel's
    ``(gamma, beta)`` (``unitwise_bn``). Other parameters take SGD's step with their own
    gradient.

    Refresh (``refresh="adaptive"``, SP-NGD's adaptive refresh of stale statistics, Osawa et
    al., arXiv:2002.06015): at each refresh the relative change of the factors since the last
    refresh, ``max ||F_new - F_old||_F / ||F_old||_F`` over all factors, is compared with
    ``refresh_threshold``: below it the interval doubles (up to ``max_interval``), at or
    above it halves (down to ``inv_interval``).

    Parameters
    ----------
    model : fixedsim.nn.Sequential or list of layers
        Its Linear and Conv2d layers are preconditioned (their ``kfac_capture`` is set, so
        that the backward pass keeps its output error); its parameters are optimized, named
        as :meth:`~fixedsim.nn.Sequential.named_parameters` names them.
    lr : float
    momentum, nesterov, weight_decay :
        As :class:`~fixedsim.nn.SGD`.
    damping : float, default 1e-3
        Tikhonov damping ``lambda`` (> 0).
    stat_decay : float, default 0.95
        Decay of the running averages, in [0, 1) (0: the last batch's factors).
    inv_interval : int, default 20
        Refresh the inverses every ``inv_interval`` steps (>= 1); the starting interval of an
        adaptive refresh.
    stat_interval : int, default 1
        Fold the batch factors into the running averages every ``stat_interval`` steps (>= 1)
        and on every refresh step. ``stat_interval = inv_interval``: statistics only on
        refresh steps (SP-NGD's stale statistics).
    refresh : {"fixed", "adaptive"}, default "fixed"
    refresh_threshold : float, default 0.1
        The relative change below which an adaptive refresh doubles its interval.
    max_interval : int, optional
        The largest adaptive interval (default ``64 * inv_interval``).
    unitwise_bn : bool, default True
        Precondition BatchNorm2d's ``gamma`` and ``beta`` with the unit-wise Fisher (False:
        SGD's step for them).

    Raises
    ------
    ValueError
        A bad setting (:func:`check_kfac_settings`), or a layer with deep reuse, column-row
        sampling or gradient approximation (K-FAC needs its dense products).

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> model = fs.nn.Sequential(fs.nn.Linear(3, 2, rng=0))
    >>> opt = fs.nn.KFAC(model, lr=0.1, momentum=0.0, damping=0.01)
    >>> ctx = fs.nn.Context(fs.nn.Policy.exact())
    >>> lossf = fs.nn.SoftmaxCrossEntropy()
    >>> x, y = np.eye(4, 3), np.array([0, 1, 0, 1])
    >>> loss = lossf(model.forward(x, ctx), y, ctx)
    >>> _ = model.backward(lossf.backward(ctx), ctx)
    >>> opt.step(ctx)
    >>> sorted(k for k in opt.state_dict() if k.startswith("kfac."))
    ['kfac.A.0.linear', 'kfac.Ainv.0.linear', 'kfac.G.0.linear', 'kfac.Ginv.0.linear', \
'kfac.interval', 'kfac.next_refresh', 'kfac.stat_steps']
    >>> opt.state_dict()["kfac.A.0.linear"].shape        # 3 inputs and the bias column
    (4, 4)
    """

    kind = "kfac"

    def __init__(self, model, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                 damping=1e-3, stat_decay=0.95, inv_interval=20, stat_interval=1,
                 refresh="fixed", refresh_threshold=0.1, max_interval=None, unitwise_bn=True):
        layers = _layers_of(model)
        params = {f"{m.name}.{p.name}" if getattr(m, "name", None) else p.name: p
                  for m in layers for p in m.parameters()}
        super().__init__(params, lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay)
        s = check_kfac_settings(damping, stat_decay, inv_interval, stat_interval, refresh,
                                refresh_threshold, max_interval)
        self.damping, self.stat_decay = s["damping"], s["stat_decay"]
        self.inv_interval, self.stat_interval = s["inv_interval"], s["stat_interval"]
        self.refresh, self.refresh_threshold = s["refresh"], s["refresh_threshold"]
        self.max_interval = s["max_interval"]
        self.layers = {}
        #: BatchNorm2d layers preconditioned unit-wise (``unitwise_bn``).
        self.bn_layers = {}
        for m in layers:
            if isinstance(m, (Linear, Conv2d)):
                if not getattr(m, "name", None):
                    raise ValueError("KFAC: every Linear/Conv2d layer needs a name (put the "
                                     "layers in a fixedsim.nn.Sequential)")
                m.kfac_capture = True
                self.layers[m.name] = m
            elif isinstance(m, BatchNorm2d) and unitwise_bn:
                if not getattr(m, "name", None):
                    raise ValueError("KFAC: every BatchNorm2d layer needs a name (put the "
                                     "layers in a fixedsim.nn.Sequential)")
                m.kfac_capture = True
                self.bn_layers[m.name] = m
        #: Running averages and inverses per layer name.
        self.A: dict[str, np.ndarray] = {}
        self.G: dict[str, np.ndarray] = {}
        self.Ainv: dict[str, np.ndarray] = {}
        self.Ginv: dict[str, np.ndarray] = {}
        #: The factors at the last refresh (the adaptive refresh compares with them).
        self.Aref: dict[str, np.ndarray] = {}
        self.Gref: dict[str, np.ndarray] = {}
        #: BatchNorm2d: per channel the 2x2 Fisher of (gamma, beta), its inverse, its value at
        #: the last refresh; shape (C, 2, 2).
        self.F: dict[str, np.ndarray] = {}
        self.Finv: dict[str, np.ndarray] = {}
        self.Fref: dict[str, np.ndarray] = {}
        self.interval = self.inv_interval
        self.next_refresh = 1
        self.stat_steps = 0
        #: The batch factors of the next step, all-reduced over emulated workers
        #: (:func:`fixedsim.nn.parallel.data_parallel_pass` sets them, :meth:`step` uses and
        #: clears them); None: the step computes them from the layers (one worker).
        self.reduced_factors: dict | None = None

    @property
    def damping(self) -> float:
        """The Tikhonov damping (> 0) of the next refresh of the inverses."""
        return self._damping

    @damping.setter
    def damping(self, value):
        self._damping = _number(value, "damping", low=0.0, low_open=True)

    # -- the factors ------------------------------------------------------------------------
    def _product(self, ctx, lname, purpose, a, b, scan=None):
        """``a @ b`` under :meth:`Policy.curvature_spec` (float64); ``scan`` bounds the values
        of ``b`` in a Gram product ``b.T @ b`` (:meth:`_rows_scan`)."""
        spec = ctx.policy.curvature_spec()
        seed = ctx.key(f"optim.{lname}", purpose) if spec.stochastic else 0
        out, c = _matmul(a, b, spec, seed=seed, stats=True, scans=(scan, scan))
        ctx.layer_counters(COUNTER_KEY).products += c
        return np.asarray(out, np.float64)

    def _round_role(self, ctx, role_name, x, lname, purpose):
        role = ctx.policy.curvature_role(role_name)
        if role.fmt is None:
            return np.asarray(x, dtype=np.float64)
        seed = ctx.key(f"optim.{lname}", purpose) if role.stochastic else None
        out, qs = role.apply(x, seed, stats=True)
        ctx.layer_counters(COUNTER_KEY).count_role(role_name, qs)
        return out

    @staticmethod
    def _check_captured(layer, what):
        """Refuse a layer without a kept forward input and output error to build ``what``
        from."""
        if layer._cache is None or layer.kfac_error is None:
            raise ValueError(f"KFAC: layer {layer.name!r} has no forward input or output "
                             f"error to build {what} from (run forward and backward before "
                             "step)")

    @classmethod
    def _check_layer(cls, layer):
        """Refuse a layer without a kept forward input and output error, or with a setting
        that replaces its dense products."""
        cls._check_captured(layer, "its factors")
        for attr in ("reuse", "approx", "grad_approx"):
            if getattr(layer, attr) is not None:
                raise ValueError(f"KFAC: layer {layer.name!r} has a {attr} setting; K-FAC "
                                 f"needs its dense products (set_{attr}(None))")

    @classmethod
    def _rows(cls, layer):
        """``(a, e, n)``: the layer's input rows / patches (bias column appended), its output
        errors as rows (one per example and position) and the batch size N."""
        cls._check_layer(layer)
        xq = np.asarray(layer._cache[0])
        err = np.asarray(layer.kfac_error)
        N = xq.shape[0]
        if isinstance(layer, Conv2d):
            (sh, sw), (ph, pw) = _pair(layer.stride, "stride"), _pair(layer.padding,
                                                                       "padding", 0)
            kh, kw = layer.kernel_size
            Ho, Wo = err.shape[2], err.shape[3]
            a = _im2col(np.ascontiguousarray(xq), kh, kw, (sh, sw), (ph, pw), Ho, Wo,
                        ones=layer.bias is not None)  # the bias column in the same pass
            e = err.transpose(0, 2, 3, 1).reshape(-1, err.shape[1])
        else:
            a, e = xq, err
            if layer.bias is not None:
                a = np.concatenate([a, np.ones((a.shape[0], 1), a.dtype)], axis=1)
        return np.ascontiguousarray(a), np.ascontiguousarray(e), N

    @staticmethod
    def _rows_scan(layer):
        """A scan that bounds the values of the layer's rows ``a`` (:meth:`_rows`): its kept
        input's, and 1's with a bias; an im2col matrix holds only those values and zeros, so
        its scan is the input's, 25 times smaller (a 5 x 5 kernel)."""
        xq = layer._cache[0]
        scans = getattr(layer, "_scans", None)  # a Linear forward pass keeps its input's
        s = scans[0] if scans is not None else _Bits.of(np.asarray(xq))
        return s.union(_ONE) if layer.bias is not None else s

    def batch_factors(self, ctx, grad_scale=1.0, batch=None) -> dict:
        """This step's batch factors from the layers' kept forward inputs and output errors:
        ``{"A.<layer>": A_b, "G.<layer>": G_b, "F.<bn layer>": F_b}`` (float64, the products'
        results as :meth:`Policy.curvature_spec` delivers them, not yet rounded into
        ``curvature``).

        ``batch`` is the global batch size ``B`` the loss gradient was divided by (None: the
        rows the layers hold, one worker). With ``B`` larger than the ``N_w`` rows held (one
        emulated worker's shard, :func:`fixedsim.nn.parallel.data_parallel_pass`), each
        factor is the shard's statistic weighted by ``N_w / B``, so that the sum over the
        workers is the global batch's factor: ``A_w = a_w^T a_w / (B T)`` (``T`` rows per
        example: 1, or ``Ho Wo`` patches), ``G_w = (B / scale^2) E_w^T E_w`` (``E_w`` the
        kept errors, which carry the ``1 / B`` of the loss), ``F_w = V_w^T V_w / B`` (per
        example ``v = B dy / scale``). With ``batch`` None or ``N`` these are the one-worker
        factors, bit for bit."""
        out = {}
        for lname, layer in self.layers.items():
            a, e, N = self._rows(layer)
            B = N if batch is None else int(batch)
            A_b = self._product(ctx, lname, "kfac.A", a.T, a, self._rows_scan(layer)) / (
                a.shape[0] // N * B if N else 1)
            # e holds B * grad_y / scale per row: G = (1/B) sum e e^T = B / scale^2 E^T E
            G_b = self._product(ctx, lname, "kfac.G", e.T, e) * (B / (grad_scale * grad_scale))
            out[f"A.{lname}"], out[f"G.{lname}"] = A_b, G_b
        for lname, layer in self.bn_layers.items():
            V = self._bn_rows(layer, grad_scale, batch)  # (C, N, 2)
            out[f"F.{lname}"] = self._product(ctx, lname, "kfac.F", np.ascontiguousarray(
                V.transpose(0, 2, 1)), V) / (V.shape[1] if batch is None else int(batch))
        return out

    def _factor_names(self) -> list:
        """The keys of :meth:`batch_factors`, in its order."""
        return ([f"{f}.{lname}" for lname in self.layers for f in ("A", "G")]
                + [f"F.{lname}" for lname in self.bn_layers])

    def gathers_statistics(self) -> bool:
        """Whether the next :meth:`step` folds batch factors into the running averages (a
        statistics step or a refresh step): the steps on which an emulated data-parallel
        pass computes and all-reduces the workers' factors."""
        steps = self.steps + 1
        return steps >= self.next_refresh or (steps - 1) % self.stat_interval == 0

    def _update_factors(self, ctx, grad_scale, fb=None):
        """Fold this step's batch factors into the running averages (``curvature``): ``fb``,
        the all-reduced factors of the workers, else :meth:`batch_factors` of the layers."""
        d = self.stat_decay
        first = self.stat_steps == 0
        if fb is None:
            fb = self.batch_factors(ctx, grad_scale)
        for lname in self.layers:
            A_b, G_b = np.asarray(fb[f"A.{lname}"], np.float64), np.asarray(fb[f"G.{lname}"],
                                                                            np.float64)
            if first or lname not in self.A:
                A_new, G_new = A_b, G_b
            else:
                A_new = d * np.asarray(self.A[lname], np.float64) + (1.0 - d) * A_b
                G_new = d * np.asarray(self.G[lname], np.float64) + (1.0 - d) * G_b
            self.A[lname] = self._round_role(ctx, "curvature", A_new, lname, "kfac.A")
            self.G[lname] = self._round_role(ctx, "curvature", G_new, lname, "kfac.G")
        for lname in self.bn_layers:
            F_b = np.asarray(fb[f"F.{lname}"], np.float64)
            F_new = F_b if first or lname not in self.F else (
                d * np.asarray(self.F[lname], np.float64) + (1.0 - d) * F_b)
            self.F[lname] = self._round_role(ctx, "curvature", F_new, lname, "kfac.F")
        self.stat_steps += 1

    @staticmethod
    def _bn_rows(layer, grad_scale, batch=None):
        """Per channel and example, the example's gradient of (gamma, beta): ``B / scale *
        (sum_hw dy * xhat, sum_hw dy)``, shape (C, N, 2) (``B`` the global batch, by default
        the ``N`` rows held)."""
        KFAC._check_captured(layer, "its Fisher")
        xhat = layer._cache[0]
        dy = np.asarray(layer.kfac_error, np.float64)
        N = dy.shape[0] if batch is None else int(batch)
        g = (dy * xhat).sum(axis=(2, 3)) * (N / grad_scale)
        b = dy.sum(axis=(2, 3)) * (N / grad_scale)
        return np.ascontiguousarray(np.stack([g.T, b.T], axis=-1))

    def _invert(self, ctx):
        """The damped inverses (float64 eigendecomposition, rounded into ``inverse``); the
        relative change of the factors since the last refresh (0 at the first)."""
        change = 0.0
        root = math.sqrt(self.damping)
        for lname in self.layers:
            A = np.asarray(self.A[lname], np.float64)
            G = np.asarray(self.G[lname], np.float64)
            for f, F in (("A", A), ("G", G)):
                _check_finite(ctx, F, f"the factor {f} of layer {lname!r}")
            ta, tg = np.trace(A) / A.shape[0], np.trace(G) / G.shape[0]
            pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 and math.isfinite(ta / tg) else 1.0
            self.Ainv[lname] = self._round_role(ctx, "inverse", _damped_inverse(A, pi * root),
                                                lname, "kfac.Ainv")
            self.Ginv[lname] = self._round_role(ctx, "inverse", _damped_inverse(G, root / pi),
                                                lname, "kfac.Ginv")
            if lname in self.Aref:
                change = max(change, _relative_change(A, self.Aref[lname]),
                             _relative_change(G, self.Gref[lname]))
            if self.refresh == "adaptive":
                self.Aref[lname], self.Gref[lname] = self.A[lname], self.G[lname]
        for lname in self.bn_layers:
            F = np.asarray(self.F[lname], np.float64)
            _check_finite(ctx, F, f"the unit-wise Fisher of layer {lname!r}")
            self.Finv[lname] = self._round_role(ctx, "inverse",
                                                _damped_inverse_2x2(F, self.damping), lname,
                                                "kfac.Finv")
            if lname in self.Fref:
                change = max(change, _relative_change(F, self.Fref[lname]))
            if self.refresh == "adaptive":
                self.Fref[lname] = self.F[lname]
        return change

    def _precondition(self, ctx, lname, layer, gw, gb):
        """``A^-1 [dW; db] G^-1`` rounded into ``preconditioned``, as (weight, bias)."""
        conv = isinstance(layer, Conv2d)
        O = gw.shape[0] if conv else gw.shape[1]
        g2 = gw.reshape(O, -1).T if conv else gw
        if gb is not None:
            g2 = np.concatenate([g2, gb.reshape(1, -1)], axis=0)
        t = self._product(ctx, lname, "kfac.precondition.A", self.Ainv[lname],
                          np.ascontiguousarray(g2))
        p = self._product(ctx, lname, "kfac.precondition.G", t, self.Ginv[lname])
        p = np.asarray(self._round_role(ctx, "preconditioned", p, lname, "kfac.precondition"),
                       np.float64)
        pw, pb = (p[:-1], p[-1]) if gb is not None else (p, None)
        pw = np.ascontiguousarray(pw.T).reshape(gw.shape) if conv else pw
        return pw, pb

    def preconditioned(self, ctx: Context, grad_scale: float = 1.0) -> dict:
        """The preconditioned gradients of this step, ``{parameter name: array}`` (the
        K-FAC layers' weights and biases), from the current inverses; what :meth:`step`
        feeds to the SGD update. For inspection and tests: it draws the same random numbers
        as the step and counts its roundings."""
        grad_scale = self._check_step_args(ctx, grad_scale)
        out = {}
        names = {id(p): n for n, p in self.params.items()}
        for lname, layer in self.layers.items():
            w, b = layer.weight, layer.bias
            gw = self._grad(names[id(w)], w, grad_scale)
            gb = self._grad(names[id(b)], b, grad_scale) if b is not None else None
            pw, pb = self._precondition(ctx, lname, layer, gw, gb)
            out[names[id(w)]] = pw
            if b is not None:
                out[names[id(b)]] = pb
        for lname, layer in self.bn_layers.items():
            ng, nb = names[id(layer.gamma)], names[id(layer.beta)]
            g = np.stack([self._grad(ng, layer.gamma, grad_scale),
                          self._grad(nb, layer.beta, grad_scale)], axis=-1)[..., None]
            p = self._product(ctx, lname, "kfac.precondition.F", self.Finv[lname], g)[..., 0]
            p = np.asarray(self._round_role(ctx, "preconditioned", p, lname,
                                            "kfac.precondition"), np.float64)
            out[ng], out[nb] = p[:, 0].copy(), p[:, 1].copy()
        return out

    def step(self, ctx: Context, grad_scale: float = 1.0) -> None:
        """One K-FAC step (see the class docstring); ``grad_scale`` as :meth:`SGD.step`."""
        grad_scale = self._check_step_args(ctx, grad_scale)
        for name, p in self.params.items():
            self._check_grad(name, p)
        for layer in self.layers.values():  # checked before any state changes
            self._check_layer(layer)
        for layer in self.bn_layers.values():
            self._check_captured(layer, "its Fisher")
        gather = self.gathers_statistics()
        reduced, self.reduced_factors = self.reduced_factors, None
        if reduced is not None:
            missing = sorted(set(self._factor_names()) - set(reduced))
            if missing or not gather:
                raise ValueError("KFAC: the all-reduced factors given for this step "
                                 + (f"lack {', '.join(missing)}" if missing else
                                    "are not wanted (no statistics on this step: see "
                                    "gathers_statistics)"))
        self.steps += 1
        refresh = self.steps >= self.next_refresh
        if gather:
            self._update_factors(ctx, grad_scale, reduced)
        if refresh:
            change = self._invert(ctx)
            if self.refresh == "adaptive" and self.steps > 1:
                if change < self.refresh_threshold:
                    self.interval = min(2 * self.interval, self.max_interval)
                else:
                    self.interval = max(self.interval // 2, self.inv_interval)
            self.next_refresh = self.steps + self.interval
        pre = self.preconditioned(ctx, grad_scale)
        for name, p in self.params.items():
            if name not in pre:
                self._update_one(ctx, name, p, grad_scale)
                continue
            g = pre[name]
            g32 = g.astype(np.float32)
            if np.array_equal(g32, g):
                # SGD's update (its one-pass kernel where it serves), fed the preconditioned
                # gradient (float32 holds it exactly): bit for bit as SGD._update with it
                grad, p.grad = p.grad, g32
                try:
                    self._update_one(ctx, name, p, 1.0)
                finally:
                    p.grad = grad
            else:
                self._update(ctx, name, p, g)

    # -- state ------------------------------------------------------------------------------
    _FACTORS = ("A", "G", "Ainv", "Ginv", "Aref", "Gref", "F", "Finv", "Fref")
    _SCALARS = ("interval", "next_refresh", "stat_steps")

    def state_dict(self) -> dict:
        """SGD's state, plus ``kfac.<A|G|Ainv|Ginv>.<layer>`` (copies; with an adaptive
        refresh also ``kfac.<Aref|Gref>.<layer>``, the factors of the last refresh) and the refresh
        state ``kfac.interval``, ``kfac.next_refresh``, ``kfac.stat_steps`` (ints)."""
        d = super().state_dict()
        for f in self._FACTORS:
            for lname, arr in getattr(self, f).items():
                d[f"kfac.{f}.{lname}"] = np.array(arr, copy=True)
        for k in self._SCALARS:
            d[f"kfac.{k}"] = int(getattr(self, k))
        return d

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output exactly (factors, inverses, refresh state)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        rest = {k: v for k, v in state.items() if not str(k).startswith("kfac.")}
        loaded = {f: {} for f in self._FACTORS}
        scalars = {}
        for k, v in state.items():
            if not str(k).startswith("kfac."):
                continue
            key = k[len("kfac."):]
            if key in self._SCALARS:
                scalars[key] = _int(v, f"optimizer state {k!r}", 0)
                continue
            f, _, lname = key.partition(".")
            if f not in loaded or lname not in (self.bn_layers if f.startswith("F")
                                                else self.layers):
                raise ValueError(f"optimizer state: unknown key {k!r} for KFAC over layers "
                                 f"{sorted(self.layers) + sorted(self.bn_layers)}")
            loaded[f][lname] = np.array(v, copy=True)
        missing = [k for k in self._SCALARS if k not in scalars]
        if missing:
            raise ValueError(f"optimizer state lacks {', '.join('kfac.' + k for k in missing)}")
        super().load_state_dict(rest)
        for f in self._FACTORS:
            setattr(self, f, loaded[f])
        for k in self._SCALARS:
            setattr(self, k, scalars[k])

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(name=self.kind, damping=self.damping, stat_decay=self.stat_decay,
                 inv_interval=self.inv_interval, stat_interval=self.stat_interval,
                 refresh=self.refresh, refresh_threshold=self.refresh_threshold,
                 max_interval=self.max_interval, unitwise_bn=bool(self.bn_layers))
        return d


#: The scan of a bias column's ones.
_ONE = _Bits.of(np.ones(1))


def _check_finite(ctx, F, what):
    """Refuse a non-finite factor before it is inverted, naming it (``what``)."""
    if not np.isfinite(F).all():
        raise FloatingPointError(
            f"KFAC: {what} holds non-finite values (inf or NaN: the training diverged, or the "
            f"curvature role's format {ctx.policy.curvature_role('curvature').fmt!r} "
            f"overflowed); lower the learning rate, raise the damping or widen the format")


def _relative_change(new, prev):
    """``||new - prev||_F / ||prev||_F`` (inf for a zero ``prev``): the adaptive refresh's
    measure of how much a factor moved."""
    prev = np.asarray(prev, np.float64)
    norm = np.linalg.norm(prev)
    return np.linalg.norm(new - prev) / norm if norm > 0 else math.inf


def _damped_inverse(F, damping):
    """``(F + damping I)^-1`` in float64 from the eigendecomposition of the symmetric part of
    ``F`` (eigenvalues below zero, from rounding, set to zero)."""
    F = 0.5 * (F + F.T)
    w, Q = np.linalg.eigh(F)
    w = np.maximum(w, 0.0) + damping
    inv = (Q / w) @ Q.T
    return 0.5 * (inv + inv.T)


def _damped_inverse_2x2(F, damping):
    """``(F[c] + damping I)^-1`` for each channel's 2x2 block, by :func:`_damped_inverse`."""
    out = np.empty_like(F)
    for c in range(F.shape[0]):
        out[c] = _damped_inverse(F[c], damping)
    return out
