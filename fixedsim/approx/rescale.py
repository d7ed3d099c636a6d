"""Kernel rescaling: train at a lower resolution first, then continue at full resolution.

Buarque de Gusmão, Francini, Lepsøy and Magli ("Fast Training of Convolutional Neural
Networks via Kernel Rescaling", arXiv:1610.03623) pre-train a network on images downsampled
by a factor ``s`` with kernels ``s`` times smaller, then rescale the kernels to full size and
continue at full resolution, exploiting the spatial scaling property of convolutions. Only
the paper's abstract could be read here; the rules below are fixedsim's (docs/approx.md).

The scaling property, exactly. Let ``x_hi = upsample(x_lo, s)`` (every pixel replicated
over an ``s x s`` block, :func:`upsample`) and ``w_hi = rescale_kernel(w_lo, s)`` (every
kernel entry replicated over an ``s x s`` block and divided by ``s**2``). Then, with stride
1 and padding ``s * p`` against ``p``::

    conv2d(x_hi, w_hi)[n, o, s*P, s*Q] == conv2d(x_lo, w_lo)[n, o, P, Q]

since each product ``x_lo[.., u, v] * w_lo[.., i, j]`` appears ``s**2`` times in the sum,
each time divided by ``s**2``. The identity is exact in real arithmetic; in binary floating
point the rescaled kernel is exact when ``s`` is a power of two (and nothing underflows),
so under an exact accumulator the two convolutions agree bit for bit there; with ``s = 3`` the
entries ``w / 9`` are rounded and the identity holds to within that rounding. The outputs
between the sampled positions mix neighbouring blocks (an interpolation of the low-resolution
activations). Nearest-neighbour (block) interpolation is the one for which the identity is
exact; a bilinear one would not reproduce the low-resolution activations.

A network is mapped layer by layer (:func:`low_resolution_model`, :func:`expand_model`): the
layers before the resolution has been reduced by ``s`` (by pooling) are scaled, those after
are the same in both networks. A pooling window of stride ``t`` dividing the remaining
factor ``r`` is left out at low resolution (the low-resolution map is already reduced; the
one that completes the reduction becomes a crop, :func:`low_resolution_model` says why) and
leaves ``r / t``; a convolution met while ``r > 1`` has its kernel size and padding divided
by ``r`` (stride 1 only); a Linear layer right after a Flatten met while
``r > 1`` (the MLP) has its input rows replicated over the ``r x r`` blocks and divided by
``r**2`` (exact in the same sense).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from .core import build_setting, optional_setting

__all__ = ["Rescale", "parse_rescale", "downsample", "upsample", "rescale_kernel",
           "rescale_rows", "low_resolution_model", "expand_model"]


def _factor(s, what="rescale factor") -> int:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
        raise ValueError(f"{what} must be an int >= 1, got {s!r}")
    return int(s)


def _check_divides(shape, s, what):
    H, W = shape[-2:]
    if H % s or W % s:
        raise ValueError(f"{what}: the rescale factor {s} does not divide the image size "
                         f"{H}x{W}; choose a factor that divides both (or crop the images)")


def downsample(x, s: int) -> np.ndarray:
    """The mean of every ``s x s`` block of the last two axes, in float64.

    ``s`` must divide both sizes (a ValueError says so otherwise).

    Examples
    --------
    >>> import numpy as np
    >>> from fixedsim.approx.rescale import downsample
    >>> downsample(np.arange(16.0).reshape(1, 1, 4, 4), 2)[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    s = _factor(s)
    x = np.asarray(x, np.float64)
    _check_divides(x.shape, s, "downsample")
    H, W = x.shape[-2:]
    return x.reshape(*x.shape[:-2], H // s, s, W // s, s).mean(axis=(-3, -1))


def upsample(x, s: int) -> np.ndarray:
    """Every pixel of the last two axes replicated over an ``s x s`` block."""
    s = _factor(s)
    x = np.asarray(x)
    return np.repeat(np.repeat(x, s, axis=-2), s, axis=-1)


def rescale_kernel(w, s: int) -> np.ndarray:
    """The full-size kernel of a low-resolution kernel ``w`` (O, C, kh, kw): every entry
    replicated over an ``s x s`` block and divided by ``s**2`` (float64, one rounding:
    exact when ``s`` is a power of two).

    Examples
    --------
    >>> import numpy as np
    >>> from fixedsim.approx.rescale import rescale_kernel
    >>> rescale_kernel(np.array([[[[4.0, -8.0]]]]), 2)[0, 0]
    array([[ 1.,  1., -2., -2.],
           [ 1.,  1., -2., -2.]])
    """
    s = _factor(s)
    w = np.asarray(w, np.float64)
    if w.ndim != 4:
        raise ValueError(f"rescale_kernel: expected a kernel (O, C, kh, kw), got shape {w.shape}")
    return upsample(w, s) / (s * s)


def rescale_rows(W, in_shape, s: int) -> np.ndarray:
    """The rows of a Linear weight ``W`` (C*h*w, out) whose input is a flattened ``(C, h, w)``
    map, for the map upsampled by ``s``: each row replicated over its ``s x s`` block and
    divided by ``s**2`` (float64)."""
    s = _factor(s)
    C, h, w = in_shape
    W = np.asarray(W, np.float64)
    if W.shape[0] != C * h * w:
        raise ValueError(f"rescale_rows: W has {W.shape[0]} rows, the map {in_shape} "
                         f"{C * h * w}")
    return upsample(W.reshape(C, h, w, -1).transpose(3, 0, 1, 2), s).transpose(
        1, 2, 3, 0).reshape(C * h * w * s * s, -1) / (s * s)


@dataclasses.dataclass
class Rescale:
    """The kernel rescaling schedule of a run: low resolution (images downsampled by
    ``factor``) for the epochs before ``epoch``, full resolution from ``epoch`` on.

    Parameters
    ----------
    factor : int >= 2
    epoch : int >= 1
        The first epoch (0-based) at full resolution: ``"2:3"`` trains epochs 0, 1 and 2
        (the first three) at half resolution.

    Examples
    --------
    >>> from fixedsim.approx import Rescale
    >>> r = Rescale.parse("2:3")
    >>> r, str(r), r.factor_at(2), r.factor_at(3)
    (Rescale(factor=2, epoch=3), '2:3', 2, 1)
    """

    factor: int = 2
    epoch: int = 1

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, np.integer)) \
                or self.factor < 2:
            raise ValueError(f"Rescale factor must be an int >= 2, got {self.factor!r}")
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, (int, np.integer)) \
                or self.epoch < 1:
            raise ValueError(f"Rescale epoch must be an int >= 1 (the first epoch at full "
                             f"resolution), got {self.epoch!r}")
        self.factor, self.epoch = int(self.factor), int(self.epoch)

    def __str__(self):
        return f"{self.factor}:{self.epoch}"

    def factor_at(self, epoch: int) -> int:
        """The downsampling factor of ``epoch`` (0-based): ``factor`` before the switch,
        1 from it on."""
        return self.factor if epoch < self.epoch else 1

    def state_dict(self) -> dict:
        return {"factor": self.factor, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("factor"), state.get("epoch")) != (self.factor, self.epoch):
            raise ValueError(f"the checkpoint's rescale schedule {state} is not this run's "
                             f"{self.state_dict()}")

    @classmethod
    def parse(cls, text: str) -> Rescale:
        """From ``"FACTOR:EPOCH"`` (``"2:3"``)."""
        if not isinstance(text, str):
            raise TypeError(f"Rescale.parse expects a string, got {text!r}")
        parts = text.strip().split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            factor, epoch = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"rescale setting {text!r}: expected FACTOR:EPOCH (two ints, "
                             f"e.g. '2:3': half resolution for the first 3 epochs)") from None
        return build_setting(cls, {"factor": factor, "epoch": epoch}, "rescale setting", text)


