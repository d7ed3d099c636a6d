"""Counts without running: what a training step of a model under a policy does, by shape alone.

:func:`count_step` walks a :class:`fixedsim.nn.Sequential` with the shapes of a batch and
returns one :class:`Row` per layer and product (``forward``, ``grad_input``, ``grad_weight``;
the optimizer's row is ``optim``/``update``): the multiply-accumulates by operand format and
accumulator kind, the roundings of every stage and role (by format and rounding mode), the
bytes each tensor read and written takes at its format's width, and the elementwise and
optimizer operations. The numbers are those the counters of a real step record
(:class:`fixedsim.nn.LayerCounters`): ``tests/test_cost.py`` runs steps and compares them.

Nothing here runs a kernel: counting a large network at a large batch takes microseconds.
"""

from __future__ import annotations

import collections
import dataclasses
import math

from ..formats import FP32, FP64

__all__ = ["Row", "StepCounts", "count_step", "count_epoch", "tensor_bytes", "bits_of",
           "CountError"]

PRODUCTS = ("forward", "grad_input", "grad_weight")


class CountError(ValueError):
    """A model or layer the cost model cannot count (a ValueError)."""


def bits_of(fmt) -> int:
    """Bits of one stored value of ``fmt`` (None: a float64, 64)."""
    return 64 if fmt is None else int(fmt.width)


