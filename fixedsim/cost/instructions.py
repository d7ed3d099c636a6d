"""fixedsim as the machine, counted in instructions: its kernels' cost per MAC and per rounding,
checked against callgrind (or hardware counters where the machine has a PMU).

The model: the instructions of one emulated product on a kernel (a row of the path table) are

    I = i0 + i_mac * MACs + i_out * outputs

``i_mac`` holds what each multiply-accumulate costs (with the accumulator's rounding for a
chain, which rounds once per MAC), ``i_out`` each output's rounding and store, ``i0`` the
call. For an elementwise rounding (:func:`fixedsim.quantize`) it is ``i0 + i_round * n``.
:func:`check` fits the coefficients of each kernel on small products (least squares) and
predicts larger ones, whose instructions callgrind counts.

Hardware counters: a machine with a PMU would count floating-point instructions with ``perf
stat -e fp_arith_inst_retired.*`` (Intel) over a native GEMM; the development machines are
virtual machines whose kernel says "no PMU driver, software events only", so :func:`check`
says so and uses callgrind, which counts every instruction the CPU would retire (simulated,
deterministic, not timed).

Run as ``python -m fixedsim.cost.instructions --worker DIR`` under valgrind (what
:func:`check` does); the worker computes each case once outside the instrumentation (to load
the kernels), then with it, and dumps one callgrind profile per case.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

__all__ = ["check", "analyse", "CASES", "pmu_status"]

#: (kernel name, what runs). Products: ``matmul`` of random data under a spec; ``quantize``:
#: an elementwise rounding.
_KERNELS = (
    ("fp32_chain", "matmul", "MatmulSpec(input=FP16, accumulator=Accumulator(FP32))"),
    ("float_chain", "matmul", "MatmulSpec(input=FP16, accumulator=Accumulator(FP16))"),
    ("general", "matmul", "MatmulSpec(accumulator=Accumulator(FP16))"),
    ("fixed_chain", "matmul",
     "MatmulSpec(input=FixedFormat(12, 8), accumulator=Accumulator(FixedFormat(24, 12)))"),
    ("quantize_fp16", "quantize", "FP16"),
)
#: Shapes (M, N, K) the coefficients are fitted on, and those they predict.
FIT = ((16, 16, 16), (16, 16, 64), (32, 32, 16), (32, 32, 64))
PREDICT = ((24, 24, 48), (48, 48, 32), (64, 64, 64))

CASES = [(k, what, spec, shape, role) for k, what, spec in _KERNELS
         for role, shapes in (("fit", FIT), ("predict", PREDICT)) for shape in shapes]

_HELPER_C = r"""
#include <valgrind/callgrind.h>
void fs_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void fs_stop(const char *name) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT(name); }
"""


def pmu_status() -> str | None:
    """None when ``perf`` can count hardware events here, else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed"
    try:
        r = subprocess.run(["perf", "stat", "-x,", "-e", "instructions", "true"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"perf did not run: {err}"
    if "<not supported>" in r.stderr or r.returncode != 0:
        return "no hardware counters (perf: instructions <not supported>; a virtual machine " \
               "without a PMU driver)"
    return None


def _build_helper(out: pathlib.Path) -> pathlib.Path | str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc/gcc) to build the callgrind client-request helper"
    if not pathlib.Path("/usr/include/valgrind/callgrind.h").is_file():
        return "valgrind's headers (valgrind/callgrind.h) are not installed"
    src = out / "fs_callgrind.c"
    src.write_text(_HELPER_C)
    lib = out / "fs_callgrind.so"
    r = subprocess.run([cc, "-O1", "-shared", "-fPIC", str(src), "-o", str(lib)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"building the callgrind helper failed: {r.stderr.strip()[:300]}"
    return lib


def _worker(out: pathlib.Path, quick: bool) -> None:
    """Inside valgrind: run every case once to load kernels, then instrumented."""
    import ctypes

    import numpy as np

    import fixedsim as fs
    from fixedsim import FP16, FP32, Accumulator, FixedFormat, MatmulSpec  # noqa: F401

    lib = ctypes.CDLL(str(out / "fs_callgrind.so"))
    lib.fs_stop.argtypes = [ctypes.c_char_p]
    rng = np.random.default_rng(0)
    cases = [c for c in CASES if not quick or c[3] != (64, 64, 64)]
    info = []
    for i, (kernel, what, spec_text, (M, N, K), role) in enumerate(cases):
        if what == "matmul":
            spec = eval(spec_text, {"MatmulSpec": MatmulSpec, "Accumulator": Accumulator,  # noqa: S307
                                    "FP16": FP16, "FP32": FP32, "FixedFormat": FixedFormat})
            a = rng.uniform(-1, 1, (M, K))
            b = rng.uniform(-1, 1, (K, N))

            def run(a=a, b=b, spec=spec):
                return fs.matmul(a, b, spec, stats=True)[1]
        else:
            x = rng.uniform(-1, 1, M * N * K)

            def run(x=x):
                return fs.quantize(x, FP16, stats=True)[1]
        c = run()  # load and warm the kernel
        name = f"case{i}"
        lib.fs_start()
        run()
        lib.fs_stop(name.encode())
        if what == "matmul":
            rec = {"macs": c.macs, "outputs": M * N, "paths": c.paths,
                   "accumulator": c.accumulator.roundings, "output": c.output.roundings,
                   "input": c.input.roundings}
        else:
            rec = {"macs": 0, "outputs": M * N * K, "paths": {"quantize": 1}}
        info.append({"case": name, "kernel": kernel, "what": what, "spec": spec_text,
                     "shape": [M, N, K], "role": role, **rec})
    (out / "cases.json").write_text(json.dumps(info, indent=1))


def _totals(out: pathlib.Path) -> dict:
    """{case name: instructions} from the callgrind dumps in ``out``."""
    got = {}
    for f in out.glob("cg.*"):
        text = f.read_text(errors="replace")
        m = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
        # "totals" sums every function's events; "summary" is 0 after a zeroing request
        t = re.search(r"^totals: (\d+)", text, re.M)
        if m and t:
            got[m.group(1)] = int(t.group(1))
    return got


def _fit(rows):
    import numpy as np

    A = np.array([[1.0, r["macs"], r["outputs"]] for r in rows])
    y = np.array([r["instructions"] for r in rows], float)
    if not any(r["macs"] for r in rows):
        A = A[:, [0, 2]]
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    if len(coef) == 2:
        coef = np.array([coef[0], 0.0, coef[1]])
    return coef


def check(log=print, quick: bool = False, keep: str | None = None) -> int:
    """Fit the instruction model of each kernel on callgrind's counts and check its
    predictions; print a table. Returns 0 (checked, or skipped with the reason), 1 when a
    prediction misses by more than 10%."""
    why = pmu_status()
    log(f"hardware counters: {'available' if why is None else 'none: ' + why}")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        log("skipped: valgrind is not installed (apt-get install valgrind); the instruction "
            "model cannot be checked")
        return 0
    out = pathlib.Path(keep) if keep else pathlib.Path(tempfile.mkdtemp(prefix="fs_cg_"))
    out.mkdir(parents=True, exist_ok=True)
    if (out / "cases.json").is_file():
        log(f"analysing the profiles already in {out} (remove it to run the cases again)")
        return analyse(out, log)
    lib = _build_helper(out)
    if isinstance(lib, str):
        log(f"skipped: {lib}")
        return 0
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [valgrind, "--tool=callgrind", "--instr-atstart=no",
           f"--callgrind-out-file={out}/cg.%p", sys.executable, "-m",
           "fixedsim.cost.instructions", "--worker", str(out)] + (["--quick"] if quick else [])
    log(f"running the cases under callgrind (one process; its start-up takes minutes): "
        f"{' '.join(cmd[:3])} ...")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    if r.returncode != 0 or not (out / "cases.json").is_file():
        log(f"failed: the worker exited with {r.returncode}: {r.stderr.strip()[-800:]}")
        return 1
    return analyse(out, log)


def analyse(out, log=print) -> int:
    """Fit and check the model on the callgrind profiles in ``out`` (see :func:`check`)."""
    out = pathlib.Path(out)
    cases = json.loads((out / "cases.json").read_text())
    tot = _totals(out)
    for c in cases:
        c["instructions"] = tot.get(c["case"]) or None
    worst = 0.0
    log(f"{'kernel':14} {'shape':14} {'role':8} {'MACs':>8} {'outputs':>8} "
        f"{'callgrind':>11} {'model':>11} {'error':>7}")
    summary = []
    for kernel, *_ in _KERNELS:
        rows = [c for c in cases if c["kernel"] == kernel and c["instructions"] is not None]
        fit = [c for c in rows if c["role"] == "fit"]
        if len(fit) < 3:
            log(f"{kernel}: too few profiles to fit ({len(fit)})")
            continue
        i0, imac, iout = _fit(fit)
        errs = []
        for c in rows:
            pred = i0 + imac * c["macs"] + iout * c["outputs"]
            err = pred / c["instructions"] - 1
            if c["role"] == "predict":
                errs.append(abs(err))
            log(f"{kernel:14} {'x'.join(map(str, c['shape'])):14} {c['role']:8} "
                f"{c['macs']:>8,} {c['outputs']:>8,} {c['instructions']:>11,} "
                f"{pred:>11,.0f} {err:>+7.1%}")
        worst = max([worst, *errs])
        summary.append((kernel, i0, imac, iout, max(errs) if errs else None,
                        sorted({p for c in rows for p in c["paths"]})))
    log("model per kernel: instructions = i0 + i_mac * MACs + i_out * outputs")
    for kernel, i0, imac, iout, e, paths in summary:
        log(f"  {kernel:14} i0 {i0:>10,.0f}  i_mac {imac:8.2f}  i_out {iout:8.2f}  "
            f"(path {', '.join(paths)}); largest prediction error {e:.1%}")
    (out / "model.json").write_text(json.dumps(
        [{"kernel": k, "i0": a, "i_mac": b, "i_out": c, "max_error": e, "paths": p}
         for k, a, b, c, e, p in summary], indent=1))
    log(f"profiles and model in {out}")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":  # pragma: no cover - run by check() under valgrind
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    _worker(pathlib.Path(a.worker), a.quick)
