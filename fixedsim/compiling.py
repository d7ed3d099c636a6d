"""Knowing when Numba compiles: the time it takes, kept apart, and a notice before the pause.

fixedsim's kernels are compiled by Numba on their first use with a given signature and kept in
Numba's on-disk cache (``cache=True``, beside each kernel module in ``__pycache__``); later
processes load them in milliseconds. A kernel is compiled only when the cache has no entry for
its signature: Numba then fires the ``"numba:compile"`` event around the compilation (a cache
hit fires nothing). :class:`CompileWatch` listens to that event, so it knows exactly when a
compilation starts and how long it takes, without guessing from cache files:

- :func:`fixedsim.nn.train.train` subtracts the compile time of each epoch from its
  ``seconds`` and records it as ``compile_seconds`` (and a sweep's records likewise);
- the command line prints :data:`NOTICE` once, when the first kernel starts compiling.

``fixedsim warmup`` (:func:`fixedsim.warmup.warmup`) compiles ahead what training, sweeps
and the default matrix-product paths use.

>>> import numpy as np, numba
>>> from fixedsim.compiling import CompileWatch
>>> f = numba.njit(lambda x: x + 1)          # not cached: compiled at its first call
>>> with CompileWatch() as watch:
...     _ = f(np.int64(1)); _ = f(np.int64(2))
>>> watch.kernels, watch.seconds > 0
(1, True)
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
from numba.core import event as _event

__all__ = ["CompileWatch", "NOTICE", "COLD_SECONDS", "notice_text", "notice_once", "read_only",
           "contiguous", "float64_out"]

#: Seconds of compiling from an empty Numba cache, measured on the 2-core development machine
#: (Intel Xeon with AVX-512): a first ``fixedsim train`` (LeNet under float32: 184 s on the
#: idle machine, the one-pass optimizer step's kernel, about 64 s, included), the first
#: sweep of the README's main job (its nine policies, compiled once before the workers
#: start, in two processes side by side: 100 s on the idle machine), and ``fixedsim
#: warmup`` (390 s, while other jobs shared its cores; before the quantize kernels compiled
#: fewer per-mode loops). What the notice quotes.
COLD_SECONDS = {"train": 185, "sweep": 100, "warmup": 390}

#: The line printed once before the first compilation (``{seconds}``: the estimate).
NOTICE = ("fixedsim: compiling kernels (once per install, about {seconds} s); "
          "`fixedsim warmup` compiles them all ahead")


def notice_text(kind: str = "train") -> str:
    """:data:`NOTICE` with the estimate for ``kind`` (a key of :data:`COLD_SECONDS`)."""
    return NOTICE.format(seconds=COLD_SECONDS.get(kind, max(COLD_SECONDS.values())))


def notice_once(kind: str = "train"):
    """A callable that prints :func:`notice_text` ``(kind)`` to stderr at its first call only:
    the notice of a command whose compilations happen under more than one
    :class:`CompileWatch` (the measurement of the expected time, then the run), so that the
    first pause is announced and none twice."""
    done = []

    def notice():
        if not done:
            done.append(True)
            print(notice_text(kind), file=sys.stderr, flush=True)
    return notice


class CompileWatch:
    """Measure Numba compilations (cache misses) while the watch is active.

    Use as a context manager. Only the outermost compilation counts (a kernel compiles the
    jitted helpers it calls inside its own compilation), so :attr:`seconds` is wall time spent
    compiling, never counted twice.

    Parameters
    ----------
    notice : callable or str, optional
        Called with no argument (a callable) or printed to stderr (a string) once, when the
        first compilation starts: the moment before the pause.

    Attributes
    ----------
    seconds : float
        Wall time spent compiling so far (a compilation in progress is not included).
    kernels : int
        Number of outermost compilations (kernel signatures) so far.
    names : list of str
        The compiled kernels (qualified names), in order.
    """

    def __init__(self, notice=None):
        self.seconds = 0.0
        self.kernels = 0
        self.names: list = []
        self._notice = notice
        self._noticed = False
        self._depth = 0
        self._t0 = 0.0
        self._listener = _Listener(self)

    def _start(self, event):
        if self._depth == 0:
            self._t0 = time.perf_counter()
            if self._notice is not None and not self._noticed:
                self._noticed = True
                if callable(self._notice):
                    self._notice()
                else:
                    print(self._notice, file=sys.stderr, flush=True)
        self._depth += 1

    def _end(self, event):
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._t0
            self.kernels += 1
            disp = (event.data or {}).get("dispatcher")
            func = getattr(disp, "py_func", None)
            self.names.append(getattr(func, "__qualname__", repr(disp)))

    def __enter__(self) -> CompileWatch:
        _event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc) -> None:
        _event.unregister("numba:compile", self._listener)


class _Listener(_event.Listener):
    """Forwards Numba's compile events to a :class:`CompileWatch`."""

    def __init__(self, watch):
        self._watch = watch

    def on_start(self, event):
        self._watch._start(event)

    def on_end(self, event):
        self._watch._end(event)


def contiguous(a, dtype=None) -> np.ndarray:
    """``np.ascontiguousarray(a, dtype)``, a signaling NaN made quiet by the cast without
    numpy's "invalid" warning (not an event of any model: it is a NaN either way)."""
    with np.errstate(invalid="ignore"):
        return np.ascontiguousarray(a, dtype)


def read_only(a, dtype=None):
    """``a`` as a read-only C-contiguous view (converted to ``dtype`` when given), the way every
    kernel input is passed.

    Numba compiles one signature per combination of its arguments' writeable flags, so a
    kernel called with a caller's writable array one time and a read-only one the next
    compiles twice (30 s for the BlockFMA kernel). Passing inputs through this function keeps
    one signature whatever the caller's flags. A signaling NaN is made quiet without a
    warning (:func:`contiguous`).
    """
    v = contiguous(a, dtype).view()
    v.setflags(write=False)
    return v


@contextlib.contextmanager
def float64_out(out):
    """A float64 array for a kernel to write the values of ``out`` into (``out`` itself when
    it is float64), copied into ``out`` when the block ends: kernels that write float64 only
    compile one signature, not one per container dtype (20-40 s of compiling each).

    Exact for every value of a format held in float32; the copy makes a signaling NaN quiet
    without numpy's "invalid" warning (it is a NaN either way). Elements the kernel leaves
    unwritten come back as +0.0.
    """
    o64 = out if out.dtype == np.float64 else np.zeros(out.shape, np.float64)
    yield o64
    if o64 is not out:
        with np.errstate(invalid="ignore"):
            out[...] = o64
