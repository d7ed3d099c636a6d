"""Shared helpers for the tests: bit-for-bit comparison of value arrays."""

import numpy as np


def canonical_bits(a) -> np.ndarray:
    """float64 bit patterns of ``a`` with every NaN replaced by the quiet NaN of its sign."""
    a = np.asarray(a, dtype=np.float64)
    bits = a.view(np.uint64).copy()
    nan = np.isnan(a)
    bits[nan] = np.where(np.signbit(a[nan]), np.uint64(0xFFF8000000000000),
                         np.uint64(0x7FF8000000000000))
    return bits


def assert_same_bits(actual, expected, err_msg=""):
    """Equal bit for bit as float64 (signed zeros distinguished), NaN compared by sign only."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = canonical_bits(actual), canonical_bits(expected)
    if not np.array_equal(a, e):
        bad = np.flatnonzero((a != e).reshape(-1))
        i = bad[0]
        raise AssertionError(
            f"{bad.size} of {a.size} differ; first at flat index {i}: "
            f"got {actual.reshape(-1)[i]!r}, expected {expected.reshape(-1)[i]!r} {err_msg}"
        )
