"""Layers with forward and hand-written backward passes, under a numerics :class:`Policy`.

Every product of a Linear or Conv2d layer goes through :func:`fixedsim.matmul` /
:func:`fixedsim.conv2d` (and their gradient forms) with the policy's spec; every tensor a layer
writes is rounded into its role: outputs into ``activations``, input errors into ``errors``,
parameter gradients into ``weight_grads``. What a layer computes elementwise beyond the
products (bias addition, pooling averages, batch normalisation, softmax) is computed in float64
and rounded once into the role; the bias is added to the exact (or accumulated) product with a
single rounding (:func:`fixedsim.add`). See docs/training.md.

Shapes: Linear takes ``(N, in_features)``; Conv2d, pooling and BatchNorm2d take
``(N, C, H, W)``. Linear's weight is ``(in_features, out_features)`` so that the forward
product is ``x @ W`` with ``K = in_features``; Conv2d's is ``(O, C, kh, kw)``.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from ..blockformats import BlockFormat
from ..matmul import MatmulSpec, conv2d, conv2d_grad_input, conv2d_grad_weight
from ..matmul.api import _matmul, reuse_im2col
from ..matmul.core import _Bits
from ..matmul.engine import im2col as _im2col
from ..rounding import Rounding
from .core import Context, Module, Parameter

__all__ = ["Linear", "Conv2d", "ReLU", "MaxPool2d", "AvgPool2d", "Flatten", "Dropout",
           "BatchNorm2d", "SoftmaxCrossEntropy", "Sequential"]


def _operands_rounded(spec: MatmulSpec) -> MatmulSpec:
    """``spec`` with its input stage removed (the layer rounded the operands itself)."""
    if spec.input is None:
        return spec
    s = dataclasses.replace(spec, input=None, input_rounding=Rounding.NEAREST_EVEN,
                            random_bits=None)
    if spec.random_bits is not None and Rounding.STOCHASTIC in s._stage_roundings():
        s = dataclasses.replace(s, random_bits=spec.random_bits)
    return s


def _check_x(x, ndim, layer):
    x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{layer}: expected a {ndim}-D input, got shape {x.shape}")
    return x


def _count(n, name, low=1):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < low:
        raise ValueError(f"{name} must be an int >= {low}, got {n!r}")
    return int(n)


def _grad_in(layer, grad_y, shape_attr="_out_shape"):
    """``grad_y`` as an array, checked against the shape of the layer's last output.

    A backward pass needs the forward pass's cache, and an error of another shape would
    broadcast silently in the elementwise layers.
    """
    shape = getattr(layer, shape_attr, None)
    kind = type(layer).__name__
    if shape is None:
        raise RuntimeError(f"{kind}: backward before forward (layer {layer.name!r} has no "
                           "cached forward pass)")
    grad_y = np.asarray(grad_y)
    if grad_y.shape != shape:
        raise ValueError(f"{kind}: grad_y must have shape {shape} (the output of layer "
                         f"{layer.name!r}), got {grad_y.shape}")
    return grad_y


class _Product(Module):
    """Shared machinery of Linear and Conv2d: weight, optional bias, rounded operand copies,
    Adaptive Deep Reuse of the forward product when ``reuse`` is set, and column-row sampling
    of the products selected by ``approx`` (training passes only)."""

    #: The layer's :class:`fixedsim.reuse.Reuse` setting (None: dense products).
    reuse = None
    #: The layer's :class:`fixedsim.approx.Approx` setting (None: no sampling).
    approx = None
    _approxed = None
    #: The layer's :class:`fixedsim.approx.GradApprox` setting (None: exact gradients).
    grad_approx = None
    #: The last weight gradient computed under a ``"stale"`` gradient approximation.
    stale_grad = None
    #: Keep the output error of each backward pass in :attr:`kfac_error` (set by
    #: :class:`fixedsim.nn.KFAC`, whose Kronecker factor G is that error's covariance).
    kfac_capture = False
    #: The ``grad_y`` of the last backward pass (a reference, not a copy) while
    #: :attr:`kfac_capture` is set; K-FAC's factor A is built from the forward input the
    #: layer keeps anyway (``_cache[0]``).
    kfac_error = None

    def __init__(self, weight_shape, fan_in, bias, rng):
        rng = np.random.default_rng(rng)
        bound = math.sqrt(6.0 / fan_in)  # He et al. 2015, uniform form, for ReLU networks
        self.weight = Parameter("weight", rng.uniform(-bound, bound, weight_shape))
        self.bias = Parameter("bias", np.zeros(weight_shape[0] if len(weight_shape) == 4
                                               else weight_shape[1])) if bias else None
        self._cache = None
        self._scans = None  # a Linear forward pass's operand scans (its backward reads them)

    def parameters(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def _forward_operands(self, x, ctx):
        spec = ctx.policy.forward
        if isinstance(spec.input, BlockFormat):  # blocks along K: the product rounds them
            if self.reuse is not None:
                raise ValueError(f"{self.name}: deep reuse clusters operands rounded "
                                 f"element by element; the block format {spec.input!r} "
                                 "rounds them in blocks along K inside the product")
            return x, self.weight.value, spec
        xq = ctx.round_operand(spec, x, self.name, "forward.x")
        wq = ctx.round_operand(spec, self.weight.value, self.name, "forward.w")
        return xq, wq, _operands_rounded(spec)

    #: The per-layer settings that exclude one another: attribute -> what it is.
    _EXCLUSIVE = {"reuse": "deep reuse", "approx": "column-row sampling",
                  "grad_approx": "gradient approximation"}

    def _alone(self, attr, value) -> None:
        """Refuse ``value`` (not None) for the setting ``attr`` while another setting of
        :attr:`_EXCLUSIVE` is set on the layer, naming it and how to remove it."""
        if value is None:
            return
        for other, what in self._EXCLUSIVE.items():
            held = getattr(self, other)
            if other != attr and held is not None:
                raise ValueError(f"{self.name}: {self._EXCLUSIVE[attr]} and {what} ({held}) "
                                 f"cannot both be set on one layer; remove one "
                                 f"(set_{other}(None))")

    def set_reuse(self, reuse) -> None:
        """Set (or with None, remove) the layer's :class:`fixedsim.reuse.Reuse` setting.

        A cross-batch setting keeps its :class:`fixedsim.reuse.ReuseTable` while the scope
        stays cross-batch with the same ``L`` and ``H``; any other change empties it.
        Evaluation passes (``ctx.training`` False) use a table of their own,
        ``reuse_eval_table``, so that test data never reach the centroids training uses.
        """
        from ..reuse import Reuse, ReuseTable

        if reuse is not None and not isinstance(reuse, Reuse):
            raise TypeError(f"reuse must be a fixedsim.reuse.Reuse or None, got {reuse!r}")
        self._alone("reuse", reuse)
        old = self.reuse
        keep = (reuse is not None and old is not None and reuse.scope == "cross_batch"
                and old.scope == "cross_batch" and (reuse.L, reuse.H) == (old.L, old.H))
        if not keep:
            cross = reuse is not None and reuse.scope == "cross_batch"
            self.reuse_table = ReuseTable() if cross else None
            self.reuse_eval_table = ReuseTable() if cross else None
        self.reuse = reuse

    def set_approx(self, approx) -> None:
        """Set (or with None, remove) the layer's :class:`fixedsim.approx.Approx` setting.

        Its products are sampled in training passes (``ctx.training``); evaluation passes
        compute them exactly. Not together with a reuse setting.
        """
        from ..approx import Approx

        if approx is not None and not isinstance(approx, Approx):
            raise TypeError(f"approx must be a fixedsim.approx.Approx or None, got {approx!r}")
        self._alone("approx", approx)
        self.approx = approx

    def set_grad_approx(self, grad_approx) -> None:
        """Set (or with None, remove) the layer's :class:`fixedsim.approx.GradApprox` setting.

        Acts on training backward passes (:mod:`fixedsim.approx.grad`); not together with a
        reuse or a column-row sampling setting. Setting it (or None) forgets the stored stale
        weight gradient.
        """
        from ..approx import GradApprox

        if grad_approx is not None and not isinstance(grad_approx, GradApprox):
            raise TypeError(f"grad_approx must be a fixedsim.approx.GradApprox or None, got "
                            f"{grad_approx!r}")
        self._alone("grad_approx", grad_approx)
        self.grad_approx = grad_approx
        self.stale_grad = None

    def _approx_error(self, grad_y, ctx):
        """``grad_y`` as the backward products use it: the gradient approximation's sparse
        error (``"topk"``/``"random"``), else unchanged."""
        if self.grad_approx is None or not ctx.training:
            return grad_y
        from ..approx.grad import approximate_error

        return approximate_error(self, grad_y, ctx)

    def _weight_grad(self, compute, ctx, K, G_size, need_input_grad):
        """Set ``weight.grad`` from ``compute()`` (the unrounded product), or, on the steps a
        ``"stale"`` setting skips, from the stored gradient; counts the gradient
        approximation's backward MACs."""
        ga = self.grad_approx if ctx.training else None
        if ga is None:
            self.weight.grad = ctx.round("weight_grads", compute(), self.name)
            return
        from ..approx import grad as _ga

        a = ctx.layer_counters(self.name).approx
        dense = G_size * K
        if ga.method == "stale":
            if _ga.stale_step(self, ctx):
                self.weight.grad = self.stale_grad.copy()
                a.add("grad_weight", pairs=0, kept=0, macs=0, dense_macs=dense)
            else:
                self.weight.grad = ctx.round("weight_grads", compute(), self.name)
                self.stale_grad = self.weight.grad.copy()
                a.add("grad_weight", pairs=0, kept=0, macs=dense, dense_macs=dense)
            if need_input_grad:
                a.add("grad_input", pairs=0, kept=0, macs=dense, dense_macs=dense)
            return
        self.weight.grad = ctx.round("weight_grads", compute(), self.name)
        _ga.count_product(self, ctx, "grad_weight", G_size, K)
        if need_input_grad:
            _ga.count_product(self, ctx, "grad_input", G_size, K)

    def _approx_setting(self, ctx):
        """The sampling setting of this pass (None in evaluation)."""
        self._approxed = self.approx if ctx.training else None
        return self._approxed

    def _reuse_forward(self, X2d, W2d, spec, ctx, groups):
        """The forward product ``X2d @ W2d`` through :func:`fixedsim.reuse.reuse_matmul`."""
        from ..reuse import reuse_matmul

        r = self.reuse
        original = ctx.policy.forward
        centroid_fmt = original.input if original.input is not None else \
            ctx.policy.activations.fmt
        table = None
        if r.scope == "cross_batch":
            table = self.reuse_table if ctx.training else self.reuse_eval_table
        y, st = reuse_matmul(
            X2d, W2d, r.L, r.H, seed=ctx.run_key(self.name, "reuse"), spec=spec,
            groups=groups if r.scope == "input" else None, table=table,
            weights_key=None if ctx.training else (self.weight.value, spec),
            centroid_format=centroid_fmt,
            product_seed=ctx.key(self.name, "forward") if spec.stochastic else 0)
        lc = ctx.layer_counters(self.name)
        lc.products += st.counters
        lc.reuse.add_stats(st)
        self._clustering = st.clustering
        return y

    def _reuse_backward(self, G, W2d, ctx, need_input_grad):
        """Weight gradient (over the clusters) and, when asked, the input gradient through
        the centroids, of the reused forward product; returns ``(dW2d, dX2d or None)``."""
        from ..formats import FP32, FloatFormat
        from ..reuse import reuse_grad_input, reuse_grad_weight

        p, cl = ctx.policy, self._clustering
        lc = ctx.layer_counters(self.name)
        dense = cl.rows * cl.K * G.shape[1]
        # float errors: the cluster sums are held in FP32 (sums of fixed-point errors are
        # exact in float64 and kept so)
        sf = FP32 if isinstance(p.errors.fmt, FloatFormat) else None
        dW, c = reuse_grad_weight(cl, G, p.grad_weight, seed=ctx.key(self.name, "grad_weight"),
                                  sum_format=sf)
        lc.products += c
        lc.reuse.backward_macs += c.macs
        lc.reuse.backward_dense_macs += dense
        dX = None
        if need_input_grad and self._reused.input_grad == "centroid":
            dX, c = reuse_grad_input(cl, G, W2d, p.grad_input,
                                     seed=ctx.key(self.name, "grad_input"), sum_format=sf)
            lc.products += c
            lc.reuse.backward_macs += c.macs
            lc.reuse.backward_dense_macs += dense
        return dW, dX

    def _finish_forward(self, z, bias_view, ctx):
        if self.bias is None:
            return ctx.round("activations", z, self.name)
        return ctx.add_into("activations", z, bias_view, self.name, "activations")

    def _bias_grad(self, g2d, ctx, scan=None):
        """Bias gradient: the column sums of ``g2d`` as a product with a row of ones, so they
        pass through the weight-gradient accumulator like every other gradient (``scan``:
        ``g2d``'s operand scan, when the caller holds it)."""
        ones = np.ones((1, g2d.shape[0]))
        db = ctx.product(_matmul, ctx.policy.grad_weight, self.name, "grad_bias", ones, g2d,
                         scans=(None, scan))
        self.bias.grad = ctx.round("weight_grads", db.reshape(-1), self.name, "grad_bias")


