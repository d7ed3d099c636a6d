"""benchmarks/train.py's timing: Numba's compiling inside a timed chunk is reported, not timed."""

import importlib.util
import pathlib
import time

import numba
import numpy as np

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("_bench_train", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_kernel_compiled_in_a_timed_chunk_is_reported_and_not_timed():
    bench = _bench()

    @numba.njit(cache=False)  # compiled on its first call, inside the first chunk
    def twice(x):
        return 2.0 * x

    def step(i, idx, counters):
        time.sleep(0.01)
        return float(twice(np.float64(i)))

    t = bench._Trainer(step)
    t0 = time.perf_counter()
    t.run([0, 1])
    first = time.perf_counter() - t0
    assert t.compiled and t.compile_seconds > 0.0
    assert t.seconds <= first - t.compile_seconds + 1e-3  # the compile is left out
    assert t.seconds >= 0.02  # the steps themselves are timed
    names, seconds = list(t.compiled), t.compile_seconds
    t.run([2, 3])  # nothing left to compile
    assert t.compiled == names and t.compile_seconds == seconds
    assert t.losses == [0.0, 2.0, 4.0, 6.0]
