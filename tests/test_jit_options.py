"""Every kernel is compiled through fixedsim/jit/options.py: cached, never fastmath.

Also the Numba 0.68 hazard: ``arr.view(...)`` taken inside a ``parallel=True`` function gave
wrong results, so no kernel takes a view; bit views are taken by the caller and passed in.
"""

import ast
import pathlib

import numpy as np

import fixedsim as fs
from fixedsim.jit import options

JIT_DIR = pathlib.Path(options.__file__).parent
SOURCES = {p.name: p.read_text() for p in JIT_DIR.glob("*.py")}


def test_shared_options():
    assert options.OPTIONS["cache"] is True
    assert options.OPTIONS["fastmath"] is False


def test_no_kernel_bypasses_the_shared_options():
    allowed = {"jit", "jit_inline", "jit_parallel"}
    for name, src in SOURCES.items():
        if name == "options.py":
            continue
        assert "fastmath" not in src, name
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    dec_name = dec.id if isinstance(dec, ast.Name) else ast.unparse(dec)
                    if (name, node.name, dec_name) == ("bits.py", "fma", "intrinsic"):
                        continue  # builds IR inside the kernels that call it
                    assert dec_name in allowed, f"{name}:{node.name} uses @{dec_name}"
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                assert fn not in ("njit", "numba.njit", "numba.jit", "jit_module"), name


def test_no_view_inside_kernels():
    """Only bits.py reinterprets, and only scalars (a bitcast, not an array view)."""
    for name, src in SOURCES.items():
        if name != "bits.py":
            assert ".view(" not in src, f"{name} takes an array view inside a kernel"
    bits = SOURCES["bits.py"]
    assert bits.count(".view(") == 4
    assert "np.float32(v).view(np.uint32)" in bits and "np.uint32(b).view(np.float32)" in bits
    assert "np.float64(v).view(np.int64)" in bits and "np.int64(b).view(np.float64)" in bits


def test_views_passed_in_give_correct_bits_in_parallel():
    """The fast float kernel reads bit views made by the caller: results equal numpy's cast."""
    x = np.random.default_rng(5).standard_normal(1 << 20).astype(np.float32)
    np.testing.assert_array_equal(fs.quantize(x, fs.FP16).view(np.uint32),
                                  x.astype(np.float16).astype(np.float32).view(np.uint32))
