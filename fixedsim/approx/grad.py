"""Gradient approximation: cheaper backward passes of a Linear or Conv2d layer.

Wang, Nelaturu and Amarasinghe ("Accelerated CNN Training Through Gradient Approximation",
EMC2 2019, arXiv:1908.05460) explore three ways of approximating a layer's gradients; their
text could not be read here (only its abstract), so this module implements the documented
family those methods belong to, as docs/approx.md says:

- ``"topk"`` (meProp, Sun, Ren, Ma and Wang, ICML 2017): the error ``dY`` reaching the layer
  keeps, for each example, its ``k`` entries of largest magnitude (ties: the lower flat
  index, row-major over the example's entries); the others become 0. Deterministic, biased.
- ``"random"``: each entry of ``dY`` is kept independently with probability ``p`` and divided
  by ``p`` (in float64, one rounding, then held in the ``errors`` role like any error); the
  others become 0. Unbiased before the rounding into the role.
- ``"stale"``: the weight gradient is computed on the steps ``step % n == 0`` only; on the
  other steps the layer reuses the last one computed (as held in ``weight_grads``). The
  input gradient and the bias gradient are computed every step.

``"topk"`` and ``"random"`` replace ``dY`` before the layer's backward products: the weight,
input and bias gradients are those of the sparse error, computed under the policy's specs as
in the dense layer. The emulator runs the dense product of the sparse error (its zeros
included); what a sparse kernel would perform is counted apart (module notes of
:class:`GradApprox`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..quantize import child_seed
from .core import build_setting, keep_count, optional_setting, parse_keep, parse_options

__all__ = ["GRAD_METHODS", "GradApprox", "parse_grad_approx", "topk_error", "sample_error"]

#: The gradient approximation methods.
GRAD_METHODS = ("topk", "random", "stale")


@dataclasses.dataclass(frozen=True)
class GradApprox:
    """The gradient approximation setting of a Conv2d or Linear layer.

    Parameters
    ----------
    method : {"topk", "random", "stale"}
    keep : int or float
        ``"topk"``: entries of ``dY`` kept per example, a count (int >= 1) or a fraction in
        (0, 1] of the example's entries (:func:`fixedsim.approx.keep_count`); ``"random"``:
        the probability ``p`` in (0, 1] (a float) that an entry is kept; ``"stale"``: the
        period ``n`` (an int >= 1): the weight gradient is computed every ``n``-th step.
    seed : int, default 0
        Mixed into the draws of ``"random"`` (which derive from the run seed, the step and
        the layer).

    What is counted (the layer's :class:`~fixedsim.counters.ApproxCounts`, training passes):
    ``backward_macs`` and ``backward_dense_macs`` of the weight- and input-gradient products.
    For ``"topk"`` and ``"random"`` one entry of ``dY`` costs ``K`` multiply-accumulates in
    each product (``K`` = in_features of a Linear, ``C * kh * kw`` of a Conv2d: its row of
    ``dW`` contributions and its scatter into ``dX``), so a product is counted as ``nnz(dY')
    * K`` performed against ``size(dY) * K`` dense; ``pairs`` and ``kept`` count the entries of
    ``dY`` and those kept. For ``"stale"`` a skipped weight gradient counts 0 against the
    dense product's MACs, a computed one the dense MACs; ``pairs`` counts the weight
    gradients due and ``kept`` those computed.

    Examples
    --------
    >>> from fixedsim.approx import GradApprox
    >>> GradApprox.parse("topk:0.3")
    GradApprox(method='topk', keep=0.3, seed=0)
    >>> str(GradApprox.parse("random:0.5:seed=2")), str(GradApprox("stale", 4))
    ('random:0.5:seed=2', 'stale:4')
    """

    method: str = "topk"
    keep: float = 0.3
    seed: int = 0

    def __post_init__(self):
        if self.method not in GRAD_METHODS:
            raise ValueError(f"GradApprox method must be one of {', '.join(GRAD_METHODS)}, "
                             f"got {self.method!r}")
        k = self.keep
        is_int = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
        is_float = isinstance(k, (float, np.floating))
        if self.method == "topk":
            ok = (is_int and k >= 1) or (is_float and math.isfinite(k) and 0 < k <= 1)
            rule = "an int count >= 1 or a float fraction in (0, 1]"
        elif self.method == "random":
            ok = is_float and math.isfinite(k) and 0 < k <= 1
            rule = "a float probability in (0, 1]"
        else:
            ok = is_int and k >= 1
            rule = "an int period >= 1 (the weight gradient is computed every n-th step)"
        if not ok:
            raise ValueError(f"GradApprox {self.method} keep must be {rule}, got {k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or \
                self.seed < 0:
            raise ValueError(f"GradApprox seed must be an int >= 0, got {self.seed!r}")

    def __str__(self):
        return f"{self.method}:{self.keep}" + (f":seed={self.seed}" if self.seed else "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, text: str) -> GradApprox:
        """From ``"METHOD:KEEP[:seed=N]"`` (the form ``str`` gives): ``KEEP`` with a decimal
        point or an exponent is a float, else an int (``"topk:0.3"``, ``"topk:8"``,
        ``"random:0.5"``, ``"stale:4"``)."""
        if not isinstance(text, str):
            raise TypeError(f"GradApprox.parse expects a string, got {text!r}")
        parts = [p.strip() for p in text.strip().split(":")]
        form = "METHOD:KEEP[:seed=N] (topk:FRACTION|COUNT, random:P, stale:N)"
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"grad approx setting {text!r}: expected {form}, e.g. 'topk:0.3'")
        keep = parse_keep(parts[1], "grad approx setting", text, "an int or a float")
        kw = {"method": parts[0], "keep": keep}
        parse_options(parts[2:], {"seed": ("seed", int, "an int")}, kw, "grad approx setting",
                      text, form)
        return build_setting(cls, kw, "grad approx setting", text)


def parse_grad_approx(text) -> GradApprox | None:
    """``""`` or None: none; a string: :meth:`GradApprox.parse`; a :class:`GradApprox`:
    itself."""
    return optional_setting(GradApprox, text)


def topk_error(g, keep):
    """``g`` with, for each example (first axis), only its ``k`` entries of largest magnitude
    (ties: the lower flat index); the others are zeros of ``g``'s dtype.

    Returns ``(g', k)``; ``keep`` a count in [1, entries per example] or a fraction in
    (0, 1] (:func:`fixedsim.approx.keep_count`).

    Examples
    --------
    >>> import numpy as np
    >>> from fixedsim.approx.grad import topk_error
    >>> topk_error(np.array([[0.5, -3.0, 1.0, 3.0], [2.0, 0.0, -0.25, 1.0]]), 2)
    (array([[ 0., -3.,  0.,  3.],
           [ 2.,  0.,  0.,  1.]]), 2)
    """
    g = np.asarray(g)
    if g.ndim < 2:
        raise ValueError(f"topk_error: expected an error with a batch axis, got shape {g.shape}")
    flat = g.reshape(g.shape[0], -1)
    k = keep_count(keep, flat.shape[1], "grad approx keep")
    idx = np.argsort(-np.abs(flat), axis=1, kind="stable")[:, :k]
    mask = np.zeros(flat.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return np.where(mask, flat, np.zeros((), g.dtype)).reshape(g.shape), k


def sample_error(g, p: float, rng):
    """Each entry of ``g`` kept with probability ``p`` and divided by ``p`` (float64); the
    others 0. ``rng``: a ``numpy.random.Generator`` or a seed; one ``Generator.random(g.shape)``
    call, entry kept where ``u < p``. Returns ``(g', mask)``."""
    if not (isinstance(p, (float, np.floating)) and math.isfinite(p) and 0 < p <= 1):
        raise ValueError(f"sample_error: p must be a float in (0, 1], got {p!r}")
    g64 = np.asarray(g, np.float64)
    mask = np.random.default_rng(rng).random(g64.shape) < p
    return np.where(mask, g64 / p, 0.0), mask


# -- layers --------------------------------------------------------------------------------------
def approximate_error(layer, grad_y, ctx):
    """The error the layer's backward products use (``"topk"`` / ``"random"``), counted."""
    ga = layer.grad_approx
    if ga.method == "stale":
        return grad_y
    if not np.isfinite(grad_y).all():  # NaN/inf: a step the loss scaler skips; dense
        layer._grad_approx_nnz = grad_y.size
        return grad_y
    if ga.method == "topk":
        try:
            g, _ = topk_error(grad_y, ga.keep)
        except ValueError as e:
            raise ValueError(f"{layer.name}: grad approx {ga}: {e}") from None
    else:
        rng = np.random.default_rng(child_seed(ga.seed, ctx.key(layer.name, "grad_approx")))
        g, _ = sample_error(grad_y, float(ga.keep), rng)
        g = ctx.round("errors", g, layer.name, "grad_approx")
    nnz = int(np.count_nonzero(g))
    layer._grad_approx_nnz = nnz
    ctx.layer_counters(layer.name).approx.pairs += grad_y.size
    ctx.layer_counters(layer.name).approx.kept += nnz
    ctx.layer_counters(layer.name).approx.sampled += 1
    return g


def count_product(layer, ctx, product: str, G_size: int, K: int):
    """Count one backward product of a layer with a ``"topk"``/``"random"`` setting."""
    nnz = layer._grad_approx_nnz
    ctx.layer_counters(layer.name).approx.add(product, pairs=0, kept=0, macs=nnz * K,
                                              dense_macs=G_size * K)


def stale_step(layer, ctx) -> bool:
    """True when this step reuses the layer's stored weight gradient (``"stale"``); counts
    the weight gradient as due (``pairs``) and, when computed, as kept."""
    ga = layer.grad_approx
    reuse = ctx.step % ga.keep != 0 and layer.stale_grad is not None
    a = ctx.layer_counters(layer.name).approx
    a.pairs += 1
    a.kept += 0 if reuse else 1
    a.sampled += 1
    return reuse