class Linear(_Product):
    """``y = x @ W + b``, W of shape ``(in_features, out_features)``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    rng : int or numpy.random.Generator, optional
        Initialisation: W uniform in ``+-sqrt(6 / in_features)`` (He), b zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None):
        self.in_features = _count(in_features, "Linear in_features")
        self.out_features = _count(out_features, "Linear out_features")
        super().__init__((self.in_features, self.out_features), self.in_features, bias, rng)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"

    def forward(self, x, ctx: Context):
        x = _check_x(x, 2, "Linear")
        if x.shape[1] != self.in_features:
            raise ValueError(f"Linear: expected {self.in_features} input features, "
                             f"got shape {x.shape}")
        xq, wq, spec = self._forward_operands(x, ctx)
        self._reused = self.reuse  # the setting of this forward pass, for its backward
        self._scans = None
        ap = self._approx_setting(ctx)
        if self._reused:
            z = self._reuse_forward(xq, wq, spec, ctx, np.arange(len(xq)))
        elif ap is not None and "forward" in ap.products:
            from ..approx.layers import linear_forward

            z = linear_forward(self, xq, wq, spec, ctx)
        else:
            # the operands are kept for the backward pass: each is scanned once, here, for
            # the three products (the scan of a transpose is the scan of its array), where
            # the products read scans (operands as they are, not rounded in blocks)
            if spec.input is None:
                self._scans = (_Bits.of(xq), _Bits.of(wq))
            z = ctx.product(_matmul, spec, self.name, "forward", xq, wq,
                            scans=self._scans or (None, None))
        self._cache = (xq, wq)
        self._out_shape = z.shape
        return self._finish_forward(z, None if self.bias is None else self.bias.value, ctx)

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = True):
        grad_y = _grad_in(self, grad_y)
        if self.kfac_capture:
            self.kfac_error = grad_y
        xq, wq = self._cache
        p = ctx.policy
        dx = None
        grad_y = self._approx_error(grad_y, ctx)
        bx = bw = bg = None  # operand scans: of the forward pass's operands, of the error
        if self._reused:
            dw, dx = self._reuse_backward(grad_y, wq, ctx, need_input_grad)
        elif self._approxed is not None:
            from ..approx.layers import linear_backward

            dw, dx = linear_backward(self, grad_y, xq, wq, ctx, need_input_grad)
        else:
            if self._scans is not None:
                bx, bw = self._scans
                if p.grad_weight.input is None or p.grad_input.input is None:  # read there
                    bg = _Bits.of(grad_y)  # the error's scan, for its three products
            self._weight_grad(lambda: ctx.product(_matmul, p.grad_weight, self.name,
                                                  "grad_weight", xq.T, grad_y,
                                                  scans=(bx, bg)),
                              ctx, self.in_features, grad_y.size, need_input_grad)
            dw = None
        if dw is not None:
            self.weight.grad = ctx.round("weight_grads", dw, self.name)
        if self.bias is not None:
            self._bias_grad(grad_y, ctx, bg)
        if not need_input_grad:
            return None
        if dx is None:
            dx = ctx.product(_matmul, p.grad_input, self.name, "grad_input", grad_y, wq.T,
                             scans=(bg, bw))
        return ctx.round("errors", dx, self.name)


class Conv2d(_Product):
    """2-D convolution (cross-correlation) with zero padding; K order (channel, row, column).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    stride, padding : int or (int, int)
    bias : bool, default True
    rng : int or numpy.random.Generator, optional
        Initialisation: uniform in ``+-sqrt(6 / (C * kh * kw))`` (He), bias zero.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, rng=None):
        self.in_channels = _count(in_channels, "Conv2d in_channels")
        self.out_channels = _count(out_channels, "Conv2d out_channels")
        kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else kernel_size
        self.kernel_size = (_count(kh, "Conv2d kernel_size"), _count(kw, "Conv2d kernel_size"))
        _pair(stride, "Conv2d stride")
        _pair(padding, "Conv2d padding", low=0)
        self.stride, self.padding = stride, padding
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        super().__init__(shape, self.in_channels * kh * kw, bias, rng)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")

    def forward(self, x, ctx: Context):
        x = _check_x(x, 4, "Conv2d")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d: expected {self.in_channels} input channels, "
                             f"got shape {x.shape}")
        xq, wq, spec = self._forward_operands(x, ctx)
        self._reused = self.reuse  # the setting of this forward pass, for its backward
        ap = self._approx_setting(ctx)
        if self._reused:
            z = self._conv_reuse_forward(xq, wq, spec, ctx)
        elif ap is not None and "forward" in ap.products:
            from ..approx.layers import conv_forward

            z = conv_forward(self, xq, wq, spec, ctx)
        else:
            # in training the im2col matrix is kept for the weight gradient (bit-checked)
            self._cols = {} if ctx.training else None
            with reuse_im2col(self._cols):
                z = ctx.product(conv2d, spec, self.name, "forward", xq, wq, stride=self.stride,
                                padding=self.padding)
        self._cache = (xq, wq)
        self._out_shape = z.shape
        b = None if self.bias is None else self.bias.value.reshape(1, -1, 1, 1)
        return self._finish_forward(z, b, ctx)

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = True):
        grad_y = _grad_in(self, grad_y)
        if self.kfac_capture:
            self.kfac_error = grad_y
        xq, wq = self._cache
        p = ctx.policy
        kw = dict(stride=self.stride, padding=self.padding)
        C, kh, kw_ = wq.shape[1:]
        grad_y = self._approx_error(grad_y, ctx)
        G = grad_y.transpose(0, 2, 3, 1).reshape(-1, grad_y.shape[1])
        dx = None
        if self._reused:
            W2d = np.ascontiguousarray(wq.reshape(wq.shape[0], -1).T)
            dW2d, dcols = self._reuse_backward(G, W2d, ctx, need_input_grad)
            dw = np.ascontiguousarray(dW2d.T).reshape(wq.shape)
            if dcols is not None:
                dx = _col2im(dcols, xq.shape, self.kernel_size, self.stride, self.padding)
        elif self._approxed is not None:
            from ..approx.layers import conv_backward

            dw, dx = conv_backward(self, grad_y, xq, wq, ctx, need_input_grad)
        else:
            with reuse_im2col(getattr(self, "_cols", None)):
                self._weight_grad(lambda: ctx.product(conv2d_grad_weight, p.grad_weight,
                                                      self.name, "grad_weight", xq, grad_y,
                                                      wq.shape, **kw),
                                  ctx, C * kh * kw_, grad_y.size, need_input_grad)
            self._cols = None  # the matrix is not needed again
            dw = None
        if dw is not None:
            self.weight.grad = ctx.round("weight_grads", dw, self.name)
        if self.bias is not None:
            self._bias_grad(G, ctx)
        if not need_input_grad:
            return None
        if dx is None:
            dx = ctx.product(conv2d_grad_input, p.grad_input, self.name, "grad_input", grad_y,
                             wq, xq.shape, **kw)
        return ctx.round("errors", dx, self.name)

    def _conv_reuse_forward(self, xq, wq, spec, ctx):
        """Forward convolution as a reused product of the im2col matrix (rows (n, ho, wo))."""
        (sh, sw), (ph, pw) = _pair(self.stride, "stride"), _pair(self.padding, "padding", 0)
        N, _, H, W = xq.shape
        kh, kw = self.kernel_size
        Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        if Ho < 1 or Wo < 1:
            raise ValueError(f"Conv2d: a {kh}x{kw} kernel does not fit the {H}x{W} input")
        cols = _im2col(xq, kh, kw, (sh, sw), (ph, pw), Ho, Wo)
        W2d = np.ascontiguousarray(wq.reshape(wq.shape[0], -1).T)
        groups = np.repeat(np.arange(N), Ho * Wo)
        y = self._reuse_forward(cols, W2d, spec, ctx, groups)
        return np.ascontiguousarray(y.reshape(N, Ho, Wo, -1).transpose(0, 3, 1, 2))


