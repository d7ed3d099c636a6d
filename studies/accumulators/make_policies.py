"""Write the policy files of the accumulator study (policies/*.toml).

Every policy is Gupta et al.'s 16-bit fixed point with stochastic rounding, Q<16,12>
(Policy.fixed(16, 12, "stochastic"): FL = 12 trains as well as float32 in studies/gupta2015,
where FL = 14 saturates), or FP16 mixed precision, with the accumulator of all three products
of every layer (forward, input gradient, weight gradient) replaced:

- fixed-point accumulators of 16, 20, 24 and 32 bits with 6 integer bits (sign included:
  range +-32) and W - 6 fractional bits, rounding each step to nearest even, saturating or
  wrapping;
- FP16 accumulators (FP16 operands, as fp16_mixed) at block 1 (a chain of FMAs) and block 16
  (an exact 16-term dot-product unit per rounding);
- FP32 accumulators that truncate (round toward zero) every step, as some matrix units do.

Run ``python studies/accumulators/make_policies.py``; the files are committed with the study.
"""

import dataclasses
import pathlib

import fixedsim as fs
from fixedsim.nn import PRODUCTS, Policy

HERE = pathlib.Path(__file__).parent / "policies"


def with_accumulator(base: Policy, acc: fs.Accumulator, name: str) -> Policy:
    """``base`` with ``acc`` as the accumulator of its three products."""
    specs = {p: dataclasses.replace(getattr(base, p), accumulator=acc) for p in PRODUCTS}
    return dataclasses.replace(base, name=name, **specs)


def main():
    HERE.mkdir(exist_ok=True)
    q = Policy.fixed(16, 12, "stochastic")
    for w in (16, 20, 24, 32):
        for ov in ("saturate", "wrap"):
            acc = fs.Accumulator(fs.FixedFormat(w, w - 6), "nearest_even", ov)
            name = f"q16-12-sr-acc-q{w}-{ov}"
            with_accumulator(q, acc, name).save(HERE / f"{name}.toml")
    h = Policy.fp16_mixed()
    for block in (1, 16):
        name = f"fp16-acc-fp16-block{block}"
        with_accumulator(h, fs.Accumulator(fs.FP16, block=block), name).save(
            HERE / f"{name}.toml")
    name = "fp16-acc-fp32-truncate"
    with_accumulator(h, fs.Accumulator(fs.FP32, "toward_zero"), name).save(HERE / f"{name}.toml")


if __name__ == "__main__":
    main()
