"""Write the policy files of the tensor-core study (policies/*.toml).

Every policy is FP16 mixed precision (``Policy.fp16_mixed()``: FP32 master weights, FP16
activations, errors and weight gradients, dynamic loss scaling) with the three products of
every layer (forward, input gradient, weight gradient) taking FP16 operands and one
accumulator:

- ``fp16-exact``: the exact sum of the products, rounded once into FP32 (the reference);
- ``fp16-h100``: the H100's FP16 tensor core (``hardware.spec("H100", "fp16")``: blocks of
  16, 2 extra alignment bits, truncation into FP32);
- ``fp16-h100-fp8acc``: the accumulator of the H100's FP8 (E4M3) unit (blocks of 32, 10 bits
  fewer than FP32 below the anchor, 13 fraction bits kept), with FP16 operands: what that
  accumulator alone does to training;
- ``fp16-h100-fp8acc-promote128``: the same with DeepSeek-V3's promotion of the partial sum
  to an FP32 register every 128 products (``BlockFMA(..., promote=128)``).

and BF16 mixed precision (``Policy.bf16()``: FP32 master weights, BF16 activations, errors and
weight gradients, no loss scaling) with BF16 operands:

- ``bf16-exact``: the exact sum, rounded once into FP32;
- ``bf16-h100``: the H100's BF16 tensor core (``hardware.spec("H100", "bf16")``).

Run ``python studies/tensor_cores/make_policies.py``; the files are committed with the study.
"""

import dataclasses
import pathlib

import fixedsim as fs
from fixedsim import hardware
from fixedsim.nn import PRODUCTS, Policy

HERE = pathlib.Path(__file__).parent / "policies"


def with_products(base: Policy, spec: fs.MatmulSpec, name: str) -> Policy:
    """``base`` with ``spec`` as its three products."""
    return dataclasses.replace(base, name=name, **dict.fromkeys(PRODUCTS, spec))


def main():
    HERE.mkdir(exist_ok=True)
    h, b = Policy.fp16_mixed(), Policy.bf16()
    fp8 = hardware.spec("H100", "e4m3").accumulator
    specs = {
        "fp16-exact": (h, fs.MatmulSpec(input=fs.FP16, output=fs.FP32)),
        "fp16-h100": (h, hardware.spec("H100", "fp16")),
        "fp16-h100-fp8acc": (h, fs.MatmulSpec(input=fs.FP16, accumulator=fp8)),
        "fp16-h100-fp8acc-promote128": (h, fs.MatmulSpec(
            input=fs.FP16, accumulator=dataclasses.replace(fp8, promote=128))),
        "bf16-exact": (b, fs.MatmulSpec(input=fs.BF16, output=fs.FP32)),
        "bf16-h100": (b, hardware.spec("H100", "bf16")),
    }
    for name, (base, spec) in specs.items():
        with_products(base, spec, name).save(HERE / f"{name}.toml")


if __name__ == "__main__":
    main()
