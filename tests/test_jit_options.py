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


def test_cached_kernels_are_keyed_by_every_source_of_the_package(tmp_path):
    """Each cached kernel's stamp is its file's together with the digest of every source of
    fixedsim.jit, so a change to a helper in one file (quant.py's quantize_value) cannot
    leave the kernels of the others running old code from their caches; the digest moves
    with any byte of any file; functions outside the package keep Numba's own locators."""
    import numba
    from numba.core import caching

    from fixedsim.jit import arith, quant

    assert options.PACKAGE_STAMP
    for kernel in (arith.arith, quant.quantize_bits, arith.round_exact):
        locator = kernel._cache._impl.locator
        assert getattr(type(locator), "_fixedsim_stamp", False), type(locator)
        own, digest = locator.get_source_stamp()
        assert digest == options.SOURCE_DIGEST
        assert own == caching.InTreeCacheLocator.get_source_stamp(locator)
    for path in JIT_DIR.glob("*.py"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert options._source_digest(tmp_path) == options.SOURCE_DIGEST
    q = tmp_path / "quant.py"
    q.write_text(q.read_text() + "\n")
    assert options._source_digest(tmp_path) != options.SOURCE_DIGEST
    outside = tmp_path / "elsewhere.py"
    outside.write_text("def f(x):\n    return x + 1\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("elsewhere", outside)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernel = numba.njit(cache=True)(mod.f)
    assert not getattr(type(kernel._cache._impl.locator), "_fixedsim_stamp", False)
    assert options._install_package_stamp()  # installed once: a second call adds nothing
    assert sum(getattr(k, "_fixedsim_stamp", False)
               for k in caching.CacheImpl._locator_classes) == 2


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
