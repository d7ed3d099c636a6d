"""The public calls: :func:`matmul`, :func:`explain` and the convolutions (im2col, then the
modelled matrix product)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers

import numpy as np

from .. import counters as _counters
from ..blockformats import BlockFormat
from ..formats import FP32
from ..jit import conv as _conv
from ..jit import gemm_fp32 as _g32
from ..quantize import (
    _as_float_array,
)
from ..rounding import Rounding
from .core import (
    _Bits,
    _check_addend,
    _check_finite_for_fixed,
    _check_operands,
    _f32_exact,
    _is_gram,
    _quantize_input,
    _setup,
    block_operands,
)
from .paths import Product, compute, explain_product
from .spec import MatmulSpec


def matmul(a, b, spec: MatmulSpec | None = None, c=None, *, seed=None, stats=False,
           path=None):
    """Matrix product ``c + a @ b`` computed as ``spec`` says, bit for bit.

    Parameters
    ----------
    a : array_like, shape (M, K) or (..., M, K)
    b : array_like, shape (K, N) or (..., K, N)
        Batch dimensions of ``a`` and ``b`` broadcast as in :func:`numpy.matmul`.
    spec : MatmulSpec, optional
        Default ``MatmulSpec()``: exact products and sums, one rounding into float64.
    c : array_like, optional
        The addend ``C`` of ``D = C + A B``, broadcast to the output shape, taken as it is
        (not quantized). With no accumulator it is a term of the exact sum; with an
        :class:`Accumulator` it is the running sum's start (in the first block's exact sum,
        instead of +0); with a :class:`BlockFMA` it is a term of the first block, aligned
        and cut like the products (as the tensor core takes it), or with ``promote`` the
        start of the running sum the chunks are added to. None: +0.
    seed : int, numpy.random.Generator, optional
        Overrides ``spec.seed`` for this call (e.g. a fresh seed per training step).
    stats : bool or "steps", default False
        Also return the call's :class:`fixedsim.counters.Counters`; ``"steps"``: with the
        per-step events of the product and accumulator stages counted too (they cost more than
        the product itself on some paths; with True they are None).
    path : str, optional
        Run this row of the path table (:data:`fixedsim.matmul.PATHS`) instead of the first
        that applies, e.g. ``"general"``; the bits are the same (that is what the table's
        tests check). ValueError when the row does not apply, saying why.

    Returns
    -------
    numpy.ndarray, shape (..., M, N)
        dtype of the container of ``spec.result_format`` (float32 when exact in it).

    Raises
    ------
    ValueError
        Shapes that do not match (or ``c`` that does not broadcast to the output); NaN or
        infinity where a fixed-point format is in the spec; a ``path`` that is unknown or does
        not apply; a ``b`` with batch dimensions under a stochastic product, accumulator or
        output rounding (their draw indices are defined for a 2-D ``b``).

    Notes
    -----
    Random draws (STOCHASTIC stages): each stage has its own key derived from the seed; the
    draw of a rounding is indexed by the operand element (inputs), ``o * K + k`` (products),
    ``o * nblocks + t`` (accumulator block ``t``) or ``o`` (output), ``o`` the flat index of
    the output element, so results do not depend on threads or on the kernel chosen.

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> a = np.array([[1.0, 2.0**-11, 2.0**-11]])
    >>> b = np.ones((3, 1))
    >>> fs.matmul(a, b, fs.MatmulSpec(output=fs.FP16))           # exact sum, one rounding
    array([[1.0009766]], dtype=float32)
    >>> fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.FP16))      # FP16 FMA chain: both lost
    array([[1.]], dtype=float32)
    >>> fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, block=4)))
    array([[1.0009766]], dtype=float32)
    """
    return _matmul(a, b, spec, c, seed=seed, stats=stats, path=path)


def _matmul(a, b, spec, c=None, *, seed=None, stats=False, path=None, scans=(None, None)):
    """:func:`matmul`; ``scans``: the operand scans (:class:`~fixedsim.matmul.core._Bits`) of
    ``a`` and ``b`` where the caller holds them, else None. A layer scans the operands it
    keeps for its backward pass once and gives the scans to its three products (``a`` and,
    transposed, the same values). They are read only where the operands reach the product as
    they are: no ``spec.input`` rounding, ``b`` 2-D; a Gram product reads ``b``'s alone. A
    scan may bound the values more loosely (the scan of the values an operand is made of:
    :meth:`~fixedsim.matmul.core._Bits.union`); the bits are the same, only the row that
    computes them may differ."""
    spec, keys, rb, cnt = _setup("matmul", spec, seed, stats)
    gram = spec.input is None and _is_gram(a, b)
    if gram:  # a is b.T (x.T @ x): b alone is converted and scanned, a stays a view of it
        b = _as_float_array(b, "b")
        a = b.T
    else:
        a, b = _check_operands(a, b, batch_b=True)
    _check_finite_for_fixed(spec, a, b)
    M, K = a.shape[-2:]
    N = b.shape[-1]
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    C = None if c is None else _check_addend(c, (*batch, M, N), spec)
    if gram:  # no input rounding: b as converted (float32 kept), a its transpose
        aq, bq = a, b
    elif isinstance(spec.input, BlockFormat):  # whole operands, in blocks along K
        aq, bq, spec = block_operands(a, b, spec, rb, keys, cnt)
    else:
        aq = _quantize_input(a, spec.input, spec.input_rounding, rb, keys[0], cnt.input,
                             keep32=True)
        bq = _quantize_input(b, spec.input, spec.input_rounding, rb, keys[1], cnt.input,
                             keep32=True)
    cnt.macs = int(np.prod(batch, dtype=np.int64)) * M * N * K
    if b.ndim == 2:  # one 2-D product: the batch of a stacked into rows
        R = int(np.prod(batch, dtype=np.int64)) * M
        ba, bb = scans if spec.input is None else (None, None)
        res = _product(None if gram else aq.reshape(R, K), bq, spec, keys, rb, cnt, path=path,
                       C=None if C is None else C.reshape(R, N), ba=ba, bb=bb, gram=gram)
        out = res.reshape(*batch, M, N)
    else:
        if _stochastic_after_input(spec):
            raise ValueError("matmul: a b with batch dimensions takes no stochastic product, "
                             "accumulator or output rounding (their draws are indexed for a "
                             "2-D b); loop over the batch, or use a 2-D b")
        aq = np.broadcast_to(aq, (*batch, M, K))
        bq = np.broadcast_to(bq, (*batch, K, N))
        out = None
        for idx in np.ndindex(*batch):
            res = _product(np.ascontiguousarray(aq[idx]), np.ascontiguousarray(bq[idx]), spec,
                           keys, rb, cnt, path=path, C=None if C is None else C[idx])
            if out is None:
                out = np.empty((*batch, M, N), res.dtype)
            out[idx] = res
        if out is None:  # an empty batch
            out = np.empty((*batch, M, N), spec.result_format.dtype)
    _counters._publish(cnt)
    return (out, cnt) if stats else out


def _stochastic_after_input(spec) -> bool:
    """Does a stage after the input rounding draw random bits?"""
    R = Rounding.STOCHASTIC
    acc = spec.accumulator
    return ((spec.product is not None and spec.product_rounding is R)
            or (acc is not None and acc.rounding is R)
            or ((spec.output is not None or acc is None) and spec.output_rounding is R))


def explain(a, b, spec: MatmulSpec | None = None, c=None, *, seed=None):
    """Which kernel computes ``matmul(a, b, spec)``, and why each faster one declined.

    The operands are quantized to ``spec.input`` as :func:`matmul` would (with ``seed`` for
    a stochastic input rounding) and scanned; the rows of :data:`fixedsim.matmul.PATHS` are
    asked in order; no product is computed.

    Returns
    -------
    Explanation
        ``.path`` the name of the row that runs, ``.declined`` the ``(name, reason)`` of each
        row before it; ``str()`` of it is a readable report.

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> a = np.array([[0.5, 0.25]]); b = np.array([[1.0], [3.0]])
    >>> e = fs.explain(a, b, fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32))
    >>> e.path
    'fp32_chain'
    >>> print(fs.explain(a, b, fs.MatmulSpec(product=fs.FP16)))   # doctest: +ELLIPSIS
    exact_blas: declined: products are rounded (spec.product is set)
    ...
    rounded_products: runs: products rounded into spec.product ...
      proof: ...
    """
    spec, keys, rb, cnt = _setup("explain", spec, seed, False)
    a, b = _check_operands(a, b)
    _check_finite_for_fixed(spec, a, b, "explain")
    if isinstance(spec.input, BlockFormat):
        aq, bq, spec = block_operands(a, b, spec, rb, keys, cnt)
    else:
        aq = _quantize_input(a, spec.input, spec.input_rounding, rb, keys[0], cnt.input,
                             keep32=True)
        bq = _quantize_input(b, spec.input, spec.input_rounding, rb, keys[1], cnt.input,
                             keep32=True)
    A = aq.reshape(-1, aq.shape[-1])
    C = None if c is None else _check_addend(c, (*a.shape[:-1], b.shape[1]), spec, "explain")
    return explain_product(Product(A, bq, spec, keys, rb, cnt,
                                   C=None if C is None else C.reshape(A.shape[0], -1)))


def _product(A, B, spec, keys, rb, c, mm=None, ba=None, path=None, C=None, bb=None,
             a_rows=None, a_norms=None, a_fma32=None, gram=False):
    """``(R, N)`` result of the 2-D product in the result format's container; counts into c.

    ``A`` may be given as a ``((R, K), make)`` pair, ``make()`` building it only when a path
    needs it, with ``ba`` its :class:`~fixedsim.matmul.core._Bits`; ``mm``, ``a_rows``,
    ``a_norms`` and ``a_fma32`` as for :class:`~fixedsim.matmul.paths.Product`. ``ba`` and
    ``bb`` may be the scans of arrays that hold every nonzero value of ``A`` and ``B`` (the
    image an im2col matrix is made of): the scans are bounds, and every row reads them as
    bounds.
    ``path``: a row of the table by name (None: the first that applies). ``C``: the addend,
    shape (R, N), or None. ``gram``: ``A`` is None and stands for ``B.T`` (a Gram product,
    ``spec.input`` None: :class:`~fixedsim.matmul.paths.Product`).
    """
    if isinstance(spec.input, BlockFormat):  # a convolution's lowered operands, along K
        A = A[1]() if isinstance(A, tuple) else A
        A, B, spec = block_operands(A, B, spec, rb, keys, c)
        mm = ba = bb = a_rows = a_norms = a_fma32 = None
    p = Product(A, B, spec, keys, rb, c, mm=mm, ba=ba, C=C, bb=bb, a_rows=a_rows,
                a_norms=a_norms, a_fma32=a_fma32, gram=gram)
    acc = spec.accumulator
    if acc is not None:
        c.accumulator.roundings += p.R * p.N * (acc.roundings(p.K) if hasattr(acc, "roundings")
                                                 else -(-p.K // acc.block))
    if hasattr(acc, "extra_bits"):  # a BlockFMA aligns every product and each block's start
        Kp = p.K if acc.interleave is None else -(-p.K // acc.promote) * acc.promote
        c.alignment.roundings += p.R * p.N * (Kp + -(-Kp // acc.block))  # padded: all run
    if spec.product is not None:
        c.product.roundings += p.R * p.N * p.K
    out = compute(p, path)
    if not c._steps:  # the per-step events were not asked for: not counted (None)
        c.product.forget_events()
        c.accumulator.forget_events()
        c.alignment.forget_events()
    return out


# -- convolution ----------------------------------------------------------------------------------
def _pair(v, name, low):
    vals = (v, v) if isinstance(v, numbers.Integral) else (
        tuple(v) if isinstance(v, (tuple, list)) else (v,))
    if len(vals) != 2 or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                 for t in vals):
        raise TypeError(f"conv2d: {name} must be an int or a pair of ints, got {v!r}")
    if min(vals) < low:
        raise ValueError(f"conv2d: {name} must be >= {low}, got {v!r}")
    return int(vals[0]), int(vals[1])


def _conv_geometry(x_shape, w_shape, stride, padding, op="conv2d"):
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must have shape (N, C, H, W), got {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"{op}: w must have shape (O, C, kh, kw), got {tuple(w_shape)}")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"{op}: x has C={x_shape[1]} channels, w expects C={w_shape[1]}")
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    kh, kw = w_shape[2:]
    Ho = (x_shape[2] + 2 * ph - kh) // sh + 1
    Wo = (x_shape[3] + 2 * pw - kw) // sw + 1
    if kh < 1 or kw < 1 or Ho < 1 or Wo < 1:
        raise ValueError(f"{op}: a {kh}x{kw} kernel does not fit the {x_shape[2]}x{x_shape[3]} "
                         f"image with padding {(ph, pw)}")
    return (sh, sw), (ph, pw), Ho, Wo


#: The im2col matrices a layer's forward pass built, for its backward pass: a dict while a
#: :func:`reuse_im2col` block is active (else None).
_COLS_MEMO: contextvars.ContextVar = contextvars.ContextVar("fixedsim_im2col_memo",
                                                             default=None)


@contextlib.contextmanager
def reuse_im2col(memo: dict | None):
    """Within the block, :func:`conv2d` and :func:`conv2d_grad_weight` keep the im2col matrix
    they build in ``memo`` and take it from there when asked for the same one again: same
    geometry and an operand (after ``spec.input``) equal bit for bit to the one it was built
    from, which is kept as a copy, so an operand changed in place in between is seen. A
    training step's weight gradient so reuses its forward pass's matrix; the results are the
    same bits (the matrix is a function of the operand's bits and the geometry alone).
    ``memo`` belongs to the caller (a layer keeps one per forward pass and drops it after
    the backward pass); None: no matrix is kept or taken within the block."""
    token = _COLS_MEMO.set(memo)
    try:
        yield memo
    finally:
        _COLS_MEMO.reset(token)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Are ``a`` and ``b`` the same array of bits (dtype, shape and every bit: -0.0 is not
    +0.0, a NaN equals itself)?"""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    u = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(np.ascontiguousarray(a).view(u), np.ascontiguousarray(b).view(u)))