def parse_rescale(text) -> Rescale | None:
    """``""`` or None: none; a string: :meth:`Rescale.parse`; a :class:`Rescale`: itself."""
    return optional_setting(Rescale, text)


# -- networks ------------------------------------------------------------------------------------
def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(u) for u in v)


def _plan(model, in_shape, s):
    """Per layer: the remaining factor ``r`` it meets (``None`` once reduced), and what it
    becomes at low resolution; ValueError naming the layer that does not scale."""
    from ..nn.layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d

    _check_divides(in_shape, s, f"rescale {s} of images {tuple(in_shape)}")
    r, plan, prev = s, [], None
    for layer in model.layers:
        step = ("same", None)
        if r > 1:
            if isinstance(layer, Conv2d):
                kh, kw = layer.kernel_size
                (sh, sw), (ph, pw) = _pair(layer.stride), _pair(layer.padding)
                if (sh, sw) != (1, 1):
                    raise ValueError(f"rescale {s}: layer {layer.name} has stride "
                                     f"{(sh, sw)}; kernels are rescaled only at stride 1")
                if kh % r or kw % r or ph % r or pw % r:
                    raise ValueError(
                        f"rescale {s}: the {kh}x{kw} kernel (padding {(ph, pw)}) of layer "
                        f"{layer.name} does not scale by {r}: its size and padding must be "
                        f"multiples of {r} (e.g. a model option giving {kh * r}x{kw * r} "
                        f"kernels, or a factor dividing {kh})")
                step = ("conv", r)
            elif isinstance(layer, (MaxPool2d, AvgPool2d)):
                (th, tw) = layer.stride
                if th != tw or r % th or layer.kernel_size != layer.stride:
                    raise ValueError(f"rescale {s}: pooling layer {layer.name} (window "
                                     f"{layer.kernel_size}, stride {layer.stride}) does not "
                                     f"divide the remaining factor {r}")
                step = ("identity", r)
                r //= th
            elif isinstance(layer, Linear):
                if not isinstance(prev, Flatten):
                    raise ValueError(f"rescale {s}: layer {layer.name} is a Linear layer met "
                                     "before the resolution is reduced, not after a Flatten")
                step = ("rows", r)
                r = 1
            elif isinstance(layer, Flatten):
                step = ("same", r)
        plan.append(step)
        prev = layer
    return plan


