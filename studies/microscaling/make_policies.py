"""Write the policy files of the microscaling study that no command-line name spells
(policies/*.toml): MXFP4 with the "rceil" scale rule (cuBLAS's: the smallest power of two
that holds the block's maximum, ``2**ceil(log2(amax / 6))``) instead of OCP's floor rule, for
the three products; everything else as ``Policy.mx("mxfp4")``.

Run ``python studies/microscaling/make_policies.py``; the files are committed with the study.
"""

import pathlib

import fixedsim as fs
from fixedsim.nn import Policy

HERE = pathlib.Path(__file__).parent / "policies"


def main():
    HERE.mkdir(exist_ok=True)
    rceil = fs.BlockFormat(fs.FP4_E2M1, scale_rule="rceil")
    pol = Policy.mx(rceil)
    pol.save(HERE / "mxfp4-rceil.toml")


if __name__ == "__main__":
    main()
