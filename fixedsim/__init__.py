"""fixedsim: bit-exact emulation of fixed-point and low-precision floating-point arithmetic.

The public names, re-exported; see docs/ for the numerics semantics.
"""

from . import counters
from .arith import add, div, fma, mul, sub
from .blockformats import (
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8_E4M3,
    MXFP8_E5M2,
    MXINT8,
    NVFP4,
    BlockFormat,
)
from .formats import (
    BF16,
    E8M0,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E3M4,
    FP8_E4M3,
    FP8_E4M3FNUZ,
    FP8_E5M2,
    FP8_E5M2FNUZ,
    FP16,
    FP32,
    FP64,
    TF32,
    FixedFormat,
    FloatFormat,
)
from .matmul import (
    Accumulator,
    BlockFMA,
    MatmulSpec,
    conv2d,
    conv2d_grad_input,
    conv2d_grad_weight,
    explain,
    matmul,
)
from .quantize import QuantStats, from_bits, quantize, to_bits
from .rounding import Overflow, Rounding

__version__ = "0.1.0"

#: Subpackages loaded on first use (``fs.nn.Policy``, ``fs.data.load``, ``fs.study``,
#: ``fs.cost.predict``).
_LAZY = ("cost", "data", "nn", "study")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Accumulator",
    "BlockFMA",
    "BlockFormat",
    "MXFP4",
    "MXFP6_E2M3",
    "MXFP6_E3M2",
    "MXFP8_E4M3",
    "MXFP8_E5M2",
    "MXINT8",
    "NVFP4",
    "MatmulSpec",
    "BF16",
    "E8M0",
    "FP4_E2M1",
    "FP6_E2M3",
    "FP6_E3M2",
    "FP8_E3M4",
    "FP8_E4M3",
    "FP8_E4M3FNUZ",
    "FP8_E5M2",
    "FP8_E5M2FNUZ",
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
    "cost",
    "counters",
    "data",
    "nn",
    "study",
    "div",
    "fma",
    "matmul",
    "explain",
    "from_bits",
    "mul",
    "quantize",
    "sub",
    "to_bits",
]
