"""Shared pytest configuration: hypothesis profiles (select with FIXEDSIM_HYPOTHESIS_PROFILE)."""

from fixedsim.testing import register_profiles

register_profiles()