def _col2im(cols, x_shape, kernel_size, stride, padding):
    """The adjoint of im2col: patch errors summed (float64) back onto the input grid."""
    from ..jit.conv import col2im

    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding", 0)
    dx = np.zeros(x_shape)
    col2im(np.ascontiguousarray(cols, np.float64), *kernel_size, sh, sw, ph, pw, dx)
    return dx


class ReLU(Module):
    """``max(x, 0)``; exact in every format, so nothing is rounded. NaN stays NaN, so that a
    diverging network is seen rather than hidden."""

    def forward(self, x, ctx: Context):
        x = np.asarray(x)
        self._out_shape = x.shape
        if x.dtype in (np.float32, np.float64) and x.size:  # one pass (fixedsim.jit.pool)
            from ..jit.pool import relu_forward

            out = np.empty(x.shape, x.dtype)
            self._mask = np.empty(x.shape, np.bool_)
            relu_forward(np.ascontiguousarray(x).reshape(-1), out.reshape(-1),
                         self._mask.reshape(-1))
            return out
        self._mask = ~(x <= 0)  # positive values and NaN pass
        return np.where(self._mask, x, np.zeros((), x.dtype))

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = True):
        grad_y = _grad_in(self, grad_y)
        if grad_y.dtype in (np.float32, np.float64) and grad_y.size:
            from ..jit.pool import relu_backward

            out = np.empty(grad_y.shape, grad_y.dtype)
            relu_backward(np.ascontiguousarray(grad_y).reshape(-1), self._mask.reshape(-1),
                          out.reshape(-1))
            return out
        return np.where(self._mask, grad_y, np.zeros((), grad_y.dtype))


