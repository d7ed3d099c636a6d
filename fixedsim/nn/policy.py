"""The numerics policy of a training run: a format and a rounding for every role a tensor plays.

A :class:`Policy` is plain data (frozen, comparable, printable). It says

- for every *role* (weights, activations, backpropagated errors, weight gradients, the weight
  update, momentum) where such a tensor is stored and how a value is rounded into it
  (:class:`Role`);
- for each of the three products of a layer (forward, input gradient, weight gradient) the
  :class:`fixedsim.MatmulSpec` of the multiply-accumulate array that computes it;
- the loss scaling (:class:`LossScale`), for formats whose range cannot hold small gradients.

See docs/training.md for the meaning of each role, step by step, with the presets' sources.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from .. import blockformats as _bf
from ..blockformats import BlockFormat
from ..formats import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, FixedFormat, FloatFormat, parse_format
from ..matmul import Accumulator, BlockFMA, MatmulSpec
from ..quantize import _check_random_bits, quantize, resolve_overflow
from ..rounding import Overflow, Rounding

__all__ = ["Role", "LossScale", "Policy", "ROLES", "PRODUCTS", "CURVATURE_ROLES"]

_RNE = Rounding.NEAREST_EVEN

#: The roles a tensor plays in training, in the order they appear in a policy.
ROLES = ("weights", "activations", "errors", "weight_grads", "update", "momentum")
#: The three products of a layer, each with its MatmulSpec.
PRODUCTS = ("forward", "grad_input", "grad_weight")
#: The roles of a second-order optimizer's state (:class:`fixedsim.nn.KFAC`): the Kronecker
#: factors, their damped inverses and the preconditioned gradient. A policy that does not name
#: one uses its ``weight_grads`` role there (and ``grad_weight``'s spec for the products of
#: ``curvature_product``); unset, they are left out of :meth:`Policy.to_dict`, so that the
#: plain data, and the run ids hashed from it, of every earlier policy stay as they were.
CURVATURE_ROLES = ("curvature", "inverse", "preconditioned")


@dataclasses.dataclass(frozen=True)
class Role:
    """Where a tensor is stored and how a value is rounded when it is written there.

    Parameters
    ----------
    fmt : FixedFormat, FloatFormat, str or None
        The storage format (a string is parsed by :func:`fixedsim.formats.parse_format`).
        None: values are kept as computed (float64 results stay float64): no rounding.
    rounding : Rounding or str, default NEAREST_EVEN
    overflow : Overflow or str, optional
        As in :func:`fixedsim.quantize` (None: SATURATE for fixed point, INFINITY for IEEE floats).
    random_bits : int, optional
        STOCHASTIC only: random bits per rounding.

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> r = fs.nn.Role("Q<8,4>", "toward_zero")
    >>> r
    Role(Q<8,4>, TOWARD_ZERO)
    >>> r.apply(np.array([0.1, -0.1, 100.0]))
    array([ 0.0625, -0.0625,  7.9375], dtype=float32)
    """

    fmt: FixedFormat | FloatFormat | None = None
    rounding: Rounding = _RNE
    overflow: Overflow | None = None
    random_bits: int | None = None

    def __post_init__(self):
        if self.fmt is not None:
            object.__setattr__(self, "fmt", parse_format(self.fmt))
        object.__setattr__(self, "rounding", Rounding.coerce(self.rounding, what="Role rounding"))
        if self.overflow is not None:
            object.__setattr__(self, "overflow",
                               Overflow.coerce(self.overflow, what="Role overflow"))
        if self.fmt is None and (self.rounding is not _RNE or self.overflow is not None
                                 or self.random_bits is not None):
            raise ValueError("Role: a rounding, overflow or random_bits without a format has no "
                             "effect (fmt=None keeps values as computed)")
        if self.random_bits is not None and self.rounding is not Rounding.STOCHASTIC:
            raise ValueError("Role: random_bits applies to STOCHASTIC rounding only")
        if self.fmt is not None:
            # The checks quantize makes (e.g. WRAP on a float format), without running a
            # kernel: constructing a role stays cheap.
            resolve_overflow(self.fmt, self.overflow)
            _check_random_bits(self.rounding, self.random_bits)

    @property
    def stochastic(self) -> bool:
        """Does writing into this role draw random numbers?"""
        return self.fmt is not None and self.rounding is Rounding.STOCHASTIC

    def apply(self, x, seed=None, *, stats=False):
        """Round ``x`` into the role (``x`` itself, as an array, when ``fmt`` is None).

        Parameters
        ----------
        x : array_like
        seed : int, optional
            Random stream of a STOCHASTIC role (see :func:`fixedsim.quantize`).
        stats : bool, default False
            Also return the :class:`fixedsim.QuantStats` (None when ``fmt`` is None).
        """
        if self.fmt is None:
            import numpy as np

            out = np.asarray(x)
            return (out, None) if stats else out
        return quantize(x, self.fmt, self.rounding, self.overflow, seed=seed,
                        random_bits=self.random_bits, stats=stats)

    def __repr__(self):
        if self.fmt is None:
            return "Role(None)"
        extra = "" if self.overflow is None else f", {self.overflow.name}"
        extra += "" if self.random_bits is None else f", random_bits={self.random_bits}"
        return f"Role({self.fmt!r}, {self.rounding.name}{extra})"

    def to_dict(self) -> dict:
        """Plain data (JSON/TOML): format and enums as strings, unset fields left out."""
        if self.fmt is None:
            return {}
        d = {"format": repr(self.fmt), "rounding": self.rounding.name.lower()}
        if self.overflow is not None:
            d["overflow"] = self.overflow.name.lower()
        if self.random_bits is not None:
            d["random_bits"] = self.random_bits
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "role") -> Role:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming ``where``."""
        _check_keys(d, {"format", "rounding", "overflow", "random_bits"}, where)
        return _build(cls, where, fmt=d.get("format"), rounding=d.get("rounding", "nearest_even"),
                      overflow=d.get("overflow"), random_bits=d.get("random_bits"))