def _cols_dtype(spec, bits: _Bits) -> type:
    """The dtype a convolution's im2col matrix is built in: float32 when the operand's values
    (``bits``, its scan) are float32 values and the accumulator is an FP32 FMA chain (its rows
    compute in float32: no float32 copy of the matrix), else float64. Either holds the values
    exactly; only the copies a row makes depend on it."""
    acc = spec.accumulator
    chain32 = (acc is not None and getattr(acc, "fmt", None) == FP32
               and getattr(acc, "block", None) == 1)
    return np.float32 if chain32 and _f32_exact(bits) else np.float64


def _im2col(x, kh, kw, stride, padding, Ho, Wo, memo=False, dtype=np.float64, ones=False):
    """The im2col matrix of ``x`` (``dtype``: float64, or float32 for float32 values); with
    ``memo`` from the active :func:`reuse_im2col` memo when it holds the one of these bits,
    geometry and dtype; with ``ones`` (no memo), followed by a column of ones (a bias's
    input, as K-FAC's rows have it), written in the same pass."""
    book = _COLS_MEMO.get() if memo and not ones else None
    key = (x.shape, x.dtype.str, kh, kw, tuple(stride), tuple(padding), np.dtype(dtype).str)
    if book is not None:
        kept = book.get(key)
        if kept is not None and _same_bits(kept[0], x):
            return kept[1]
    N, C = x.shape[:2]
    cols = np.empty((N * Ho * Wo, C * kh * kw + int(ones)), dtype)
    if ones:  # the kernel writes the first C kh kw columns of each row
        cols[:, -1] = 1.0
    _conv.im2col(np.ascontiguousarray(x, dtype), kh, kw, *stride, *padding, cols)
    if book is not None:
        book[key] = (np.array(x, copy=True), cols)
    return cols


