"""Write the policy files of the floats study (policies/*.toml).

- ``fp16-no-loss-scale``: FP16 mixed precision without loss scaling (small errors underflow);
- ``bf16-weights`` / ``fp16-weights``: the BF16 / FP16 presets with the weights themselves
  stored in BF16 / FP16 (no FP32 master copy), where the rounding of the update decides
  whether small steps survive.

Run ``python studies/floats/make_policies.py``; the files are committed with the study.
"""

import dataclasses
import pathlib

import fixedsim as fs
from fixedsim.nn import Policy, Role

HERE = pathlib.Path(__file__).parent / "policies"


def main():
    HERE.mkdir(exist_ok=True)
    p = dataclasses.replace(Policy.fp16_mixed(loss_scale=None), name="fp16-no-loss-scale")
    p.save(HERE / "fp16-no-loss-scale.toml")
    for fmt, base in ((fs.BF16, Policy.bf16()), (fs.FP16, Policy.fp16_mixed())):
        name = f"{repr(fmt).lower()}-weights"
        p = dataclasses.replace(base, name=name, weights=Role(fmt), momentum=Role(fmt))
        p.save(HERE / f"{name}.toml")


if __name__ == "__main__":
    main()