@dataclasses.dataclass(frozen=True)
class LossScale:
    """Multiply the loss by ``scale`` before backward, divide the weight gradients after.

    Parameters
    ----------
    init : float, default 65536.0
        The first scale (a power of two keeps the scaling exact).
    dynamic : bool, default True
        Dynamic scaling: a step whose gradients hold an inf or NaN is skipped and the scale
        multiplied by ``backoff``; after ``growth_interval`` good steps in a row it is multiplied
        by ``growth``. Static (False): the scale never changes and overflowed steps are
        still skipped.
    growth, backoff : float, default 2.0 and 0.5
    growth_interval : int, default 2000

    Notes
    -----
    Defaults follow the dynamic loss scaling of Micikevicius et al., "Mixed precision
    training", ICLR 2018, with the constants of common mixed-precision trainers.
    """

    init: float = 65536.0
    dynamic: bool = True
    growth: float = 2.0
    backoff: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self):
        for name in ("init", "growth"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v > 0):
                raise ValueError(f"LossScale {name} must be a positive finite number, got {v!r}")
        if not (isinstance(self.backoff, (int, float)) and not isinstance(self.backoff, bool)
                and 0 < self.backoff <= 1):
            raise ValueError(f"LossScale backoff must be in (0, 1], got {self.backoff!r}")
        if (isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int)
                or self.growth_interval < 1):
            raise ValueError(f"LossScale growth_interval must be an int >= 1, "
                             f"got {self.growth_interval!r}")
        if not isinstance(self.dynamic, bool):
            raise TypeError(f"LossScale dynamic must be a bool, got {self.dynamic!r}")
        object.__setattr__(self, "init", float(self.init))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "loss_scale") -> LossScale:
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, where)
        return _build(cls, where, **d)


#: The block-format presets by name, as a policy file writes them.
_BLOCK_PRESETS = {name: getattr(_bf, name) for name in _bf.__all__
                  if isinstance(getattr(_bf, name), BlockFormat)}


def _block_to_plain(f: BlockFormat):
    """A block format as a policy file writes it: its preset name, else a table."""
    for name, preset in _BLOCK_PRESETS.items():
        if f == preset:
            return name
    d = {"element": repr(f.element), "block": f.block, "scale": repr(f.scale),
         "scale_rule": f.scale_rule}
    if f.tensor_scale is not None:
        d["tensor_scale"] = repr(f.tensor_scale)
    if f.axis != -1:
        d["axis"] = f.axis
    return d


def _input_from_plain(v, where):
    """``input`` of a product in a policy file: a format name, a block preset name or a block
    format's table."""
    if isinstance(v, str) and v.strip().upper() in _BLOCK_PRESETS:
        return _BLOCK_PRESETS[v.strip().upper()]
    if isinstance(v, dict):
        _check_keys(v, {"element", "block", "scale", "scale_rule", "tensor_scale", "axis"},
                    where)
        if "element" not in v:
            raise ValueError(f"{where}: 'element' is required in a block format's table")
        kw = dict(v)
        for k in ("element", "scale", "tensor_scale"):
            if k in kw:
                kw[k] = _build(parse_format, f"{where}.{k}", kw[k])
        return _build(BlockFormat, where, **kw)
    return _build(parse_format, where, v)