def _conv_core(xq, wq, spec, keys, rb, c, stride, padding, Ho, Wo):
    """``conv2d`` of quantized operands: im2col, then the modelled matrix product."""
    N, O = xq.shape[0], wq.shape[0]
    kh, kw = wq.shape[2:]
    bx = _Bits.of(xq)
    cols = _im2col(xq, kh, kw, stride, padding, Ho, Wo, memo=True, dtype=_cols_dtype(spec, bx))
    c.macs = cols.shape[0] * O * cols.shape[1]
    # every nonzero value of cols is one of xq's: its scan bounds them
    res = _product(cols, np.ascontiguousarray(wq.reshape(O, -1).T), spec, keys, rb, c, ba=bx)
    return np.ascontiguousarray(res.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2))


def _quantize_pair(op, spec, a, b, names, keys, rb, c):
    _check_finite_for_fixed(spec, a, b, op, names)
    return (_quantize_input(a, spec.input, spec.input_rounding, rb, keys[0], c.input),
            _quantize_input(b, spec.input, spec.input_rounding, rb, keys[1], c.input))


def _done(out, c, stats):
    _counters._publish(c)
    return (out, c) if stats else out


def conv2d(x, w, spec: MatmulSpec | None = None, stride=1, padding=0, *, seed=None,
           stats=False):
    """2-D convolution (cross-correlation, as in CNNs) computed as ``spec`` says, bit for bit.

    ``y[n, o, ho, wo] = sum over (c, i, j) of x[n, c, ho*s - p + i, wo*s - p + j] * w[o, c, i, j]``
    with zero padding, computed as ``matmul(im2col(x), w.reshape(O, K).T, spec)``: the dot
    product of each output runs over ``K = C*kh*kw`` in the order (channel, kernel row, kernel
    column), which is part of the contract (it decides what every accumulator sees).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
    w : array_like, shape (O, C, kh, kw)
    spec : MatmulSpec, optional
        ``spec.input`` quantizes ``x`` and ``w`` (before im2col: each pixel is rounded once;
        draw indices are the flat indices of ``x`` and ``w``).
    stride, padding : int or (int, int)
    seed, stats
        As for :func:`matmul`. Output draw index ``o``: the flat index in (n, ho, wo, o) order.

    Returns
    -------
    numpy.ndarray, shape (N, O, Ho, Wo)

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> w = np.ones((1, 1, 2, 2))
    >>> fs.conv2d(x, w, fs.MatmulSpec(output=fs.FP16), stride=2)
    array([[[[10., 18.],
             [42., 50.]]]], dtype=float32)
    """
    spec, keys, rb, c = _setup("conv2d", spec, seed, stats)
    x = _as_float_array(x, "x")
    w = _as_float_array(w, "w")
    stride, padding, Ho, Wo = _conv_geometry(x.shape, w.shape, stride, padding)
    xq, wq = _quantize_pair("conv2d", spec, x, w, ("x", "w"), keys, rb, c)
    return _done(_conv_core(xq, wq, spec, keys, rb, c, stride, padding, Ho, Wo), c, stats)


