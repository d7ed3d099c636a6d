"""Sampled products of a Linear or Conv2d layer (the layer's :class:`~fixedsim.approx.Approx`).

The layers of :mod:`fixedsim.nn` call these in training passes (evaluation is exact, as in
Adelman et al.'s layers). A product's pairs lie along one axis of each operand: the columns of
``A`` and rows of ``B`` of a matrix product, the input channels of ``x`` and ``w`` of a
convolution, the examples of ``grad_y`` and ``x`` of a convolution's weight gradient, the
output channels of ``grad_y`` and ``w`` of its input gradient. Each sampled product:

- weighs pair ``i`` by ``||A_i|| * ||B_i||`` (Frobenius norms of the slices, float64), keeps
  pairs by :func:`fixedsim.approx.select` with a generator seeded by
  ``child_seed(setting.seed, ctx.key(layer, "approx." + product))``: a function of the run
  seed, the step, the layer and the product only, so a resumed run draws the same pairs;
- multiplies the kept slices of ``A`` by their scales (float64) and holds the result as the
  tensor it scales is held: rounded by the spec's ``input`` stage when the product's spec has
  one (by the product itself, or, for the forward product, whose operands the layer rounds, by
  the layer), else rounded into the tensor's role (``activations`` for ``x``, ``errors`` for
  ``dY``, ``weights`` for ``W``; seeded and counted as any rounding into the role). A scaled
  value beyond the format's range then overflows as the role says (saturates in fixed point),
  and the estimate is no longer unbiased there: top-k, unscaled, never does;
- runs the product of the kept slices through the layer's spec for that product, as the dense
  layer does;
- counts, in the layer's :class:`~fixedsim.counters.ApproxCounts`, the MACs performed and
  those of the dense layer's product.

With ``"forward"`` sampled, the backward pass is the gradient of the sampled forward
``Y = (X_S D) W_S``: ``dW_S = (X_S D)^T dY`` (rows of the other pairs zero) and
``dX_S = dY (D W_S)^T`` (columns of the other pairs zero), both over the kept pairs only, each
itself sampled when ``"grad_weight"`` / ``"grad_input"`` is selected too.
"""

from __future__ import annotations

import numpy as np

from ..matmul import conv2d, conv2d_grad_input, conv2d_grad_weight, matmul
from ..quantize import child_seed
from .core import select

__all__ = ["linear_forward", "linear_backward", "conv_forward", "conv_backward"]


def _norms(x, axis) -> np.ndarray:
    x = np.asarray(x, np.float64)
    other = tuple(i for i in range(x.ndim) if i != axis)
    return np.sqrt(np.square(x).sum(axis=other))


def _holder(ctx, layer, spec, product_spec, role, purpose):
    """How a scaled operand of a product is held (module notes): None when the product's own
    ``input`` stage rounds it."""
    if spec.input is not None:
        if product_spec.input is not None:
            return None
        return lambda a: ctx.round_operand(spec, a, layer.name, f"approx.{purpose}")
    return lambda a: ctx.round(role, a, layer.name, f"approx.{purpose}")


def _sampled(layer, ctx, purpose, A, a_axis, B, b_axis, call, dense, *, sample, hold=None):
    """``call(A_s, B_s)`` of the pairs kept along ``A``'s ``a_axis`` and ``B``'s ``b_axis``
    (all of them unless ``sample``), counted; returns ``(result or None, kept, scale, A_s)``;
    None when no pair is kept (every pair of weight 0: the product is zero). ``hold`` rounds
    the scaled ``A_s`` (:func:`_holder`)."""
    ap = layer._approxed
    lc = ctx.layer_counters(layer.name)
    n = A.shape[a_axis]
    kept, scale = np.arange(n), None
    if sample:
        if not np.isfinite(A).all() or not np.isfinite(B).all():
            raise ValueError(f"{layer.name}: the {purpose} product's operands hold NaN or "
                             f"infinity; column-row sampling needs finite norms")
        rng = np.random.default_rng(child_seed(ap.seed, ctx.key(layer.name,
                                                                "approx." + purpose)))
        try:
            sel = select(_norms(A, a_axis) * _norms(B, b_axis), ap.keep, ap.method, rng,
                         ap.epsilon)
        except ValueError as e:
            raise ValueError(f"{layer.name}: approx {ap} on the {purpose} product: {e}") from None
        kept = sel.kept
        if ap.method != "topk":
            scale = sel.scale
    A_s = np.take(A, kept, axis=a_axis) if sample else A
    B_s = np.take(B, kept, axis=b_axis) if sample else B
    if scale is not None and kept.size:
        shape = [1] * A.ndim
        shape[a_axis] = kept.size
        A_s = np.asarray(A_s, np.float64) * scale.reshape(shape)
        if hold is not None:
            A_s = hold(A_s)
    before = lc.products.macs
    out = call(A_s, B_s) if kept.size else None
    lc.approx.add(purpose, pairs=n if sample else 0, kept=kept.size if sample else 0,
                  macs=lc.products.macs - before, dense_macs=dense)
    return out, kept, scale, A_s


def _scaled_weights(ctx, layer, wk, scale):
    """``D W_S`` of the gradient of a sampled forward (``dX_S = dY (D W_S)^T``), held as the
    input-gradient product holds its operands."""
    ws = np.asarray(wk, np.float64) * scale
    hold = _holder(ctx, layer, ctx.policy.grad_input, ctx.policy.grad_input, "weights",
                   "grad_input.w")
    return ws if hold is None else hold(ws)


def _run(fn, spec, layer, ctx, purpose, **kw):
    return lambda a, b: ctx.product(fn, spec, layer.name, purpose, a, b, **kw)