def _block_preset(v, what):
    """A block format given as itself or as a preset's name (``mxfp8`` is ``MXFP8_E4M3``)."""
    if isinstance(v, BlockFormat):
        return v
    if isinstance(v, str):
        key = v.strip().upper()
        key = {"MXFP8": "MXFP8_E4M3"}.get(key, key)
        if key in _BLOCK_PRESETS:
            return _BLOCK_PRESETS[key]
    raise ValueError(f"Policy.mx: {what} must be a BlockFormat or one of "
                     f"{', '.join(n.lower() for n in _BLOCK_PRESETS)} (or mxfp8), got {v!r}")


def _block_name(f: BlockFormat) -> str:
    plain = _block_to_plain(f)
    return plain.lower() if isinstance(plain, str) else "block"


def _spec_to_dict(s: MatmulSpec) -> dict:
    d = {}
    for name in ("input", "product", "output"):
        v = getattr(s, name)
        if isinstance(v, BlockFormat):
            d[name] = _block_to_plain(v)
        elif v is not None:
            d[name] = repr(v)
    for name in ("input_rounding", "product_rounding", "output_rounding"):
        if getattr(s, name) is not _RNE:
            d[name] = getattr(s, name).name.lower()
    if s.random_bits is not None:
        d["random_bits"] = s.random_bits
    a = s.accumulator
    if isinstance(a, BlockFMA):
        ad = {"kind": "block_fma", "block": a.block, "extra_bits": a.extra_bits,
              "rounding": a.rounding.name.lower(), "format": repr(a.fmt)}
        for k in _BLOCK_FMA_OPTIONAL:
            v = getattr(a, k)
            if v is not None:
                ad[k] = list(v) if isinstance(v, tuple) else v
        d["accumulator"] = ad
    elif a is not None:
        ad = {"format": repr(a.fmt), "rounding": a.rounding.name.lower(),
              "overflow": a.overflow.name.lower(), "block": a.block}
        if a.random_bits is not None:
            ad["random_bits"] = a.random_bits
        if a.via is not None:
            ad["via"] = repr(a.via)
        if a.lanes is not None:
            ad["lanes"] = a.lanes
        for name, default in _STRUCTURE_DEFAULTS.items():
            if getattr(a, name) != default:
                ad[name] = getattr(a, name)
        d["accumulator"] = ad
    return d


#: The structure of a matrix unit's accumulator (Accumulator ``order``, ``combine``,
#: ``addend``) with Accumulator's own defaults; ``lanes`` defaults to None.
_STRUCTURE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Accumulator)
                       if f.name in ("order", "combine", "addend")}


def _spec_from_dict(d: dict, where: str) -> MatmulSpec:
    keys = {"input", "product", "output", "accumulator", "input_rounding", "product_rounding",
            "output_rounding", "random_bits"}
    _check_keys(d, keys, where)
    kw = dict(d)
    for name in ("product", "output"):
        if name in kw:
            kw[name] = _build(parse_format, f"{where}.{name}", kw[name])
    if "input" in kw:
        kw["input"] = _input_from_plain(kw["input"], f"{where}.input")
    if "accumulator" in kw:
        a = kw["accumulator"]
        if isinstance(a, str):
            a = {"format": a}
        if not isinstance(a, dict):
            raise ValueError(f"{where}.accumulator: expected a table or a format name, got {a!r}")
        if a.get("kind", "accumulator") == "block_fma":
            kw["accumulator"] = _block_fma_from_dict(a, where)
            return _build(MatmulSpec, where, **kw)
        if a.get("kind", "accumulator") != "accumulator":
            raise ValueError(f"{where}.accumulator.kind must be 'accumulator' (the default) or "
                             f"'block_fma', got {a['kind']!r}")
        a = {k: v for k, v in a.items() if k != "kind"}
        _check_keys(a, {"format", "rounding", "overflow", "block", "random_bits", "via",
                        "lanes", *_STRUCTURE_DEFAULTS}, f"{where}.accumulator")
        if "format" not in a:
            raise ValueError(f"{where}.accumulator: 'format' is required")
        via = a.get("via")
        kw["accumulator"] = _build(
            Accumulator, f"{where}.accumulator",
            _build(parse_format, f"{where}.accumulator.format", a["format"]),
            a.get("rounding", "nearest_even"), a.get("overflow"), a.get("block", 1),
            random_bits=a.get("random_bits"),
            via=None if via is None else _build(parse_format, f"{where}.accumulator.via", via),
            lanes=a.get("lanes"),
            **{k: a.get(k, default) for k, default in _STRUCTURE_DEFAULTS.items()})
    return _build(MatmulSpec, where, **kw)


