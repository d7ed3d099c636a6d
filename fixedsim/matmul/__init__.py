"""Matrix products and convolutions computed the way a multiply-accumulate array computes them.

:class:`MatmulSpec` names every rounding of a matrix product; :func:`matmul` and
:func:`conv2d` compute it bit for bit. The semantics are those of
:func:`fixedsim.reference.dot` (see docs/matmul.md):

1. the inputs are quantized to ``spec.input`` with ``spec.input_rounding`` (None: taken as
   they are);
2. each product ``a[i, k] * b[k, j]`` is exact, or rounded into ``spec.product``;
3. accumulation: exact when ``spec.accumulator`` is None; else, for ``k = 0..K-1`` in order,
   each block of ``block`` consecutive products is summed exactly and added to the running sum
   (which starts at +0) with one rounding into the accumulator format, per its rounding and
   overflow rule (``block=1``: a chain of fused multiply-adds);
4. one rounding into ``spec.output`` with ``spec.output_rounding`` (output None: the
   accumulator's value; with no accumulator either, the exact sum rounded into float64).

Which kernel computes a call never changes a bit. The kernels are the rows of one table,
:data:`PATHS` (:mod:`fixedsim.matmul.paths`): each row states when it applies, the proof that
it is exact there, and its kernel; the first row that applies runs, the last (``general``)
applies to everything. :func:`explain` says which row runs and why the ones before it
declined; ``matmul(..., path=NAME)`` runs a row by name; :mod:`fixedsim.counters` records
which row ran.

The package: :mod:`~fixedsim.matmul.spec` (the spec), :mod:`~fixedsim.matmul.core` (operand
scans, setup, output rounding, the general kernel and its oracle fallback),
:mod:`~fixedsim.matmul.paths` (the table), :mod:`~fixedsim.matmul.api` (the calls).
"""

from .api import conv2d, conv2d_grad_input, conv2d_grad_weight, explain, matmul
from .paths import PATHS, Explanation, Path
from .spec import Accumulator, BlockFMA, MatmulSpec, stage_keys

matmul.explain = explain  # fixedsim.matmul is also this function: fixedsim.matmul.explain works

__all__ = ["Accumulator", "BlockFMA", "MatmulSpec", "matmul", "explain", "conv2d",
           "conv2d_grad_input", "conv2d_grad_weight", "stage_keys", "PATHS", "Path", "Explanation"]
