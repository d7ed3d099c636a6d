"""Shared pytest configuration: hypothesis profiles (select with FIXEDSIM_HYPOTHESIS_PROFILE)."""

import os

from fixedsim.testing import register_profiles

register_profiles()

# The command line measures an expected run time before `fixedsim train` and in `fixedsim
# sweep --dry-run` (a few small steps); the tests that exercise the estimate ask for it with
# --estimate, the others skip its seconds.
os.environ.setdefault("FIXEDSIM_ESTIMATE", "0")