#: The BlockFMA fields a policy file writes only when they are set (not None); a tuple
#: (``addend_bits``) is written as a list.
_BLOCK_FMA_OPTIONAL = ("output_frac_bits", "min_exp", "promote", "interleave", "addend_bits",
                       "zero_exp", "product_inf_exp", "groups")


def _block_fma_from_dict(a: dict, where: str) -> BlockFMA:
    """A :class:`~fixedsim.BlockFMA` from ``{"kind": "block_fma", "block", "extra_bits",
    "rounding", "format", "output_frac_bits", "min_exp", "promote", "interleave",
    "addend_bits", "zero_exp", "product_inf_exp", "groups"}`` (the last ten optional;
    ``addend_bits`` a list ``[m, c]`` or ``[m, c, d]``)."""
    w = f"{where}.accumulator"
    _check_keys(a, {"kind", "block", "extra_bits", "rounding", "format",
                    *_BLOCK_FMA_OPTIONAL}, w)
    for k in ("block", "extra_bits"):
        if k not in a:
            raise ValueError(f"{w}: '{k}' is required for kind 'block_fma'")
    kw = {k: a[k] for k in ("rounding", *_BLOCK_FMA_OPTIONAL) if k in a}
    if "format" in a:
        kw["fmt"] = _build(parse_format, f"{w}.format", a["format"])
    return _build(BlockFMA, w, a["block"], a["extra_bits"], **kw)


def _check_keys(d, allowed, where):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table (dict), got {type(d).__name__} {d!r}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(sorted(allowed))}")