class Flatten(Module):
    """``(N, ...)`` to ``(N, prod(...))``, row-major."""

    def forward(self, x, ctx: Context):
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError("Flatten: expected an input with a batch axis, got a scalar")
        self._shape = x.shape
        y = x.reshape(x.shape[0], -1)
        self._out_shape = y.shape
        return y

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = True):
        return _grad_in(self, grad_y).reshape(self._shape)


def _windows(x, k, s):
    """View ``(N, C, Ho, Wo, kh, kw)`` of the pooling windows of ``x``."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw) = k, s
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"pooling window {k} larger than the input {(H, W)}")
    st = x.strides
    return np.lib.stride_tricks.as_strided(
        x, (N, C, Ho, Wo, kh, kw), (st[0], st[1], st[2] * sh, st[3] * sw, st[2], st[3]),
        writeable=False)


def _pair(v, name, low=1):
    v = (v, v) if np.isscalar(v) else tuple(v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return _count(v[0], name, low), _count(v[1], name, low)


class _Pool(Module):
    def __init__(self, kernel_size, stride=None):
        self.kernel_size = _pair(kernel_size, f"{type(self).__name__} kernel_size")
        self.stride = _pair(stride if stride is not None else kernel_size,
                            f"{type(self).__name__} stride")

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"

    def _spread(self, g, shape, dtype):
        """Sum window contributions ``g`` (N, C, Ho, Wo, kh, kw) back onto the input grid."""
        N, C, Ho, Wo, kh, kw = g.shape
        (sh, sw) = self.stride
        dx = np.zeros(shape, np.float64)
        for i in range(kh):
            for j in range(kw):
                dx[:, :, i:i + sh * (Ho - 1) + 1:sh, j:j + sw * (Wo - 1) + 1:sw] += g[..., i, j]
        return dx

    @property
    def _overlap(self):
        return self.stride[0] < self.kernel_size[0] or self.stride[1] < self.kernel_size[1]


class MaxPool2d(_Pool):
    """Maximum over each window (stride defaults to the window size); exact.

    Backward routes each output error to the first maximal input of its window (row-major);
    where windows overlap, the errors an input receives are summed and rounded into ``errors``.
    """

    def forward(self, x, ctx: Context):
        from ..jit.pool import maxpool_forward

        x = np.ascontiguousarray(_check_x(x, 4, "MaxPool2d"))
        win = _windows(x, self.kernel_size, self.stride)
        shape = win.shape[:4]
        self._shape, self._dtype = x.shape, x.dtype
        self._out_shape = shape
        if x.dtype in (np.float32, np.float64):
            out = np.empty(shape, x.dtype)
            self._arg = np.empty(shape, np.int64)
            maxpool_forward(x, *self.kernel_size, *self.stride, out, self._arg)
            return out
        flat = win.reshape(*shape, -1)  # other dtypes: numpy, the same rule
        self._arg = flat.argmax(axis=-1)
        return np.take_along_axis(flat, self._arg[..., None], -1)[..., 0]

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = True):
        from ..jit.pool import maxpool_route

        grad_y = _grad_in(self, grad_y)
        kh, kw = self.kernel_size
        if not self._overlap:  # in grad_y's float dtype (each value exact in it)
            dt = grad_y.dtype if grad_y.dtype in (np.float32, np.float64) else np.float64
            dx = np.empty(self._shape, dt)
            maxpool_route(np.ascontiguousarray(grad_y, dt), self._arg, kw, *self.stride, dx)
            return dx.astype(grad_y.dtype, copy=False)
        g = np.zeros((*grad_y.shape, kh * kw), np.float64)
        np.put_along_axis(g, self._arg[..., None], grad_y[..., None], -1)
        dx = self._spread(g.reshape(*grad_y.shape, kh, kw), self._shape, grad_y.dtype)
        return ctx.round("errors", dx, self.name)


class AvgPool2d(_Pool):
    """Mean over each window, computed in float64 and rounded once into ``activations``."""

    def forward(self, x, ctx: Context):
        x = np.ascontiguousarray(_check_x(x, 4, "AvgPool2d"))
        self._shape = x.shape
        win = _windows(x.astype(np.float64), self.kernel_size, self.stride)
        self._out_shape = win.shape[:4]
        return ctx.round("activations", win.mean(axis=(-2, -1)), self.name)

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = True):
        grad_y = _grad_in(self, grad_y)
        kh, kw = self.kernel_size
        g = np.broadcast_to((grad_y.astype(np.float64) / (kh * kw))[..., None, None],
                            (*grad_y.shape, kh, kw))
        return ctx.round("errors", self._spread(g, self._shape, grad_y.dtype), self.name)


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale the
    rest by ``1 / (1 - p)`` (rounded into ``activations``); the identity in evaluation.

    The mask is drawn from the step's random stream (``Context.key(name, "dropout")``).
    """

    def __init__(self, p: float = 0.5):
        if not (isinstance(p, (int, float)) and 0 <= p < 1):
            raise ValueError(f"Dropout p must be in [0, 1), got {p!r}")
        self.p = float(p)

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x, ctx: Context):
        x = np.asarray(x)
        self._out_shape = x.shape
        if not ctx.training or self.p == 0:
            self._mask = None
            return x
        rng = np.random.default_rng(ctx.key(self.name, "dropout"))
        self._mask = rng.random(x.shape) >= self.p
        # in float64, then one rounding (x / (1 - p) of a float32 x would round twice)
        xs = np.asarray(x, np.float64) / (1 - self.p)
        return ctx.round("activations", np.where(self._mask, xs, 0.0), self.name)

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = True):
        grad_y = _grad_in(self, grad_y)
        if self._mask is None:
            return grad_y
        gs = np.asarray(grad_y, np.float64) / (1 - self.p)
        return ctx.round("errors", np.where(self._mask, gs, 0.0), self.name)


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel (Ioffe and Szegedy 2015).

    Statistics, normalisation and the affine map are computed in float64 and rounded once
    into ``activations``; in evaluation the running mean and (unbiased) variance are used.

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    momentum : float, default 0.1
        ``running = (1 - momentum) * running + momentum * batch`` (float64 buffers).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        self.num_features = _count(num_features, "BatchNorm2d num_features")
        self.eps, self.momentum = float(eps), float(momentum)
        self.gamma = Parameter("gamma", np.ones(self.num_features))
        self.beta = Parameter("beta", np.zeros(self.num_features))
        self.running_mean = np.zeros(self.num_features)
        self.running_var = np.ones(self.num_features)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def parameters(self):
        return [self.gamma, self.beta]

    def buffers(self) -> dict:
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    #: Keep the output error of each backward pass in :attr:`kfac_error` (set by
    #: :class:`fixedsim.nn.KFAC`, whose unit-wise Fisher of gamma and beta is built from it and
    #: the normalised input the layer keeps anyway).
    kfac_capture = False
    kfac_error = None

    def forward(self, x, ctx: Context):
        x = _check_x(x, 4, "BatchNorm2d").astype(np.float64)
        if x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d: expected {self.num_features} channels, "
                             f"got shape {x.shape}")
        g = self.gamma.value.astype(np.float64).reshape(1, -1, 1, 1)
        b = self.beta.value.astype(np.float64).reshape(1, -1, 1, 1)
        if ctx.training:
            mean = x.mean(axis=(0, 2, 3))
            var = x.var(axis=(0, 2, 3))
            m = x.size // x.shape[1]
            self.running_mean[:] = (1 - self.momentum) * self.running_mean + self.momentum * mean
            self.running_var[:] = ((1 - self.momentum) * self.running_var
                                   + self.momentum * var * m / max(m - 1, 1))
        else:
            mean, var = self.running_mean, self.running_var
        inv = 1.0 / np.sqrt(var + self.eps)
        xhat = (x - mean.reshape(1, -1, 1, 1)) * inv.reshape(1, -1, 1, 1)
        self._cache = (xhat, inv, bool(ctx.training))
        self._out_shape = xhat.shape
        return ctx.round("activations", g * xhat + b, self.name)

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = True):
        grad_y = _grad_in(self, grad_y)
        if self.kfac_capture:
            self.kfac_error = grad_y
        xhat, inv, batch_stats = self._cache
        dy = grad_y.astype(np.float64)
        self.gamma.grad = ctx.round("weight_grads", (dy * xhat).sum(axis=(0, 2, 3)), self.name,
                                    "grad_gamma")
        self.beta.grad = ctx.round("weight_grads", dy.sum(axis=(0, 2, 3)), self.name,
                                   "grad_beta")
        if not need_input_grad:
            return None
        g = self.gamma.value.astype(np.float64).reshape(1, -1, 1, 1)
        dxhat = dy * g
        if batch_stats:  # the batch mean and variance depend on x too
            mean_d = dxhat.mean(axis=(0, 2, 3), keepdims=True)
            mean_dx = (dxhat * xhat).mean(axis=(0, 2, 3), keepdims=True)
            dx = (dxhat - mean_d - xhat * mean_dx) * inv.reshape(1, -1, 1, 1)
        else:  # running statistics: an affine map of x
            dx = dxhat * inv.reshape(1, -1, 1, 1)
        return ctx.round("errors", dx, self.name)