def tensor_bytes(fmt, n: int) -> int:
    """Bytes of ``n`` values stored in ``fmt``.

    Formats narrower than a byte are packed (``ceil(n * bits / 8)``: two FP4 or 4-bit fixed
    values a byte); wider ones take the smallest power-of-two number of bytes that holds a
    code (a ``Q<12,8>`` takes 2 bytes, TF32 4, as hardware stores them). None: float64.

    Examples
    --------
    >>> import fixedsim as fs
    >>> from fixedsim.cost.counts import tensor_bytes
    >>> tensor_bytes(fs.FP16, 10), tensor_bytes(fs.FixedFormat(4, 2), 3), tensor_bytes(None, 1)
    (20, 2, 8)
    """
    n = int(n)
    b = bits_of(fmt)
    if b < 8:
        return -(-n * b // 8)
    per = 1
    while per * 8 < b:
        per *= 2
    return n * per


def _label(fmt) -> str:
    return "FP64" if fmt is None else repr(fmt)


def _acc_label(spec) -> str:
    """The accumulator kind of a spec: ``exact``, ``FP32 chain``, ``FP16 block 4``,
    ``BlockFMA(...)``."""
    acc = spec.accumulator
    if acc is None:
        return "exact"
    if hasattr(acc, "extra_bits"):
        return repr(acc)
    kind = "chain" if acc.block == 1 else f"block {acc.block}"
    lanes = "" if getattr(acc, "lanes", None) is None else f" lanes {acc.lanes}"
    return f"{acc.fmt!r} {kind}{lanes}"


def _acc_roundings(acc, K: int) -> int:
    return acc.roundings(K) if hasattr(acc, "roundings") else -(-K // acc.block)


@dataclasses.dataclass
class Row:
    """The counts of one layer's product (or pass) in one step.

    Attributes
    ----------
    layer : str
        The layer's name in its model (``"0.conv2d"``), or ``"input"`` (rounding the network
        input), ``"loss"`` (softmax cross-entropy), ``"optim"`` (the optimizer step).
    kind : str
        The layer's class (``"Conv2d"``), ``"Input"``, ``"Loss"`` or ``"SGD"``/``"Adam"``.
    product : str
        ``"forward"``, ``"grad_input"``, ``"grad_weight"`` (``"update"`` for the optimizer).
    calls, macs : int
        Matrix-product calls and their multiply-accumulates (bias gradients included).
    macs_by : dict of (str, str) to int
        MACs by (operand formats, accumulator kind): ``("FP16", "FP32 chain")``; operands of
        two formats read ``"FP16xFP32"``.
    gemm : list of tuple
        ``(M, N, K, operand formats, accumulator kind, format of A, format of B)`` of each
        matrix product as a native library computes it (formats as the product multiplies
        them; None: float64). A convolution's input gradient is ``G @ W`` then col2im there
        (``N*Ho*Wo x O`` times ``O x C*kh*kw``): fewer MACs than ``macs``, which counts the
        zeros of the transposed convolution fixedsim computes.
    products : list of (int, int, int, MatmulSpec)
        ``(M, N, K, spec)`` of each product as fixedsim computes it (the spec it runs under).
    stages : dict of str to int
        Roundings of the products' stages ``input``, ``product``, ``accumulator``, ``output``
        (as :class:`fixedsim.counters.Counters` counts them).
    roles : dict of str to int
        Roundings into each role (``activations``, ``errors``, ``weight_grads``,
        ``operands``; the optimizer's ``momentum``, ``update``, ``weights``).
    roundings : dict of (str, str, str) to int
        Every rounding by (where, format, mode): ``("activations", "FP16", "NEAREST_EVEN")``,
        ``("accumulator", "FP32", "NEAREST_EVEN")``.
    reads, writes : dict of str to int
        Bytes of each tensor read and written, at its format's width (:func:`tensor_bytes`).
    elementwise : int
        Elementwise operations beyond the products (bias additions, comparisons of ReLU and
        pooling, normalisation, softmax; the optimizer's multiply-adds).
    launches : int
        Native operations a framework would launch for this row (each pays the per-call
        overhead of a machine profile).
    operands : str
        The operand formats of the row's products (``""`` when it has none).
    channels : int
        A convolution's input channels (0 for other layers): a machine's
        ``conv_efficiency`` is looked up by them.
    """

    layer: str
    kind: str
    product: str
    calls: int = 0
    macs: int = 0
    macs_by: dict = dataclasses.field(default_factory=dict)
    gemm: list = dataclasses.field(default_factory=list)
    products: list = dataclasses.field(default_factory=list)
    stages: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("input", "product", "accumulator", "output"), 0))
    roles: dict = dataclasses.field(default_factory=dict)
    roundings: dict = dataclasses.field(default_factory=dict)
    reads: dict = dataclasses.field(default_factory=dict)
    writes: dict = dataclasses.field(default_factory=dict)
    elementwise: int = 0
    launches: int = 0
    operands: str = ""
    channels: int = 0

    @property
    def bytes_read(self) -> int:
        return sum(self.reads.values())

    @property
    def bytes_written(self) -> int:
        return sum(self.writes.values())

    @property
    def bytes(self) -> int:
        """Bytes read and written."""
        return self.bytes_read + self.bytes_written

    @property
    def key(self) -> tuple:
        return (self.layer, self.product)

    # -- filling ---------------------------------------------------------------------------------
    def _round(self, where, fmt, mode, n):
        if n:
            k = (where, _label(fmt), mode.name)
            self.roundings[k] = self.roundings.get(k, 0) + int(n)

    def role(self, policy, role: str, n: int) -> None:
        """``n`` values rounded into ``policy``'s ``role`` (nothing when its format is None)."""
        r = getattr(policy, role)
        if r.fmt is None or not n:
            return
        self.roles[role] = self.roles.get(role, 0) + int(n)
        self._round(role, r.fmt, r.rounding, n)

    def operand_rounding(self, spec, n: int) -> None:
        """``n`` operand values rounded by ``spec.input`` in the layer (role ``operands``)."""
        if spec.input is None or not n:
            return
        self.roles["operands"] = self.roles.get("operands", 0) + int(n)
        self._round("operands", spec.input, spec.input_rounding, n)

    def matmul(self, spec, R: int, N: int, K: int, a_elems: int, b_elems: int,
               fa, fb, native=None) -> None:
        """One :func:`fixedsim.matmul`-style call: ``(R, K) @ (K, N)`` under ``spec``, its
        operands held in the formats ``fa`` and ``fb`` (None: float64) when the product
        reads them (before ``spec.input`` rounds them). ``native``: the ``(M, N, K)`` a native
        library computes instead (a convolution's input gradient as ``G @ W`` then col2im,
        without the zeros of the transposed convolution fixedsim multiplies and counts)."""
        R, N, K = int(R), int(N), int(K)
        acc = spec.accumulator
        if spec.input is not None:
            fa = fb = spec.input
        operands = _operands_label(fa, fb)
        self.calls += 1
        macs = R * N * K
        self.macs += macs
        key = (operands, _acc_label(spec))
        self.macs_by[key] = self.macs_by.get(key, 0) + macs
        self.gemm.append((*(native or (R, N, K)), *key, fa, fb))
        self.products.append((R, N, K, spec))
        self.operands = operands
        s = self.stages
        if spec.input is not None:
            s["input"] += a_elems + b_elems
            self._round("input", spec.input, spec.input_rounding, a_elems + b_elems)
        if spec.product is not None:
            s["product"] += macs
            self._round("product", spec.product, spec.product_rounding, macs)
        if acc is not None:
            n = R * N * _acc_roundings(acc, K)
            s["accumulator"] += n
            self._round("accumulator", acc.fmt, acc.rounding, n)
        if acc is None or spec.output is not None:
            s["output"] += R * N
            self._round("output", spec.output if spec.output is not None else FP64,
                        spec.output_rounding, R * N)

    def read(self, name: str, fmt, n: int) -> None:
        self.reads[name] = self.reads.get(name, 0) + tensor_bytes(fmt, n)

    def write(self, name: str, fmt, n: int) -> None:
        self.writes[name] = self.writes.get(name, 0) + tensor_bytes(fmt, n)

    def __iadd__(self, other: Row) -> Row:
        self.calls += other.calls
        self.macs += other.macs
        for d, o in ((self.macs_by, other.macs_by), (self.stages, other.stages),
                     (self.roles, other.roles), (self.roundings, other.roundings),
                     (self.reads, other.reads), (self.writes, other.writes)):
            for k, v in o.items():
                d[k] = d.get(k, 0) + v
        self.gemm += other.gemm
        self.products += other.products
        self.elementwise += other.elementwise
        self.launches += other.launches
        self.operands = self.operands or other.operands
        return self


