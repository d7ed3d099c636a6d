"""The one place where Numba options are set.

Every kernel in :mod:`fixedsim.jit` is compiled through these decorators, so that caching is on
and ``fastmath`` is off everywhere (fastmath reassociates sums and flushes subnormals, which no
bit-exact kernel can afford). ``tests/test_jit_options.py`` checks that no kernel bypasses them.

Cached kernels are keyed by the sources of the whole package
----------------------------------------------------------------
Numba keys a cached kernel by the source of the file that defines it. A kernel's machine code
also holds the helpers it calls from other files (``quantize_value`` from ``quant.py`` in
almost every kernel) and the constants it reads from them, so a change to a helper alone left
the kernels of the other files running the old helper from their caches: silently, on a
developer's tree and after an upgrade that rewrote only the helper's file. Here every kernel of
:mod:`fixedsim.jit` is keyed by its own file's stamp together with :data:`SOURCE_DIGEST`, a
hash of every source file of the package: any change recompiles every kernel once (what an
upgrade costs anyway), and no cache holds code of another version. The key is Numba's
cache-locator stamp (:class:`_PackageStamp` in front of Numba's locators, for this package's
files only); if a Numba release no longer has that mechanism, kernels are cached as Numba does
by itself, and the import says nothing.
"""

import hashlib
import pathlib

from numba import njit

_HERE = pathlib.Path(__file__).resolve().parent


def _source_digest(folder: pathlib.Path = _HERE) -> str:
    """sha256 of the names and contents of the ``.py`` files of ``folder`` (this package's),
    in name order."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


#: The hash of this package's sources that every cached kernel's key includes.
SOURCE_DIGEST = _source_digest()


def _install_package_stamp() -> bool:
    """Put :class:`_PackageStamp` locators in front of Numba's own (same order: a user's
    ``NUMBA_CACHE_DIR`` first); True when installed (once)."""
    try:
        from numba.core import caching
        impl = caching.CacheImpl
        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator)
    except (ImportError, AttributeError):
        return False
    if any(getattr(k, "_fixedsim_stamp", False) for k in impl._locator_classes):
        return True

    def make(base):
        class _PackageStamp(base):
            _fixedsim_stamp = True

            @classmethod
            def from_function(cls, py_func, py_file):
                try:
                    inside = pathlib.Path(py_file).resolve().parent == _HERE
                except (OSError, TypeError):
                    inside = False
                return super().from_function(py_func, py_file) if inside else None

            def get_source_stamp(self):
                return (super().get_source_stamp(), SOURCE_DIGEST)

        _PackageStamp.__name__ = _PackageStamp.__qualname__ = f"PackageStamp{base.__name__}"
        return _PackageStamp

    impl._locator_classes = [make(b) for b in bases] + list(impl._locator_classes)
    return True


#: Whether the package-wide stamp is in place (it is with the Numba versions this package
#: supports; tests/test_jit_options.py checks it).
PACKAGE_STAMP = _install_package_stamp()

#: Options shared by every kernel.
OPTIONS = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}

#: Serial kernel (also used for scalar helpers).
jit = njit(**OPTIONS)

#: Scalar helper inlined into its callers at the Numba IR level.
jit_inline = njit(inline="always", **OPTIONS)

#: Kernel parallel over independent outputs with ``numba.prange``.
jit_parallel = njit(parallel=True, **OPTIONS)