def conv2d_grad_weight(x, grad_y, w_shape, spec: MatmulSpec | None = None, stride=1, padding=0,
                       *, seed=None, stats=False):
    """Gradient of :func:`conv2d` with respect to ``w``, as one modelled matrix product.

    ``dw[o, (c, i, j)] = sum over (n, ho, wo) of grad_y[n, o, ho, wo] * x[n, c, ...]``:
    ``matmul(grad_y as (O, N*Ho*Wo), im2col(x), spec)``, ``K`` in the order (n, ho, wo).
    ``spec.input`` quantizes ``grad_y`` (stage A) and ``x`` (stage B).

    Returns
    -------
    numpy.ndarray, shape ``w_shape``
    """
    spec, keys, rb, c = _setup("conv2d_grad_weight", spec, seed, stats)
    x = _as_float_array(x, "x")
    gy = _as_float_array(grad_y, "grad_y")
    w_shape = tuple(int(v) for v in w_shape)
    stride, padding, Ho, Wo = _conv_geometry(x.shape, w_shape, stride, padding,
                                             "conv2d_grad_weight")
    O = w_shape[0]
    if gy.shape != (x.shape[0], O, Ho, Wo):
        raise ValueError(f"conv2d_grad_weight: grad_y must have shape "
                         f"{(x.shape[0], O, Ho, Wo)}, got {gy.shape}")
    gq, xq = _quantize_pair("conv2d_grad_weight", spec, gy, x, ("grad_y", "x"), keys, rb, c)
    bx = _Bits.of(xq)
    cols = _im2col(xq, w_shape[2], w_shape[3], stride, padding, Ho, Wo, memo=True,
                   dtype=_cols_dtype(spec, bx))
    A = np.ascontiguousarray(gq.transpose(1, 0, 2, 3).reshape(O, -1))
    c.macs = O * cols.shape[0] * cols.shape[1]
    return _done(_product(A, cols, spec, keys, rb, c, bb=bx).reshape(w_shape), c, stats)