@dataclasses.dataclass
class StepCounts:
    """The rows of one step (a training step, or an evaluation batch).

    Attributes
    ----------
    rows : list of Row
        In execution order: ``input``, each layer's forward, ``loss``, each layer's backward
        (``grad_weight`` then ``grad_input``, last layer first), ``optim``.
    batch : int
    training : bool
    """

    rows: list
    batch: int
    training: bool

    def by_layer(self) -> dict:
        """Per layer name: ``{"calls", "macs", "stages": {...}, "roles": {...}}`` summed over
        its rows, in the shape of :class:`fixedsim.nn.LayerCounters` (for comparing with a
        step's ``ctx.counters``)."""
        out: dict = {}
        for r in self.rows:
            d = out.setdefault(r.layer, {"calls": 0, "macs": 0,
                                         "stages": collections.Counter(),
                                         "roles": collections.Counter()})
            d["calls"] += r.calls
            d["macs"] += r.macs
            d["stages"].update(r.stages)
            d["roles"].update(r.roles)
        return out

    def total(self) -> Row:
        t = Row("total", "", "")
        for r in self.rows:
            t += r
        return t


def _operands_label(fa, fb) -> str:
    la, lb = _label(fa), _label(fb)
    return la if la == lb else f"{la}x{lb}"


