"""The GPU measurement, run on the device by ``run_device.sh``: needs the GPU, PyTorch,
``nvcc`` and ``ncu``; nothing of fixedsim (the comparison runs on the CPU: ``compare.py``).

``python3 device.py INPUTS HARNESS OUT`` writes ``OUT/measured.npz`` (``mma/<combo>/<nk>/d``:
the harness's results, bit patterns; ``torch/<case>``: ``torch.matmul`` and
``torch._scaled_mm`` results), ``OUT/ncu.csv`` (tensor-pipe counters) and prints a log.
Every step is timed out and reported, so that one failing step leaves the others' results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from make_inputs import decode  # beside this file

COMBOS = ("fp16_fp32", "fp16_fp16", "bf16_fp32", "tf32_fp32", "e4m3_fp32", "e5m2_fp32",
          "e4m3_fp16", "e5m2_fp16")
WORK = "/tmp/tc"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def harness(exe, combo, a, b, c, tag):
    """Run the harness on tiles a (T, 16, K), b (T, 8, K), c (T, 16, 8); returns d."""
    fin, fout = f"{WORK}/{tag}.in", f"{WORK}/{tag}.out"
    with open(fin, "wb") as f:
        for x in (a, b, c):
            f.write(np.ascontiguousarray(x).tobytes())
    ki = {"tf32": 8, "fp16": 16, "bf16": 16}.get(combo.split("_")[0], 32)
    nk = a.shape[2] // ki
    r = subprocess.run([exe, combo, str(a.shape[0]), str(nk), fin, fout], capture_output=True,
                       text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"{combo}: {r.stderr.strip()}")
    return np.fromfile(fout, c.dtype).reshape(c.shape), [exe, combo, str(a.shape[0]), str(nk),
                                                          fin, fout]


def mma_part(inp, exe, res, runs):
    for combo in COMBOS:
        fmt, out = combo.split("_")
        try:  # the probe: exact small integers, any fragment-layout error shows
            a, b = inp[f"probe/{fmt}/a"], inp[f"probe/{fmt}/b"]
            c = inp[f"probe/{fmt}/c_{out}"]
            d, _ = harness(exe, combo, a, b, c, f"probe_{combo}")
            cf = c.view(np.float32 if out == "fp32" else np.float16).astype(np.float64)
            want = cf + np.einsum("tik,tjk->tij", decode(fmt, a), decode(fmt, b))
            got = d.view(np.float32 if out == "fp32" else np.float16).astype(np.float64)
            log(f"probe {combo}: {int((got != want).sum())} of {got.size} differ"
                + ("" if (got == want).all() else f" (first got {got.ravel()[:4]}, want "
                   f"{want.ravel()[:4]})"))
            res[f"probe/{combo}/d"] = d
        except Exception as e:  # noqa: BLE001
            log(f"probe {combo}: FAILED {e}")
        for nk in (1, 4):
            key = f"mma/{fmt}/{nk}"
            try:
                t0 = time.time()
                d, cmd = harness(exe, combo, inp[f"{key}/a"], inp[f"{key}/b"],
                                 inp[f"{key}/c_{out}"], f"{combo}_{nk}")
                res[f"mma/{combo}/{nk}/d"] = d
                runs[f"{combo}_{nk}"] = cmd
                log(f"mma {combo} nk={nk}: {d.size} results in {time.time() - t0:.2f} s")
            except Exception as e:  # noqa: BLE001
                log(f"mma {combo} nk={nk}: FAILED {e}")


def torch_part(inp, res):
    import torch

    dev = os.environ.get("TC_DEVICE", "cuda")  # "cpu": a dry run of this code off the GPU
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    log("torch", torch.__version__, "cuda", torch.version.cuda,
        torch.cuda.get_device_name() if dev == "cuda" else dev)
    m = torch.backends.cuda.matmul
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False

    def t(fmt, key):
        bits = inp[f"torch/{fmt}/{key}"]
        if fmt == "tf32":
            return torch.from_numpy(bits.view(np.float32)).to(dev)
        if fmt == "fp16":
            return torch.from_numpy(bits.view(np.float16)).to(dev)
        if fmt == "bf16":
            return torch.from_numpy(bits.view(np.int16)).to(dev).view(torch.bfloat16)
        dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
        return torch.from_numpy(bits.view(np.int8)).to(dev).view(dt)

    def keep(name, fn):
        try:
            r = fn()
            sync()
            r = r.float().cpu().numpy() if r.dtype != torch.float16 else r.cpu().numpy()
            res[f"torch/{name}"] = r.view(np.uint32 if r.dtype == np.float32 else np.uint16)
            log(f"torch {name}: {r.shape} {r.dtype}")
        except Exception as e:  # noqa: BLE001
            log(f"torch {name}: FAILED {type(e).__name__}: {str(e)[:300]}")

    for fmt in ("fp16", "bf16"):
        a, b = t(fmt, "a"), t(fmt, "b")
        keep(f"{fmt}_matmul", lambda a=a, b=b: a @ b)  # FP16 / BF16 result
        keep(f"{fmt}_mm_out_fp32", lambda a=a, b=b: torch.mm(a, b, out_dtype=torch.float32))
    m.allow_tf32 = True
    a, b = t("tf32", "a"), t("tf32", "b")
    keep("tf32_matmul", lambda: a @ b)
    m.allow_tf32 = False
    one = torch.ones((), device=dev)
    for fmt in ("e4m3", "e5m2"):
        a = t(fmt, "a")
        b = t(fmt, "b").t().contiguous().t()  # column-major, as _scaled_mm takes it
        for fast in (True, False):
            for od, on in ((torch.float32, "fp32"), (torch.float16, "fp16")):
                keep(f"{fmt}_scaled_mm_{on}_fast{int(fast)}",
                     lambda a=a, b=b, od=od, fast=fast: torch._scaled_mm(
                         a, b, scale_a=one, scale_b=one, out_dtype=od, use_fast_accum=fast))
    if "torch/e5m2_scaled_mm_fp32_fast1" not in res:  # e5m2 x e5m2 may be refused: e4m3 x e5m2
        a, b = t("e4m3", "a"), t("e5m2", "b").t().contiguous().t()
        keep("e4m3e5m2_scaled_mm_fp32_fast1",
             lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32,
                                      use_fast_accum=True))


def ncu_part(out, runs):
    """Tensor-pipe counters of the harness (calibration: known MMA instruction counts) and of
    one torch GEMM and one convolution (``ncu_torch.py``)."""
    q = subprocess.run(["ncu", "--query-metrics", "--chip", "gh100"], capture_output=True,
                       text=True, timeout=120)
    names = sorted({ln.split()[0] for ln in q.stdout.splitlines()
                    if ln.split() and ("tensor" in ln.split()[0])})
    with open(f"{out}/ncu_metrics.txt", "w") as f:
        f.write("".join(ln + "\n" for ln in q.stdout.splitlines() if "tensor" in ln)
                if names else q.stdout[-20000:] + q.stderr[-20000:])
    want = [n for n in names if n.startswith(("sm__ops_path_tensor",
                                              "sm__inst_executed_pipe_tensor",
                                              "smsp__inst_executed_pipe_tensor"))]
    log(f"ncu: {len(names)} tensor metrics, using {len(want)}: {' '.join(want)[:600]}")
    if not want:
        return
    metrics = ",".join(f"{n}.sum" for n in want[:40])
    jobs = [(k, runs[k]) for k in ("fp16_fp32_4", "tf32_fp32_4", "e4m3_fp32_4", "e4m3_fp16_4")
            if k in runs]
    jobs.append(("torch", [sys.executable, os.path.join(os.path.dirname(__file__),
                                                        "ncu_torch.py")]))
    with open(f"{out}/ncu.csv", "w") as f:
        for name, cmd in jobs:
            t0 = time.time()
            try:
                r = subprocess.run(["ncu", "--csv", "--launch-count", "20", "--metrics", metrics]
                                   + cmd, capture_output=True, text=True,
                                   timeout=150 if name == "torch" else 60)
                f.write(f"# {name}\n{r.stdout}\n")
                log(f"ncu {name}: rc {r.returncode} in {time.time() - t0:.1f} s; "
                    f"{r.stderr.strip()[-300:]}")
            except Exception as e:  # noqa: BLE001
                log(f"ncu {name}: FAILED {e}")


def main(inputs, exe, out):
    os.makedirs(WORK, exist_ok=True)
    inp = dict(np.load(inputs))
    res, runs = {}, {}
    mma_part(inp, exe, res, runs)
    np.savez_compressed(f"{out}/measured.npz", **res)
    try:
        torch_part(inp, res)
    except Exception as e:  # noqa: BLE001
        log(f"torch part FAILED {e}")
    np.savez_compressed(f"{out}/measured.npz", **res)
    with open(f"{out}/runs.json", "w") as f:
        json.dump(runs, f)
    try:
        ncu_part(out, runs)
    except Exception as e:  # noqa: BLE001
        log(f"ncu part FAILED {e}")
    log("done")


if __name__ == "__main__":
    main(*sys.argv[1:4])
