"""Compare the GPU measurement (``device.py``'s ``measured.npz``) with fixedsim's models.

``python compare.py MEASURED [INPUTS] [--device H200]`` prints, per harness combination and
chain length, how many of the measured results each model misses (in any bit; NaN matches
NaN): the device's preset (``fixedsim.hardware.spec``), the other FP8 model (the native FP8
unit or the FP16 unit, see ``fixedsim.hardware.nvidia``) and, as a baseline, exact block
sums (``Accumulator(FP32, block=F)``); then the ``torch.matmul`` and ``torch._scaled_mm``
results against the preset chained over K from a zero addend (with ``_scaled_mm``'s slow
accumulation also against the preset promoted to FP32 every 32 to 512 products); then the
tensor-pipe counters of ``ncu.csv`` per kernel. Nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import csv
import io
import os

import numpy as np
from make_inputs import decode  # beside this file: values of the input formats

import fixedsim as fs
from fixedsim import hardware
from fixedsim.hardware import nvidia

HERE = os.path.dirname(os.path.abspath(__file__))
KI = {"fp16": 16, "bf16": 16, "tf32": 8, "e4m3": 32, "e5m2": 32}
_FMT = {"fp16": fs.FP16, "bf16": fs.BF16, "tf32": fs.TF32, "e4m3": fs.FP8_E4M3,
        "e5m2": fs.FP8_E5M2}


def out_values(out, bits):
    """Values (float64) of FP32 or FP16 bit patterns."""
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        return np.asarray(bits).view(np.float32 if out == "fp32" else np.float16) \
            .astype(np.float64)


def same(x, y):
    """Elementwise: equal as FP32 bit patterns (x, y float64 of FP32 or FP16 values), any NaN
    equal to any NaN."""
    with np.errstate(invalid="ignore"):  # NaN payloads: any NaN matches any NaN below
        xb = np.asarray(x, np.float32).view(np.uint32)
        yb = np.asarray(y, np.float32).view(np.uint32)
    return (xb == yb) | (np.isnan(x) & np.isnan(y))


def models(device, fmt, out):
    """(name, MatmulSpec) pairs to compare: the preset first."""
    preset = hardware.spec(device, fmt, out)
    yield "preset", preset
    if fmt in ("e4m3", "e5m2"):
        other = ("B200" if (device, out) not in nvidia.FP8_ON_FP16 else "Ada")
        acc = nvidia.block_fma(other, fmt, out)
        name = "fp16 unit" if other == "B200" else "native fp8 unit (Ada's)"
        if other == "B200" or out == "fp32":
            yield name, fs.MatmulSpec(input=_FMT[fmt], accumulator=acc)
    acc = preset.accumulator
    block = acc.block if getattr(acc, "promote", None) is None else acc.promote
    yield f"exact blocks of {block}", fs.MatmulSpec(
        input=_FMT[fmt], accumulator=fs.Accumulator(fs.FP32 if out == "fp32" else fs.FP16,
                                                    block=block))


def harness_rows(meas, inp, device):
    """(combo, nk, model, results, mismatches, first mismatching index) per comparison."""
    for key in sorted(k for k in meas.files if k.startswith("mma/")):
        _, combo, nk, _ = key.split("/")
        fmt, out = combo.split("_")
        src = f"mma/{fmt}/{nk}"
        a, b = decode(fmt, inp[f"{src}/a"]), decode(fmt, inp[f"{src}/b"])
        c = out_values(out, inp[f"{src}/c_{out}"])
        d = out_values(out, meas[key])
        for name, spec in models(device, fmt, out):
            got = np.asarray(fs.matmul(a, b.transpose(0, 2, 1), spec, c=c), np.float64)
            bad = np.flatnonzero(~same(got, d))
            yield combo, int(nk), name, d.size, bad.size, (int(bad[0]) if bad.size else None)


def torch_rows(meas, inp, device):
    """(case, model, results, mismatches) for the torch results."""
    for key in sorted(k for k in meas.files if k.startswith("torch/")):
        case = key.split("/", 1)[1]
        fmt = case.split("_")[0]
        if fmt == "e4m3e5m2":
            a, b = decode("e4m3", inp["torch/e4m3/a"]), decode("e5m2", inp["torch/e5m2/b"])
            fmt = "e4m3"
        else:
            a, b = decode(fmt, inp[f"torch/{fmt}/a"]), decode(fmt, inp[f"torch/{fmt}/b"])
        raw = meas[key]
        d = out_values("fp32" if raw.dtype == np.uint32 else "fp16", raw)
        # the result's format: FP16 stored as such, BF16 (torch.matmul of bf16) as FP32
        narrow = fs.FP16 if raw.dtype == np.uint16 else fs.BF16 if case == "bf16_matmul" \
            else None
        cands = [("preset", hardware.spec(device, fmt, "fp32"))]
        if "fast0" in case:
            acc = hardware.spec(device, fmt, "fp32").accumulator
            for p in (32, 64, 128, 256, 512):
                cands.append((f"preset, promoted every {p}", fs.MatmulSpec(
                    input=_FMT[fmt], accumulator=fs.BlockFMA(
                        acc.block, acc.extra_bits, output_frac_bits=acc.output_frac_bits,
                        min_exp=acc.min_exp, promote=p))))
        for name, spec in cands:
            got = np.asarray(fs.matmul(a, b, spec), np.float64)
            if narrow is not None:
                got = np.asarray(fs.quantize(got, narrow), np.float64)
                name += f", then to {'FP16' if narrow is fs.FP16 else 'BF16'} (nearest even)"
            bad = int((~same(got, d)).sum())
            yield case, name, d.size, bad


def ncu_rows(path):
    """(job, kernel, metric, value) of every nonzero tensor-pipe counter in ``ncu.csv``."""
    if not os.path.exists(path):
        return
    job, lines = None, []
    text = open(path).read().splitlines() + ["# end"]
    for ln in text:
        if ln.startswith("# "):
            if job is not None:
                body = [x for x in lines if x.startswith('"')]
                for r in csv.DictReader(io.StringIO("\n".join(body))):
                    v = r.get("Metric Value", "").replace(",", "")
                    try:
                        v = float(v)
                    except ValueError:
                        continue
                    if v:
                        yield job, r.get("Kernel Name", "?")[:60], r.get("Metric Name"), v
            job, lines = ln[2:].strip(), []
        else:
            lines.append(ln)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("measured")
    p.add_argument("inputs", nargs="?", default=os.path.join(HERE, "inputs.npz"))
    p.add_argument("--device", default="H200")
    p.add_argument("--ncu", default=None, help="ncu.csv (default: beside MEASURED)")
    args = p.parse_args(argv)
    meas, inp = np.load(args.measured), np.load(args.inputs)
    print("| combination | instructions | model | results | mismatches | first |")
    print("|---|---|---|---|---|---|")
    for combo, nk, name, n, bad, first in harness_rows(meas, inp, args.device):
        print(f"| {combo} | {nk} | {name} | {n} | {bad} | {first} |")
    print("\n| torch case | model | results | mismatches |\n|---|---|---|---|")
    for case, name, n, bad in torch_rows(meas, inp, args.device):
        print(f"| {case} | {name} | {n} | {bad} |")
    ncu = args.ncu or os.path.join(os.path.dirname(args.measured), "ncu.csv")
    rows = list(ncu_rows(ncu))
    if rows:
        print("\n| job | kernel | counter | value |\n|---|---|---|---|")
        for r in rows:
            print("| {} | {} | {} | {:,.0f} |".format(*r))


if __name__ == "__main__":
    main()