def count_step(model, policy, batch: int, in_shape=None, *, optimizer: str = "sgd",
               momentum: float = 0.9, training: bool = True,
               classes: int | None = None) -> StepCounts:
    """The counts of one training step (or one evaluation batch) of ``model`` under ``policy``.

    Parameters
    ----------
    model : fixedsim.nn.Sequential
    policy : fixedsim.nn.Policy
    batch : int
        Images in the step.
    in_shape : tuple of int, optional
        One input's shape, ``(C, H, W)`` or ``(features,)``; default: what the first layer
        takes (a Conv2d: ``(in_channels, 28, 28)``; a Linear or Flatten then Linear:
        ``(in_features,)``).
    optimizer : {"sgd", "adam"}, default "sgd"
    momentum : float, default 0.9
        SGD momentum (0: no momentum buffer).
    training : bool, default True
        False: an evaluation batch (forward only, no loss gradient, no step).
    classes : int, optional
        Width of the logits (default: what the last layer gives).

    Returns
    -------
    StepCounts

    Raises
    ------
    CountError (a ValueError)
        A layer the model cannot count (a class it does not know, a layer with Adaptive Deep
        Reuse: its products depend on the data), or shapes that do not fit.

    Examples
    --------
    >>> import fixedsim as fs
    >>> from fixedsim.cost import count_step
    >>> m = fs.nn.mlp(hidden=(8,), in_features=4, classes=3)
    >>> s = count_step(m, fs.nn.Policy.fp16_mixed(), batch=2)
    >>> [(r.layer, r.product, r.macs) for r in s.rows if r.macs]
    [('1.linear', 'forward', 64), ('3.linear', 'forward', 48), ('3.linear', 'grad_weight', 54), \
('3.linear', 'grad_input', 48), ('1.linear', 'grad_weight', 80)]

    The first Linear (after the Flatten) has no input gradient: the backward pass stops at the
    first layer with parameters.
    """
    from ..nn.layers import (
        AvgPool2d,
        BatchNorm2d,
        Conv2d,
        Dropout,
        Flatten,
        Linear,
        MaxPool2d,
        ReLU,
        Sequential,
    )
    from ..nn.policy import Policy

    if not isinstance(model, Sequential):
        raise CountError(f"cost: the model must be a fixedsim.nn.Sequential (or a model name), "
                         f"got {type(model).__name__}")
    if not isinstance(policy, Policy):
        raise CountError(f"cost: the policy must be a fixedsim.nn.Policy, got {policy!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CountError(f"cost: batch must be an int >= 1, got {batch!r}")
    if optimizer not in ("sgd", "adam"):
        raise CountError(f"cost: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    layers = model.layers
    if in_shape is None:
        in_shape = _default_in_shape(layers)
    shape = (batch, *tuple(int(v) for v in in_shape))
    p = policy
    fwd_in = p.forward.input
    act, wts, err = p.activations.fmt, p.weights.fmt, p.errors.fmt

    def store(fmt, spec_in):  # the format a product operand is held in
        return spec_in if spec_in is not None else fmt

    inp = Row("input", "Input", "forward")
    n_in = math.prod(shape)
    inp.role(p, "activations", n_in)
    inp.read("images", FP32, n_in)
    inp.write("x", act, n_in)
    inp.launches = 1 if act is not None else 0
    inp.elementwise = n_in if act is not None else 0
    fwd_rows, bwd_rows = [inp], []
    first = model.first_trained  # the backward pass stops there (Sequential.backward)
    for i, layer in enumerate(layers):
        name, kind = layer.name, type(layer).__name__
        need_in = i > first
        f = Row(name, kind, "forward")
        gi = Row(name, kind, "grad_input")
        gw = None
        n_x = math.prod(shape)
        if getattr(layer, "reuse", None) is not None:
            raise CountError(f"cost: layer {name} ({kind}) uses Adaptive Deep Reuse, whose "
                             "products depend on the data (clusters found at run time); "
                             "count the dense model, or read a run's counters.csv")
        if isinstance(layer, (Linear, Conv2d)):
            gw = Row(name, kind, "grad_weight")
            wshape = layer.weight.value.shape
            n_w = math.prod(wshape)
            n_b = 0 if layer.bias is None else layer.bias.value.size
            if isinstance(layer, Linear):
                if len(shape) != 2 or shape[1] != layer.in_features:
                    raise CountError(f"cost: layer {name} (Linear) takes (N, "
                                     f"{layer.in_features}), gets {shape}")
                N, I = shape
                O = layer.out_features
                out_shape = (N, O)
                fw = (N, O, I)            # forward: (N, I) @ (I, O)
                gwm = (I, O, N)           # grad weight: (I, N) @ (N, O)
                gim = (N, I, O)           # grad input: (N, O) @ (O, I)
                gim_native = None
                rows_b = N                # rows of the bias gradient's product
            else:
                if len(shape) != 4 or shape[1] != layer.in_channels:
                    raise CountError(f"cost: layer {name} (Conv2d) takes (N, "
                                     f"{layer.in_channels}, H, W), gets {shape}")
                N, C, H, W = shape
                O, _, kh, kw = wshape
                (sh, sw), (ph, pw) = _pair(layer.stride), _pair(layer.padding)
                Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
                if Ho < 1 or Wo < 1:
                    raise CountError(f"cost: layer {name} (Conv2d): a {kh}x{kw} kernel does "
                                     f"not fit the {H}x{W} input")
                out_shape = (N, O, Ho, Wo)
                f.channels = gw.channels = gi.channels = C
                K = C * kh * kw
                fw = (N * Ho * Wo, O, K)
                gwm = (O, K, N * Ho * Wo)
                gim = (N * H * W, C, O * kh * kw)
                gim_native = (N * Ho * Wo, C * kh * kw, O)  # G @ W, then col2im
                rows_b = N * Ho * Wo
            n_y = math.prod(out_shape)
            xf, wf = store(act, fwd_in), store(wts, fwd_in)   # the forward's operand copies
            # forward
            f.operand_rounding(p.forward, n_x + n_w)
            fs_ = _no_input(p.forward)
            f.matmul(fs_, *fw, 0, 0, xf, wf)
            f.role(p, "activations", n_y)
            f.read("x", xf, n_x)
            f.read("w", wf, n_w)
            f.read("b", wts, n_b)
            f.write("y", act, n_y)
            f.elementwise = n_y if n_b else 0
            f.launches = 1
            # grad_weight (and the bias's)
            sgw = p.grad_weight
            gw.matmul(sgw, *gwm, n_y, n_x, xf, err)
            gw.role(p, "weight_grads", n_w)
            gw.read("x", xf, n_x)
            gw.read("grad_y", err, n_y)
            gw.write("grad_w", p.weight_grads.fmt, n_w)
            gw.launches = 1
            if n_b:
                gw.matmul(sgw, 1, n_b, rows_b, rows_b, rows_b * n_b, err, err)
                gw.role(p, "weight_grads", n_b)
                gw.write("grad_b", p.weight_grads.fmt, n_b)
                gw.launches += 1
            # grad_input
            if need_in:
                sgi = p.grad_input
                gi.matmul(sgi, *gim, n_y, n_w, err, wf, native=gim_native)
                gi.role(p, "errors", n_x)
                gi.read("grad_y", err, n_y)
                gi.read("w", wf, n_w)
                gi.write("grad_x", err, n_x)
                gi.launches = 1
        elif isinstance(layer, ReLU):
            out_shape = shape
            f.read("x", act, n_x)
            f.write("y", act, n_x)
            f.elementwise = n_x
            f.launches = 1
            gi.read("grad_y", err, n_x)
            gi.read("x", act, n_x)
            gi.write("grad_x", err, n_x)
            gi.elementwise = n_x
            gi.launches = 1
        elif isinstance(layer, Flatten):
            out_shape = (shape[0], math.prod(shape[1:]))
            f.launches = gi.launches = 1  # a view: no bytes, but a framework operation
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            if len(shape) != 4:
                raise CountError(f"cost: layer {name} ({kind}) takes (N, C, H, W), "
                                 f"gets {shape}")
            N, C, H, W = shape
            (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
            Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
            if Ho < 1 or Wo < 1:
                raise CountError(f"cost: layer {name} ({kind}): window {(kh, kw)} larger than "
                                 f"the input {(H, W)}")
            out_shape = (N, C, Ho, Wo)
            n_y = math.prod(out_shape)
            f.read("x", act, n_x)
            f.write("y", act, n_y)
            f.elementwise = n_y * (kh * kw - 1) + (n_y if isinstance(layer, AvgPool2d) else 0)
            f.launches = 1
            gi.read("grad_y", err, n_y)
            gi.write("grad_x", err, n_x)
            if isinstance(layer, MaxPool2d) and training:  # where each maximum came from
                f.write("indices", None, n_y)            # (int64, as fixedsim and PyTorch
                gi.read("indices", None, n_y)            # keep them for the backward pass)
            gi.elementwise = n_y * kh * kw
            gi.launches = 1
            if isinstance(layer, AvgPool2d):
                f.role(p, "activations", n_y)
                gi.role(p, "errors", n_x)
            elif layer._overlap:
                gi.role(p, "errors", n_x)
        elif isinstance(layer, Dropout):
            out_shape = shape
            if training and layer.p > 0:
                f.role(p, "activations", n_x)
                gi.role(p, "errors", n_x)
                f.read("x", act, n_x)
                f.write("y", act, n_x)
                f.elementwise = 2 * n_x
                f.launches = 1
                gi.read("grad_y", err, n_x)
                gi.write("grad_x", err, n_x)
                gi.elementwise = n_x
                gi.launches = 1
        elif isinstance(layer, BatchNorm2d):
            if len(shape) != 4 or shape[1] != layer.num_features:
                raise CountError(f"cost: layer {name} (BatchNorm2d) takes (N, "
                                 f"{layer.num_features}, H, W), gets {shape}")
            out_shape = shape
            C = shape[1]
            gw = Row(name, kind, "grad_weight")
            f.role(p, "activations", n_x)
            f.read("x", act, 2 * n_x if training else n_x)
            f.read("gamma_beta", wts, 2 * C)
            f.write("y", act, n_x)
            f.elementwise = (5 if training else 3) * n_x
            f.launches = 1
            gw.role(p, "weight_grads", 2 * C)
            gw.read("grad_y", err, n_x)
            gw.read("x", act, n_x)
            gw.write("grad_gamma_beta", p.weight_grads.fmt, 2 * C)
            gw.elementwise = 3 * n_x
            gw.launches = 1
            if need_in:
                gi.role(p, "errors", n_x)
                gi.read("grad_y", err, n_x)
                gi.read("x", act, n_x)
                gi.write("grad_x", err, n_x)
                gi.elementwise = 8 * n_x
                gi.launches = 1
        else:
            raise CountError(f"cost: cannot count layer {name} ({kind}); the cost model counts "
                             "Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, Dropout and "
                             "BatchNorm2d")
        if not need_in:  # nothing before it needs its input gradient: not computed
            gi.reads.clear()
            gi.writes.clear()
            gi.launches = gi.elementwise = 0
        fwd_rows.append(f)
        if training:
            bwd = [gw] if gw is not None else []
            bwd.append(gi)
            bwd_rows = bwd + bwd_rows
        shape = out_shape
    if len(shape) != 2:
        raise CountError(f"cost: the model must end in logits (N, classes), ends in {shape}")
    if classes is not None and shape[1] != classes:
        raise CountError(f"cost: the model gives {shape[1]} logits, not {classes} classes")
    n_logits = math.prod(shape)
    loss = Row("loss", "Loss", "forward")
    loss.read("logits", act, n_logits)
    loss.elementwise = 5 * n_logits
    loss.launches = 1
    rows = fwd_rows + [loss]
    if training:
        lg = Row("loss", "Loss", "grad_input")
        lg.role(p, "errors", n_logits)
        lg.write("grad_logits", err, n_logits)
        lg.elementwise = 2 * n_logits
        lg.launches = 1
        rows += [lg] + bwd_rows
        rows.append(_optimizer_row(model, p, optimizer, momentum))
    return StepCounts(rows=rows, batch=batch, training=training)


def _optimizer_row(model, p, optimizer, momentum):
    row = Row("optim", "Adam" if optimizer == "adam" else "SGD", "update")
    for par in model.parameters():
        n = par.value.size
        if optimizer == "adam":
            row.role(p, "momentum", 2 * n)
            row.read("m_v", p.momentum.fmt, 2 * n)
            row.write("m_v", p.momentum.fmt, 2 * n)
            row.elementwise += 12 * n
        elif momentum:
            row.role(p, "momentum", n)
            row.read("momentum", p.momentum.fmt, n)
            row.write("momentum", p.momentum.fmt, n)
            row.elementwise += 2 * n
        row.role(p, "update", n)
        row.role(p, "weights", n)
        row.read("grad", p.weight_grads.fmt, n)
        row.read("w", p.weights.fmt, n)
        row.write("w", p.weights.fmt, n)
        if p.forward.input is not None:  # the low-precision copy the next forward reads
            row.write("w_copy", p.forward.input, n)
        row.elementwise += 2 * n
        row.launches += 1
    return row


def _no_input(spec):
    from ..nn.layers import _operands_rounded

    return _operands_rounded(spec)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _default_in_shape(layers):
    from ..nn.layers import Conv2d, Flatten, Linear

    for layer in layers:
        if isinstance(layer, Conv2d):
            return (layer.in_channels, 28, 28)
        if isinstance(layer, Linear):
            return (layer.in_features,)
        if not isinstance(layer, Flatten):
            break
    raise CountError("cost: give in_shape (the shape of one input): the model's first layer "
                     "does not say it")


def count_epoch(model, policy, batch: int, images: int, in_shape=None, *, test_images: int = 0,
                eval_batch: int = 1000, optimizer: str = "sgd", momentum: float = 0.9) -> list:
    """The steps of one epoch: ``[(StepCounts, repeats), ...]``.

    ``ceil(images / batch)`` training steps (the last one smaller when ``batch`` does not
    divide ``images``), then the evaluation of ``test_images`` in batches of ``eval_batch``
    (as :func:`fixedsim.nn.train` runs them).
    """
    for what, v, low in (("batch", batch, 1), ("images", images, 1),
                         ("test_images", test_images, 0), ("eval_batch", eval_batch, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise CountError(f"cost: {what} must be an int >= {low}, got {v!r}")
    kw = dict(in_shape=in_shape, optimizer=optimizer, momentum=momentum)
    full, rest = divmod(images, batch)
    out = []
    if full:
        out.append((count_step(model, policy, batch, **kw), full))
    if rest:
        out.append((count_step(model, policy, rest, **kw), 1))
    if test_images:
        full, rest = divmod(test_images, eval_batch)
        if full:
            out.append((count_step(model, policy, eval_batch, training=False, **kw), full))
        if rest:
            out.append((count_step(model, policy, rest, training=False, **kw), 1))
    return out