# -- Linear --------------------------------------------------------------------------------------
def linear_forward(layer, xq, wq, spec, ctx):
    """The sampled forward ``xq @ wq`` (pairs: input features); caches what backward needs."""
    original = ctx.policy.forward
    M, K = xq.shape
    N = wq.shape[1]
    z, kept, scale, xs = _sampled(layer, ctx, "forward", xq, 1, wq, 0,
                                  _run(matmul, spec, layer, ctx, "forward"), M * N * K,
                                  sample=True, hold=_holder(ctx, layer, original, spec,
                                                            "activations", "forward"))
    layer._approx_cache = (kept, scale, xs)
    return np.zeros((M, N)) if z is None else z


def linear_backward(layer, G, xq, wq, ctx, need_input_grad):
    """``(dW, dX or None)`` of a Linear layer with a sampling setting."""
    ap, p = layer._approxed, ctx.policy
    M, K = xq.shape
    N = G.shape[1]
    if "forward" in ap.products:
        kept, scale, xs = layer._approx_cache
        wk = wq[kept]
        if scale is not None:
            wk = _scaled_weights(ctx, layer, wk, scale[:, None])
    else:
        kept, xs, wk = np.arange(K), xq, wq
    dW = np.zeros((K, N))
    gw = p.grad_weight
    dws, _, _, _ = _sampled(layer, ctx, "grad_weight", xs.T, 1, G, 0,
                            _run(matmul, gw, layer, ctx, "grad_weight"), M * N * K,
                            sample="grad_weight" in ap.products,
                            hold=_holder(ctx, layer, gw, gw, "activations", "grad_weight"))
    if dws is not None and kept.size:
        dW[kept] = dws
    if not need_input_grad:
        return dW, None
    dX = np.zeros((M, K))
    gi = p.grad_input
    dxs, _, _, _ = _sampled(layer, ctx, "grad_input", G, 1, np.ascontiguousarray(wk.T), 0,
                            _run(matmul, gi, layer, ctx, "grad_input"), M * N * K,
                            sample="grad_input" in ap.products,
                            hold=_holder(ctx, layer, gi, gi, "errors", "grad_input"))
    if dxs is not None and kept.size:
        dX[:, kept] = dxs
    return dW, dX


# -- Conv2d --------------------------------------------------------------------------------------
def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(u) for u in v)


def _out_hw(layer, H, W):
    """The output size of the layer's convolution (its settings were checked when built)."""
    (sh, sw), (ph, pw) = _pair(layer.stride), _pair(layer.padding)
    kh, kw = layer.kernel_size
    return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1


def conv_forward(layer, xq, wq, spec, ctx):
    """The sampled forward convolution (pairs: input channels)."""
    original = ctx.policy.forward
    Nb, C, H, W = xq.shape
    O, _, kh, kw = wq.shape
    Ho, Wo = _out_hw(layer, H, W)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"Conv2d: a {kh}x{kw} kernel does not fit the {H}x{W} input")
    kw_ = dict(stride=layer.stride, padding=layer.padding)
    z, kept, scale, xs = _sampled(layer, ctx, "forward", xq, 1, wq, 1,
                                  _run(conv2d, spec, layer, ctx, "forward", **kw_),
                                  Nb * Ho * Wo * O * C * kh * kw, sample=True,
                                  hold=_holder(ctx, layer, original, spec, "activations",
                                               "forward"))
    layer._approx_cache = (kept, scale, xs)
    return np.zeros((Nb, O, Ho, Wo)) if z is None else z


def conv_backward(layer, grad_y, xq, wq, ctx, need_input_grad):
    """``(dW, dX or None)`` of a Conv2d layer with a sampling setting."""
    ap, p = layer._approxed, ctx.policy
    Nb, C, H, W = xq.shape
    O, _, kh, kw = wq.shape
    Ho, Wo = grad_y.shape[2:]
    kw_ = dict(stride=layer.stride, padding=layer.padding)
    if "forward" in ap.products:
        kept, scale, xs = layer._approx_cache
        wk = wq[:, kept]
        if scale is not None:
            wk = _scaled_weights(ctx, layer, wk, scale[None, :, None, None])
    else:
        kept, xs, wk = np.arange(C), xq, wq
    dense = Nb * Ho * Wo * O * C * kh * kw
    dW = np.zeros(wq.shape)
    shape = (O, kept.size, kh, kw)
    dws, _, _, _ = _sampled(
        layer, ctx, "grad_weight", grad_y, 0, xs, 0,
        lambda g, x: ctx.product(conv2d_grad_weight, p.grad_weight, layer.name, "grad_weight",
                                 x, g, shape, **kw_),
        dense, sample="grad_weight" in ap.products,
        hold=_holder(ctx, layer, p.grad_weight, p.grad_weight, "errors", "grad_weight"))
    if dws is not None and kept.size:
        dW[:, kept] = dws
    if not need_input_grad:
        return dW, None
    dX = np.zeros(xq.shape)
    xs_shape = (Nb, kept.size, H, W)
    dxs, _, _, _ = _sampled(
        layer, ctx, "grad_input", grad_y, 1, wk, 0,
        _run(conv2d_grad_input, p.grad_input, layer, ctx, "grad_input", x_shape=xs_shape,
             **kw_),
        Nb * H * W * C * O * kh * kw, sample="grad_input" in ap.products,
        hold=_holder(ctx, layer, p.grad_input, p.grad_input, "errors", "grad_input"))
    if dxs is not None and kept.size:
        dX[:, kept] = dxs
    return dW, dX
