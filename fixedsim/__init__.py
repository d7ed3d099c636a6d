"""fixedsim: bit-exact emulation of fixed-point and low-precision floating-point arithmetic.

The public names, re-exported; see docs/ for the numerics semantics.
"""

from . import counters
from .arith import add, div, fma, mul, sub
from .formats import (
    BF16,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    FP64,
    TF32,
    FixedFormat,
    FloatFormat,
)
from .matmul import (
    Accumulator,
    MatmulSpec,
    conv2d,
    conv2d_grad_input,
    conv2d_grad_weight,
    matmul,
)
from .quantize import QuantStats, from_bits, quantize, to_bits
from .rounding import Overflow, Rounding

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "MatmulSpec",
    "BF16",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP16",
    "FP32",
    "FP64",
    "TF32",
    "FixedFormat",
    "FloatFormat",
    "Overflow",
    "QuantStats",
    "Rounding",
    "__version__",
    "add",
    "conv2d",
    "conv2d_grad_input",
    "conv2d_grad_weight",
    "counters",
    "div",
    "fma",
    "matmul",
    "from_bits",
    "mul",
    "quantize",
    "sub",
    "to_bits",
]