class SoftmaxCrossEntropy(Module):
    """Mean softmax cross-entropy of logits ``(N, classes)`` against integer labels or target
    distributions.

    The loss and the softmax are computed in float64 (log-sum-exp shifted by the row maximum).
    The labels are ``N`` integers in ``[0, classes)`` or an ``(N, classes)`` float array of
    target distributions (soft targets: each row non-negative, summing to 1 within 1e-9;
    :func:`fixedsim.nn.mixup.mix_batch` makes them), for which the loss is ``-sum(target *
    log softmax)`` and the error ``softmax - target``; one-hot rows give the integer labels'
    loss and error bit for bit (without label smoothing; with it, to the last bits).
    ``backward`` returns ``loss_scale * (softmax - onehot) / N`` rounded into ``errors``;
    ``backward(ctx, scale, batch=B)`` divides by ``B`` instead of the rows of this batch (a
    data-parallel worker's shard of a global batch of ``B``: its error is its share of the
    global mean, docs/parallel.md).

    Parameters
    ----------
    label_smoothing : float, default 0.0
        ``eps`` in [0, 1): the target is ``(1 - eps) * onehot + eps / classes`` (Szegedy et
        al., CVPR 2016), so the loss is ``-sum(target * log softmax)`` and the error
        ``softmax - target``; 0 is the plain cross-entropy, computed as before. With soft
        targets ``T`` the target is ``(1 - eps) * T + eps / classes``.
    """

    name = "loss"

    def __init__(self, label_smoothing: float = 0.0):
        ls = label_smoothing
        if (isinstance(ls, bool) or not isinstance(ls, (int, float, np.integer, np.floating))
                or not 0 <= ls < 1):
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {ls!r}")
        self.label_smoothing = float(ls)

    def forward(self, logits, labels, ctx: Context) -> float:
        z = _check_x(logits, 2, "SoftmaxCrossEntropy").astype(np.float64)
        labels = np.asarray(labels)
        soft = labels.ndim == 2
        if soft:
            labels = _check_targets(labels, z.shape)
        elif labels.shape != (z.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"SoftmaxCrossEntropy: labels must be {z.shape[0]} integers or a "
                             f"({z.shape[0]}, {z.shape[1]}) float array of target "
                             f"distributions, got {labels.dtype} of shape {labels.shape}")
        elif labels.size and (labels.min() < 0 or labels.max() >= z.shape[1]):
            raise ValueError(f"SoftmaxCrossEntropy: labels must lie in [0, {z.shape[1]})")
        zmax = z.max(axis=1, keepdims=True)
        e = np.exp(z - zmax)
        s = e.sum(axis=1, keepdims=True)
        logp = z - zmax - np.log(s)
        self._p = e / s
        ls = self.label_smoothing
        if soft:  # kept smoothed: backward's error is softmax - target
            self._labels = (1.0 - ls) * labels + ls / z.shape[1] if ls else labels
            return float(-(self._labels * logp).sum(axis=1).mean())
        self._labels = labels
        if ls:
            return float(-((1.0 - ls) * logp[np.arange(z.shape[0]), labels]
                           + ls * logp.mean(axis=1)).mean())
        return float(-logp[np.arange(z.shape[0]), labels].mean())

    def __call__(self, logits, labels, ctx: Context) -> float:
        return self.forward(logits, labels, ctx)

    def backward(self, ctx: Context, scale: float = 1.0, batch: int | None = None):
        if getattr(self, "_p", None) is None:
            raise RuntimeError("SoftmaxCrossEntropy: backward before forward")
        ls = self.label_smoothing
        if self._labels.ndim == 2:  # target distributions, label smoothing applied
            g = self._p - self._labels
        else:
            g = self._p - ls / self._p.shape[1] if ls else self._p.copy()
            g[np.arange(g.shape[0]), self._labels] -= 1.0 - ls
        return ctx.round("errors", g * (scale / (g.shape[0] if batch is None else batch)),
                         self.name)