def _build(factory, where, *args, **kw):
    try:
        return factory(*args, **kw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _role(fmt, rounding=_RNE) -> Role:
    return Role(fmt, rounding)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Formats and roundings of every tensor and product in training.

    Parameters
    ----------
    name : str
        A label (kept in run records).
    weights : Role
        The stored parameters. Initial values and every updated value ``w - step`` are rounded
        into it (Gupta et al.'s stochastic rounding of the update is ``weights`` with
        STOCHASTIC rounding).
    activations : Role
        Every layer output in the forward pass (and the network input).
    errors : Role
        Backpropagated errors: the gradient of the loss with respect to each activation.
    weight_grads : Role
        Gradients of the weights and biases (the outputs of the weight-gradient products).
    update : Role
        The step ``lr * direction`` before it is subtracted from the weights.
    momentum : Role
        Optimizer state (momentum buffer; Adam's moments).
    forward, grad_input, grad_weight : MatmulSpec
        The multiply-accumulate arrays of the three products of a Linear or Conv2d layer.
        ``forward.input`` rounds the layer input and the weights for the product; the backward
        products reuse those rounded copies, as hardware reuses its low-precision weight copy.
        A spec's ``seed`` must be None: the trainer seeds each call.
    loss_scale : LossScale, optional
    master_note : str
        Free text describing where the preset comes from (documentation only).
    curvature, inverse, preconditioned : Role, optional
        The roles of :class:`fixedsim.nn.KFAC`'s state (:data:`CURVATURE_ROLES`): the
        Kronecker factors A and G (running averages), their damped inverses, and the
        preconditioned gradient. None (the default): the ``weight_grads`` role
        (:meth:`curvature_role`).
    curvature_product : MatmulSpec, optional
        The multiply-accumulate array of K-FAC's products (factor accumulation ``X^T X``,
        ``E^T E`` and the preconditioning ``A^-1 grad G^-1``). None (the default):
        ``grad_weight``'s spec (:meth:`curvature_spec`).

    Examples
    --------
    >>> import fixedsim as fs
    >>> p = fs.nn.Policy.fixed(16, 14, "stochastic")
    >>> p.weights, p.errors
    (Role(Q<16,14>, STOCHASTIC), Role(Q<16,14>, STOCHASTIC))
    >>> fs.nn.Policy.from_dict(p.to_dict()) == p
    True
    """

    name: str = "custom"
    weights: Role = Role()
    activations: Role = Role()
    errors: Role = Role()
    weight_grads: Role = Role()
    update: Role = Role()
    momentum: Role = Role()
    forward: MatmulSpec = MatmulSpec()
    grad_input: MatmulSpec = MatmulSpec()
    grad_weight: MatmulSpec = MatmulSpec()
    loss_scale: LossScale | None = None
    master_note: str = dataclasses.field(default="", compare=False)
    curvature: Role | None = None
    inverse: Role | None = None
    preconditioned: Role | None = None
    curvature_product: MatmulSpec | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Policy name must be a non-empty string, got {self.name!r}")
        for r in ROLES:
            if not isinstance(getattr(self, r), Role):
                raise TypeError(f"Policy {r} must be a fixedsim.nn.Role, "
                                f"got {getattr(self, r)!r}")
        for p in PRODUCTS:
            s = getattr(self, p)
            if not isinstance(s, MatmulSpec):
                raise TypeError(f"Policy {p} must be a fixedsim.MatmulSpec, got {s!r}")
            if s.seed is not None:
                raise ValueError(f"Policy {p}: the spec's seed must be None (each training "
                                 "step seeds its products)")
        if self.loss_scale is not None and not isinstance(self.loss_scale, LossScale):
            raise TypeError(f"Policy loss_scale must be a LossScale or None, "
                            f"got {self.loss_scale!r}")
        for r in CURVATURE_ROLES:
            v = getattr(self, r)
            if v is not None and not isinstance(v, Role):
                raise TypeError(f"Policy {r} must be a fixedsim.nn.Role or None (the "
                                f"weight_grads role), got {v!r}")
        s = self.curvature_product
        if s is not None:
            if not isinstance(s, MatmulSpec):
                raise TypeError(f"Policy curvature_product must be a fixedsim.MatmulSpec or "
                                f"None (grad_weight's spec), got {s!r}")
            if s.seed is not None:
                raise ValueError("Policy curvature_product: the spec's seed must be None "
                                 "(each training step seeds its products)")

    def curvature_role(self, name: str) -> Role:
        """The role ``name`` (one of :data:`CURVATURE_ROLES`) as K-FAC rounds into it: the
        policy's own when set, else ``weight_grads``.

        Examples
        --------
        >>> import fixedsim as fs
        >>> p = fs.nn.Policy.bf16()
        >>> p.curvature_role("inverse")            # not set: the weight_grads role
        Role(BF16, NEAREST_EVEN)
        >>> q = fs.nn.Policy.from_dict({**p.to_dict(), "inverse": {"format": "FP32"}})
        >>> q.curvature_role("inverse")
        Role(FP32, NEAREST_EVEN)
        """
        if name not in CURVATURE_ROLES:
            raise ValueError(f"unknown curvature role {name!r}; expected one of "
                             f"{', '.join(CURVATURE_ROLES)}")
        r = getattr(self, name)
        return self.weight_grads if r is None else r

    def curvature_spec(self) -> MatmulSpec:
        """The spec of K-FAC's products: ``curvature_product`` when set, else
        ``grad_weight``."""
        return self.grad_weight if self.curvature_product is None else self.curvature_product

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def exact(cls) -> Policy:
        """Float64 everywhere, every product sum exact and rounded once into float64.

        The reference for gradient checks: no role rounds below float64.
        """
        return cls(name="exact", master_note="float64 values, exactly accumulated products")

    @classmethod
    def float32(cls, accumulator: str = "exact") -> Policy:
        """IEEE single precision: every role FP32 round-to-nearest-even.

        Parameters
        ----------
        accumulator : {"exact", "fma_chain"}, default "exact"
            How the three products of a layer sum:

            - ``"exact"``: each output is the exact dot product rounded once to nearest even
              into FP32 (``MatmulSpec(output=FP32)``): a correctly rounded float32 product,
              independent of summation order and thread count, bit-reproducible on every
              machine, and more exact than any BLAS.
            - ``"fma_chain"``: a chain of float32 fused multiply-adds in ``k`` order
              (``MatmulSpec(accumulator=Accumulator(FP32))``), the model of a scalar CPU loop
              (policy name ``float32_fma_chain``).

        Examples
        --------
        >>> import fixedsim as fs
        >>> fs.nn.Policy.float32().forward
        MatmulSpec(output=FP32)
        >>> fs.nn.Policy.float32("fma_chain").name
        'float32_fma_chain'
        """
        r = _role(FP32)
        if accumulator == "exact":
            spec, name, note = (MatmulSpec(output=FP32), "float32",
                                "IEEE 754 binary32 throughout, correctly rounded products")
        elif accumulator == "fma_chain":
            spec, name, note = (MatmulSpec(accumulator=Accumulator(FP32)), "float32_fma_chain",
                                "IEEE 754 binary32 throughout, products as FP32 FMA chains")
        else:
            raise ValueError(f"Policy.float32 accumulator must be 'exact' or 'fma_chain', "
                             f"got {accumulator!r}")
        return cls(name=name, weights=r, activations=r, errors=r, weight_grads=r,
                   update=r, momentum=r, forward=spec, grad_input=spec, grad_weight=spec,
                   master_note=note)

    @classmethod
    def fixed(cls, word_length: int = 16, frac_length: int = 14,
              rounding: Rounding | str = Rounding.STOCHASTIC) -> Policy:
        """Gupta et al., ICML 2015: fixed point ``<IL, FL>`` everywhere, exact accumulation.

        Weights, activations, errors, weight gradients and momentum are
        ``FixedFormat(word_length, frac_length)`` (``IL = word_length - frac_length`` counts the
        sign bit), rounded with ``rounding``; products accumulate exactly (the FPGA's wide
        accumulators) and are rounded once, into the role of their result; the updated weight
        ``w - lr * grad`` is rounded into the weight format, stochastically when ``rounding``
        is STOCHASTIC. The step itself is not rounded separately (it reaches the weights in
        the same single rounding).
        """
        fmt = _build(FixedFormat, "Policy.fixed", word_length, frac_length)
        rounding = Rounding.coerce(rounding, what="Policy.fixed rounding")
        r = _role(fmt, rounding)
        exact = MatmulSpec()
        return cls(name=f"fixed<{word_length},{frac_length}>:{rounding.name.lower()}",
                   weights=r, activations=r, errors=r, weight_grads=r, momentum=r,
                   forward=exact, grad_input=exact, grad_weight=exact,
                   master_note="Gupta, Agrawal, Gopalakrishnan, Narayanan, 'Deep learning with "
                               "limited numerical precision', ICML 2015")

    @classmethod
    def fp16_mixed(cls, loss_scale: LossScale | float | str | None = "dynamic") -> Policy:
        """Micikevicius et al., ICLR 2018: FP16 storage and products, FP32 accumulation and
        master weights, loss scaling.

        Parameters
        ----------
        loss_scale : LossScale, float, "dynamic" or None
            A number: a static scale; "dynamic": :class:`LossScale` defaults; None: none.
        """
        h = _role(FP16)
        s = MatmulSpec(input=FP16, accumulator=Accumulator(FP32))
        chain = MatmulSpec(accumulator=Accumulator(FP32))
        return cls(name="fp16_mixed", weights=_role(FP32), activations=h, errors=h,
                   weight_grads=h, momentum=_role(FP32), forward=s, grad_input=chain,
                   grad_weight=chain, loss_scale=_loss_scale(loss_scale),
                   master_note="Micikevicius et al., 'Mixed precision training', ICLR 2018")

    @classmethod
    def bf16(cls) -> Policy:
        """BF16 storage and products, FP32 accumulation and master weights, no loss scaling
        (BF16 has FP32's exponent range; Kalamkar et al. 2019)."""
        b = _role(BF16)
        s = MatmulSpec(input=BF16, accumulator=Accumulator(FP32))
        chain = MatmulSpec(accumulator=Accumulator(FP32))
        return cls(name="bf16", weights=_role(FP32), activations=b, errors=b, weight_grads=b,
                   momentum=_role(FP32), forward=s, grad_input=chain, grad_weight=chain,
                   master_note="Kalamkar et al., 'A study of BFLOAT16 for deep learning "
                               "training', 2019")

    @classmethod
    def mx(cls, forward="mxfp8_e4m3", backward=None, error_rounding="nearest_even") -> Policy:
        """Microscaling training (Rouhani et al., "Microscaling data formats for deep
        learning", arXiv:2310.10537, 2023): the three products of every layer take
        block-scaled operands, in blocks along their reduction axis, FP32 master weights and
        FP32 storage between the products.

        Every product is ``MatmulSpec(input=<block format>, accumulator=Accumulator(FP32,
        block=<its block>))``: each block's element products summed exactly and scaled by the
        two block scales (exact), each block's sum added to an FP32 running sum with one
        rounding to nearest even (docs/block_formats.md, "Products").

        Parameters
        ----------
        forward : str or BlockFormat, default "mxfp8_e4m3"
            The block format of the forward product's operands (weights and activations): a
            :class:`~fixedsim.BlockFormat` or a preset's name, case ignored (``mxfp8``,
            ``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e2m3``, ``mxfp6_e3m2``, ``mxfp4``,
            ``mxint8``, ``nvfp4``).
        backward : str or BlockFormat, optional
            That of the two gradient products (errors with weights, errors with activations);
            default: ``forward``'s.
        error_rounding : str or Rounding, default "nearest_even"
            The rounding of the gradient products' operands into ``backward`` (``stochastic``:
            both operands of those products round stochastically; the forward product's
            round to nearest even).

        Examples
        --------
        >>> p = Policy.mx("mxfp4", "mxfp8_e5m2", "stochastic")
        >>> p.forward.input, p.grad_weight.input_rounding.name
        (BlockFormat(FP4_E2M1, block=32, scale=E8M0, scale_rule='ocp'), 'STOCHASTIC')
        """
        fwd, bwd = _block_preset(forward, "forward"), _block_preset(
            forward if backward is None else backward, "backward")
        rnd = Rounding.coerce(error_rounding, what="error_rounding")

        def spec(fmt, r=Rounding.NEAREST_EVEN):
            return MatmulSpec(input=fmt, input_rounding=r,
                              accumulator=Accumulator(FP32, block=fmt.block))

        f32 = _role(FP32)
        name = "mx_" + _block_name(fwd) + ("" if bwd == fwd else "_" + _block_name(bwd)) + \
            ("" if rnd is Rounding.NEAREST_EVEN else "_" + rnd.name.lower())
        return cls(name=name, weights=f32, activations=f32, errors=f32, weight_grads=f32,
                   momentum=f32, forward=spec(fwd), grad_input=spec(bwd, rnd),
                   grad_weight=spec(bwd, rnd),
                   master_note="Rouhani et al., 'Microscaling data formats for deep "
                               "learning', arXiv:2310.10537, 2023")

    @classmethod
    def fp8(cls, loss_scale: LossScale | float | str | None = "dynamic") -> Policy:
        """FP8 training: E4M3 weights and activations in the forward product, E5M2 errors,
        FP32 accumulation, FP32 master weights and weight gradients, loss scaling
        (Micikevicius et al., 'FP8 formats for deep learning', 2022, without per-tensor
        scaling factors)."""
        fwd = MatmulSpec(input=FP8_E4M3, accumulator=Accumulator(FP32))
        chain = MatmulSpec(accumulator=Accumulator(FP32))
        return cls(name="fp8", weights=_role(FP32), activations=_role(FP8_E4M3),
                   errors=_role(FP8_E5M2), weight_grads=_role(FP32), momentum=_role(FP32),
                   forward=fwd, grad_input=chain, grad_weight=chain,
                   loss_scale=_loss_scale(loss_scale),
                   master_note="Micikevicius et al., 'FP8 formats for deep learning', 2022")

    # -- plain data ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested plain data (strings, numbers, tables) for JSON and TOML."""
        d = {"name": self.name}
        for r in ROLES:
            d[r] = getattr(self, r).to_dict()
        for p in PRODUCTS:
            d[p] = _spec_to_dict(getattr(self, p))
        if self.loss_scale is not None:
            d["loss_scale"] = self.loss_scale.to_dict()
        for r in CURVATURE_ROLES:  # left out unset: earlier policies keep their plain data
            if getattr(self, r) is not None:
                d[r] = getattr(self, r).to_dict()
        if self.curvature_product is not None:
            d["curvature_product"] = _spec_to_dict(self.curvature_product)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "policy") -> Policy:
        """Inverse of :meth:`to_dict`. Roles and products left out are None / exact; an
        unknown key or a bad value raises ValueError naming it."""
        _check_keys(d, {"name", "loss_scale", *ROLES, *PRODUCTS, *CURVATURE_ROLES,
                        "curvature_product"}, where)
        kw = {"name": d.get("name", "custom")}
        for r in (*ROLES, *CURVATURE_ROLES):
            if r in d:
                kw[r] = Role.from_dict(d[r], f"{where}.{r}")
        for p in (*PRODUCTS, "curvature_product"):
            if p in d:
                kw[p] = _spec_from_dict(d[p], f"{where}.{p}")
        if "loss_scale" in d:
            kw["loss_scale"] = LossScale.from_dict(d["loss_scale"], f"{where}.loss_scale")
        return _build(cls, where, **kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path) -> None:
        """Write the policy as JSON (``.json``) or TOML (``.toml``)."""
        path = pathlib.Path(path)
        if path.suffix == ".toml":
            path.write_text(_to_toml(self.to_dict()))
        else:
            path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> Policy:
        """Read a policy file (``.toml`` or ``.json``); errors name the file and the key."""
        path = pathlib.Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ValueError(f"policy file {path}: {err.strerror}") from None
        try:
            if path.suffix == ".toml":
                data = _toml_loads(text)
            else:
                data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"policy file {path}: not valid {path.suffix[1:] or 'JSON'}: "
                             f"{err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"policy file {path}: expected a table (dict) at the top level, "
                             f"got {type(data).__name__}")
        if "policy" in data and len(data) == 1:
            data = data["policy"]
        return cls.from_dict(data, where=str(path))

    @classmethod
    def parse(cls, text: str) -> Policy:
        """A policy from its command-line name.

        ``float32`` (correctly rounded products), ``float32:fma_chain`` (FP32 FMA chains, also
        ``float32_fma_chain``), ``fp16`` (= ``fp16_mixed``), ``bf16``, ``fp8``, ``exact``,
        ``fixed:WL:FL[:ROUNDING]`` (rounding default ``stochastic``),
        ``mx:FORWARD[:BACKWARD[:ROUNDING]]`` (:meth:`mx`: block formats by preset name, e.g.
        ``mx:mxfp8``, ``mx:nvfp4``, ``mx:mxfp4:mxfp8_e5m2:stochastic``), or the path of a
        ``.toml`` or ``.json`` policy file.

        Examples
        --------
        >>> import fixedsim as fs
        >>> fs.nn.Policy.parse("fixed:16:14:nearest_even").weights
        Role(Q<16,14>, NEAREST_EVEN)
        """
        if not isinstance(text, str):
            raise TypeError(f"policy must be a string, got {text!r}")
        t = text.strip()
        if not t:
            raise ValueError("policy is empty; expected float32, float32:fma_chain, fp16, bf16, "
                             "fp8, exact, fixed:WL:FL[:ROUNDING] or a .toml/.json policy file")
        simple = {"float32": cls.float32, "fp32": cls.float32,
                  "float32_fma_chain": lambda: cls.float32("fma_chain"),
                  "float32:fma_chain": lambda: cls.float32("fma_chain"),
                  "fp16": cls.fp16_mixed,
                  "fp16_mixed": cls.fp16_mixed, "bf16": cls.bf16, "fp8": cls.fp8,
                  "exact": cls.exact}
        if t.lower() in simple:
            return simple[t.lower()]()
        if t.lower().startswith("fixed:"):
            parts = t.split(":")[1:]
            if len(parts) not in (2, 3):
                raise ValueError(f"policy {text!r}: expected fixed:WORD_LENGTH:FRAC_LENGTH"
                                 f"[:ROUNDING]")
            try:
                wl, fl = int(parts[0]), int(parts[1])
            except ValueError:
                raise ValueError(f"policy {text!r}: word and fractional lengths must be "
                                 "integers") from None
            rnd = parts[2] if len(parts) == 3 else "stochastic"
            try:
                return cls.fixed(wl, fl, rnd)
            except (TypeError, ValueError) as err:
                raise ValueError(f"policy {text!r}: {err}") from None
        if t.lower().startswith("mx:"):
            parts = t.split(":")[1:]
            if not 1 <= len(parts) <= 3 or not all(parts):
                raise ValueError(f"policy {text!r}: expected mx:FORWARD[:BACKWARD[:ROUNDING]], "
                                 f"e.g. mx:mxfp8, mx:mxfp4:mxfp8_e5m2:stochastic")
            try:
                return cls.mx(*parts)
            except (TypeError, ValueError) as err:
                raise ValueError(f"policy {text!r}: {err}") from None
        if t.endswith((".toml", ".json")) or pathlib.Path(t).exists():
            return cls.load(t)
        raise ValueError(f"unknown policy {text!r}; expected float32, float32:fma_chain, fp16, "
                         f"bf16, fp8, exact, fixed:WL:FL[:ROUNDING], "
                         f"mx:FORWARD[:BACKWARD[:ROUNDING]] or a .toml/.json policy file")

    def describe(self) -> str:
        """A multi-line table of roles and products (what ``print`` of a run shows)."""
        lines = [f"Policy {self.name!r}"]
        for r in ROLES:
            lines.append(f"  {r:13} {getattr(self, r)!r}")
        for p in PRODUCTS:
            lines.append(f"  {p:13} {getattr(self, p)!r}")
        if self.loss_scale is not None:
            lines.append(f"  {'loss_scale':13} {self.loss_scale!r}")
        for r in (*CURVATURE_ROLES, "curvature_product"):
            if getattr(self, r) is not None:
                lines.append(f"  {r:13} {getattr(self, r)!r}")
        return "\n".join(lines)


def _loss_scale(v) -> LossScale | None:
    if v is None or isinstance(v, LossScale):
        return v
    if isinstance(v, str):
        if v.lower() == "dynamic":
            return LossScale()
        raise ValueError(f"loss_scale must be a number, 'dynamic', a LossScale or None, "
                         f"got {v!r}")
    return LossScale(init=v, dynamic=False)


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def _to_toml(d: dict) -> str:
    """TOML for the policy's shape: top-level scalars, then tables nested at most twice."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):  # a BlockFMA's addend_bits
            return "[" + ", ".join(val(x) for x in v) + "]"
        # A TOML basic string: JSON's escapes are TOML's, but TOML has no surrogate-pair
        # escapes (json's ensure_ascii writes characters beyond U+FFFF as two), and DEL
        # must be escaped.
        return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")

    out = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"\n[{k}]")
            out += [f"{k2} = {val(v2)}" for k2, v2 in v.items() if not isinstance(v2, dict)]
            for k2, v2 in v.items():
                if isinstance(v2, dict):
                    out.append(f"\n[{k}.{k2}]")
                    out += [f"{k3} = {val(v3)}" for k3, v3 in v2.items()]
    return "\n".join(out) + "\n"
