"""The one place where Numba options are set.

Every kernel in :mod:`fixedsim.jit` is compiled through these decorators, so that caching is on
and ``fastmath`` is off everywhere (fastmath reassociates sums and flushes subnormals, which no
bit-exact kernel can afford). ``tests/test_jit_options.py`` checks that no kernel bypasses them.
"""

from numba import njit

#: Options shared by every kernel.
OPTIONS = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}

#: Serial kernel (also used for scalar helpers).
jit = njit(**OPTIONS)

#: Scalar helper inlined into its callers at the Numba IR level.
jit_inline = njit(inline="always", **OPTIONS)

#: Kernel parallel over independent outputs with ``numba.prange``.
jit_parallel = njit(parallel=True, **OPTIONS)