def low_resolution_model(model, in_shape, s: int, seed: int = 0):
    """The network of ``model`` (a Sequential) for images downsampled by ``s``: smaller
    kernels, the pooling layers that reduce by ``s`` replaced by a crop, the first Linear after
    a Flatten with fewer inputs (module notes). New layers are initialised as their kind is
    (He uniform, from ``numpy.random.default_rng(seed)``); layers after the reduction are
    deep copies. A layer that does not scale raises ValueError naming it.

    The crop: a stride-1 convolution gives ``s*h + 2p - k + 1`` outputs at full resolution
    and ``h + (2p - k)/s + 1`` at low resolution, so after the pooling by ``s`` the
    full-resolution map has one row and one column fewer than the low-resolution one; the
    low-resolution network drops its last ones there, so the layers after it are the same.
    """
    from ..nn.layers import Conv2d, Linear, Sequential

    s = _factor(s)
    plan = _plan(model, in_shape, s)
    rng = np.random.default_rng(seed)
    C, H, W = in_shape
    shape, hi_shape = (C, H // s, W // s), (C, H, W)
    layers, flat_shape = [], None
    for layer, (kind, r) in zip(model.layers, plan, strict=True):
        hi_next = _out_shape(layer, hi_shape)
        if kind == "conv":
            kh, kw = layer.kernel_size
            (ph, pw) = _pair(layer.padding)
            new = Conv2d(layer.in_channels, layer.out_channels, (kh // r, kw // r),
                         padding=(ph // r, pw // r), bias=layer.bias is not None, rng=rng)
        elif kind == "identity":  # the reduction completes here: crop to the pooled size
            new = _crop_layer(hi_next[1:] if r == layer.stride[0] else shape[1:])
            if r == layer.stride[0] and (shape[1] < hi_next[1] or shape[2] < hi_next[2]):
                raise ValueError(f"rescale {s}: before {layer.name} the low-resolution map "
                                 f"{shape} is smaller than the pooled full-resolution one "
                                 f"{hi_next}")
        elif kind == "rows":
            n = int(np.prod(flat_shape))
            new = Linear(n, layer.out_features, bias=layer.bias is not None, rng=rng)
        else:
            new = copy.deepcopy(layer)
        if kind == "same" and r is not None:
            flat_shape = shape
        layers.append(new)
        shape, hi_shape = _out_shape(new, shape), hi_next
    return Sequential(*layers)


def _crop_layer(hw):
    """A layer keeping the first ``hw`` rows and columns (its backward pads with zeros)."""
    from ..nn.core import Module

    class Crop(Module):
        size = tuple(int(v) for v in hw)

        def extra_repr(self):
            return f"size={self.size}"

        def forward(self, x, ctx):
            self._shape = np.shape(x)
            return np.ascontiguousarray(np.asarray(x)[..., :self.size[0], :self.size[1]])

        def backward(self, grad_y, ctx, need_input_grad=True):
            g = np.asarray(grad_y)
            out = np.zeros(self._shape, g.dtype)
            out[..., :self.size[0], :self.size[1]] = g
            return out

    return Crop()


def _out_shape(layer, shape):
    """The per-example output shape of ``layer`` for a per-example input ``shape``."""
    from ..nn.layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d

    if isinstance(layer, Conv2d):
        (sh, sw), (ph, pw) = _pair(layer.stride), _pair(layer.padding)
        kh, kw = layer.kernel_size
        return (layer.out_channels, (shape[1] + 2 * ph - kh) // sh + 1,
                (shape[2] + 2 * pw - kw) // sw + 1)
    if isinstance(layer, (MaxPool2d, AvgPool2d)):
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        return (shape[0], (shape[1] - kh) // sh + 1, (shape[2] - kw) // sw + 1)
    if isinstance(layer, Flatten):
        return (int(np.prod(shape)),)
    if isinstance(layer, Linear):
        return (layer.out_features,)
    if hasattr(layer, "size") and type(layer).__name__ == "Crop":
        return (shape[0], *layer.size)
    return shape


def expand_model(low, model, in_shape, s: int) -> dict:
    """The full-resolution parameter values of ``model`` from the low-resolution network
    ``low`` (:func:`low_resolution_model` of ``model``): kernels rescaled
    (:func:`rescale_kernel`), the first Linear's rows replicated (:func:`rescale_rows`),
    the other parameters copied. Returns ``{name: float64 array}`` (the caller rounds them
    into its weight role and sets them); the shapes are ``model``'s."""
    s = _factor(s)
    plan = _plan(model, in_shape, s)
    out = {}
    C, H, W = in_shape
    shape = (C, H // s, W // s)
    flat_shape = None
    for lo, hi, (kind, r) in zip(low.layers, model.layers, plan, strict=True):
        if kind == "same" and r is not None:
            flat_shape = shape
        for p_lo, p_hi in zip(lo.parameters(), hi.parameters(), strict=True):
            v = np.asarray(p_lo.value, np.float64)
            if kind == "conv" and p_lo.name == "weight":
                v = rescale_kernel(v, r)
            elif kind == "rows" and p_lo.name == "weight":
                v = rescale_rows(v, flat_shape, r)
            if v.shape != p_hi.value.shape:
                raise ValueError(f"expand_model: {hi.name}.{p_hi.name} has shape "
                                 f"{p_hi.value.shape}, the rescaled value {v.shape}; the "
                                 "network's sizes do not scale by the factor")
            out[f"{hi.name}.{p_hi.name}"] = v
        shape = _out_shape(lo, shape)
    return out