def _check_targets(T, shape) -> np.ndarray:
    """Soft targets as float64 ``shape`` rows of non-negative numbers summing to 1 (1e-9),
    else ValueError saying which rule the first bad row breaks."""
    if T.shape != tuple(shape) or not np.issubdtype(T.dtype, np.floating):
        raise ValueError(f"SoftmaxCrossEntropy: target distributions must be a {shape} float "
                         f"array, got {T.dtype} of shape {T.shape}")
    T = np.asarray(T, np.float64)
    bad = ~np.isfinite(T).all(axis=1) | (T < 0).any(axis=1) | (np.abs(T.sum(axis=1) - 1) > 1e-9)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"SoftmaxCrossEntropy: target row {i} is not a distribution (finite, "
                         f">= 0, summing to 1): {T[i].tolist()}")
    return T


class Sequential(Module):
    """Layers applied in order; names them ``"0.conv2d"``, ``"1.relu"``, ...

    The input is rounded into ``activations`` first. ``backward`` runs the layers in reverse
    down to the first layer with parameters (:attr:`first_trained`) and skips that layer's
    input gradient: nothing needs it (an MLP's first Linear after a Flatten computes no input
    gradient), unless the caller asks for the model's input gradient.
    """

    def __init__(self, *layers: Module):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {i} is not a fixedsim.nn layer: {layer!r}")
            layer.name = f"{i}.{type(layer).__name__.lower()}"
        self.layers = list(layers)

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    @property
    def first_trained(self) -> int:
        """The index of the first layer with parameters (the number of layers when none has
        any): a backward pass that does not return the model's input gradient stops there,
        without that layer's input gradient."""
        return next((i for i, layer in enumerate(self.layers) if layer.parameters()),
                    len(self.layers))

    def named_parameters(self) -> dict:
        return {f"{layer.name}.{p.name}": p for layer in self.layers
                for p in layer.parameters()}

    def buffers(self) -> dict:
        return {f"{layer.name}.{k}": v for layer in self.layers
                if hasattr(layer, "buffers") for k, v in layer.buffers().items()}

    def forward(self, x, ctx: Context):
        x = ctx.round("activations", x, "input")
        for layer in self.layers:
            t0 = time.perf_counter()
            x = layer.forward(x, ctx)
            ctx.layer_counters(layer.name).forward_seconds += time.perf_counter() - t0
        return x

    def backward(self, grad_y, ctx: Context, need_input_grad: bool = False):
        g = grad_y
        first = 0 if need_input_grad else self.first_trained
        for i in range(len(self.layers) - 1, first - 1, -1):
            t0 = time.perf_counter()
            layer = self.layers[i]
            g = layer.backward(g, ctx, need_input_grad=need_input_grad or i > first)
            ctx.layer_counters(layer.name).backward_seconds += time.perf_counter() - t0
        return g

    def __repr__(self):
        inner = "\n".join(f"  ({layer.name}) {layer!r}" for layer in self.layers)
        return f"Sequential(\n{inner}\n)"
