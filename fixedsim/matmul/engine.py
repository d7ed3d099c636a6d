"""The internal interface of matrix products, for the packages built on them.

:mod:`fixedsim.reuse` (and any other package of fixedsim that computes a modelled product
its own way) goes through these names and nothing else of :mod:`fixedsim.matmul`; they are
stable within fixedsim, not part of the public API.

A call runs in four steps, as :func:`fixedsim.matmul` does:

1. ``spec, keys, rb, c = setup(op, spec, seed, stats)``: the checked spec, its five stage keys
   (:func:`fixedsim.matmul.stage_keys`), the random bits and a fresh
   :class:`fixedsim.counters.Counters` (read when ``stats`` or a ``record()`` block is on);
2. ``a, b = check_operands(a, b)`` and ``check_finite_for_fixed(spec, a, b, op, names)``;
3. ``quantize_operand(x, spec.input, spec.input_rounding, rb, keys[s], c.input)`` for each
   operand (stage ``s`` = 0 for ``a``, 1 for ``b``);
4. ``product(A, B, spec, keys, rb, c, mm=None, ba=None, path=None)``: the 2-D product through
   the path table; ``A`` may be ``((R, K), make)`` (built only when a row needs it) with
   ``ba = Bits.of(...)`` bounding its values, and ``mm(scale, Bs, k0, k1)`` another way to
   compute ``ldexp(A, scale)[:, k0:k1] @ Bs[k0:k1]`` (any summation order of the same exact
   products) that the exact-accumulation rows use instead of ``A``; an ``mm`` with a
   ``reset()`` method is reset when a row that used it declines at run time. Then
   ``fixedsim.counters._publish(c)``.

``matmul(a, b, spec, c=None, *, seed=None, stats=False, scans=(ba, bb))`` is
:func:`fixedsim.matmul` with the scans of the operands' values where the caller holds them
(bounds; ``None`` each where not): K-FAC's factor products, whose rows are an im2col matrix
of an input it has scanned.
"""

from .api import _im2col as im2col
from .api import _matmul as matmul
from .api import _product as product
from .core import _Bits as Bits
from .core import _check_finite_for_fixed as check_finite_for_fixed
from .core import _check_operands as check_operands
from .core import _quantize_input as quantize_operand
from .core import _setup as setup

__all__ = ["Bits", "setup", "check_operands", "check_finite_for_fixed", "quantize_operand",
           "product", "im2col", "matmul"]