def conv2d_grad_input(grad_y, w, x_shape, spec: MatmulSpec | None = None, stride=1, padding=0,
                      *, seed=None, stats=False):
    """Gradient of :func:`conv2d` with respect to ``x``, as one modelled convolution.

    The transposed convolution: ``grad_y`` is spread onto a zero grid with the stride, padded
    by ``kh - 1 - padding``, and convolved (stride 1) with the kernels flipped and with input
    and output channels swapped, so each ``dx`` element is one dot product over
    ``(o, kh-1-i, kw-1-j)`` run through ``spec``'s accumulator. With stride > 1 the
    inserted zeros are multiplied too (and counted as MACs), as in a transposed-convolution
    engine. ``spec.input`` quantizes ``grad_y`` (stage A) and ``w`` (stage B).

    Returns
    -------
    numpy.ndarray, shape ``x_shape``
    """
    op = "conv2d_grad_input"
    gy = _as_float_array(grad_y, "grad_y")
    w = _as_float_array(w, "w")
    x_shape = tuple(int(v) for v in x_shape)
    (sh, sw), (ph, pw), Ho, Wo = _conv_geometry(x_shape, w.shape, stride, padding, op)
    N, C, H, W = x_shape
    O, _, kh, kw = w.shape
    if gy.shape != (N, O, Ho, Wo):
        raise ValueError(f"{op}: grad_y must have shape {(N, O, Ho, Wo)}, got {gy.shape}")
    spec, keys, rb, c = _setup(op, spec, seed, stats)
    gq, wq = _quantize_pair(op, spec, gy, w, ("grad_y", "w"), keys, rb, c)
    r0, q0 = kh - 1 - ph, kw - 1 - pw
    hos = [ho for ho in range(Ho) if 0 <= ho * sh + r0 < H + kh - 1]
    wos = [wo for wo in range(Wo) if 0 <= wo * sw + q0 < W + kw - 1]

    @functools.cache
    def zp():
        """``Zp[n, o, ho*s + kh-1-p, wo*s + kw-1-p] = grad_y``: the zero-spread, padded
        gradient, made on first use (the FMA chain and the BLAS product do without it)."""
        Zp = np.zeros((N, O, H + kh - 1, W + kw - 1))
        if hos and wos:
            Zp[:, :, hos[0] * sh + r0:hos[-1] * sh + r0 + 1:sh,
               wos[0] * sw + q0:wos[-1] * sw + q0 + 1:sw] = \
                gq[:, :, hos[0]:hos[-1] + 1, wos[0]:wos[-1] + 1]
        return Zp
    wf = np.ascontiguousarray(wq.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    R, K = N * H * W, O * kh * kw
    c.macs = R * C * K
    G = np.zeros_like(gq)  # the entries of grad_y that reach the image (all, but for padding
    if hos and wos:        # wider than the kernel)
        G[:, :, hos[0]:hos[-1] + 1, wos[0]:wos[-1] + 1] = \
            gq[:, :, hos[0]:hos[-1] + 1, wos[0]:wos[-1] + 1]

    def mm(scale, Bs, k0, k1):
        """The exact paths' product without the zero grid: ``grad_y @ w`` over the output
        channels, then col2im adds each pixel's contributions (another summation order of
        the same exact products; columns outside ``[k0, k1)`` are zeroed)."""
        Wb = Bs.reshape(O, kh, kw, C)
        if (k0, k1) != (0, K):
            keep = np.zeros(K)
            keep[k0:k1] = 1.0
            Wb = Wb * keep.reshape(O, kh, kw, 1)
        W2 = np.ascontiguousarray(Wb[:, ::-1, ::-1, :].transpose(0, 3, 1, 2)).reshape(O, -1)
        P = np.ldexp(G, scale).transpose(0, 2, 3, 1).reshape(N * Ho * Wo, O) @ W2
        dx = np.zeros((N, C, H, W))
        _conv.col2im(P, kh, kw, sh, sw, ph, pw, dx)
        return dx.transpose(0, 2, 3, 1).reshape(R, C)

    def a_rows(rows):
        """Rows of the im2col matrix of ``Zp`` alone."""
        out = np.empty((rows.size, K))
        _conv.im2col_rows(zp(), kh, kw, H, W, rows, out)
        return out

    def a_norms():
        """The norms of its rows: each a float64 sum of its K squares (the channels' sums
        at each pixel, then the window's), one square root."""
        na = np.empty(R)
        _conv.patch_norms(zp(), kh, kw, H, W, na)
        return na

    def a_fma32(B32, out):
        """The FP32 FMA chain over the rows of ``A``, read from ``G`` (float32 values: the
        row checks ``gq``'s scan) where they fall on the zero-spread grid; the grid's zeros
        left out when every product is a multiple of ``2**-149`` or a coarser power of two
        (no partial sum is then ``-0.0``)."""
        bw = _Bits.of(B32)
        skip = ga.top == -1075 or bw.top == -1075 or ga.lsb + bw.lsb >= -149
        G32 = np.ascontiguousarray(G, np.float32)
        if (skip and sw == 1 and K * W * C <= _g32.CONV_T_FLAT
                and O * Ho * Wo * C <= _g32.CONV_T_FLAT):
            _g32.conv_t_f32_flat(G32, B32, kh, kw, sh, r0, q0, H, W, out)
        else:
            _g32.conv_t_f32_chain(G32, B32, kh, kw, sh, sw, r0, q0, H, W, skip, out)

    ga = _Bits.of(gq)

    # every nonzero value of the zero-spread Zp is one of gq's: its scan bounds them
    res = _product(((R, K), lambda: _im2col(zp(), kh, kw, (1, 1), (0, 0), H, W)),
                   np.ascontiguousarray(wf.reshape(C, -1).T), spec, keys, rb, c, mm=mm,
                   ba=ga, a_rows=a_rows, a_norms=a_norms, a_fma32=a_fma32)
    return _done(np.ascontiguousarray(res.reshape(N, H, W, C).transpose(0, 3, 1, 2)), c, stats)
