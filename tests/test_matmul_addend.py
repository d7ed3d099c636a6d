"""The addend C of ``matmul(a, b, spec, c)`` and the batch dimensions of ``b``: against the
oracle (reference.matmul, which defines both) and numpy.matmul's broadcasting rules."""

import numpy as np
import pytest
from helpers import assert_same_bits

import fixedsim as fs
from fixedsim import reference

SPECS = {
    "exact": fs.MatmulSpec(),
    "exact_fp16_out": fs.MatmulSpec(output=fs.FP16),
    "fp32_chain": fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32),
    "fp16_block4_down": fs.MatmulSpec(input=fs.BF16,
                                      accumulator=fs.Accumulator(fs.FP16, "down", block=4)),
    "fixed": fs.MatmulSpec(input=fs.FixedFormat(8, 4), accumulator=fs.FixedFormat(16, 6)),
    "blockfma": fs.MatmulSpec(input=fs.FP16, accumulator=fs.BlockFMA(8, 1, min_exp=-132)),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_addend_is_the_oracles(name):
    """C starts the running sum (or is a term of the exact sum, or of the first BlockFMA
    block); broadcast from a row, a column or a scalar."""
    spec = SPECS[name]
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 9)), rng.standard_normal((9, 4))
    for c in (rng.standard_normal((5, 4)), rng.standard_normal(4), rng.standard_normal((5, 1)),
              0.75, -0.0):
        assert_same_bits(fs.matmul(a, b, spec, c).astype(np.float64),
                         reference.matmul(a, b, spec, c=c), err_msg=f"{name} {np.shape(c)}")


def test_addend_changes_the_result_as_defined():
    a, b = np.array([[1.0]]), np.array([[2.0**-11]])
    spec = fs.MatmulSpec(accumulator=fs.FP16)  # 1 + 2**-11 is a tie: nearest even gives 1
    assert fs.matmul(a, b, spec, 1.0)[0, 0] == 1.0
    assert fs.matmul(a, b, fs.MatmulSpec(output=fs.FP16), 1.0 + 2.0**-10)[0, 0] == 1.0 + 2.0**-9
    assert np.signbit(fs.matmul(np.array([[-0.0]]), np.array([[1.0]]), fs.MatmulSpec(), -0.0))
    assert not np.signbit(fs.matmul(np.array([[0.0]]), np.array([[1.0]]), fs.MatmulSpec(), -0.0))


@pytest.mark.parametrize("shapes", [((2, 3, 4), (2, 4, 5)), ((3, 4), (2, 4, 5)),
                                    ((2, 1, 3, 4), (5, 4, 2)), ((1, 3, 4), (2, 4, 2))])
@pytest.mark.parametrize("name", ["exact_fp16_out", "fp32_chain", "blockfma"])
def test_batch_dimensions_broadcast_as_numpy(shapes, name):
    spec = SPECS[name]
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    got, cnt = fs.matmul(a, b, spec, stats=True)
    assert got.shape == np.matmul(a, b).shape
    assert_same_bits(got.astype(np.float64), reference.matmul(a, b, spec))
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    assert cnt.macs == int(np.prod(batch)) * a.shape[-2] * b.shape[-1] * a.shape[-1]
    c = rng.standard_normal(got.shape[-1])
    assert_same_bits(fs.matmul(a, b, spec, c).astype(np.float64),
                     reference.matmul(a, b, spec, c=c))


def test_bad_addend_and_batches_are_named():
    a, b = np.ones((2, 3)), np.ones((3, 4))
    with pytest.raises(ValueError, match=r"c of shape \(3,\) does not broadcast to the output "
                                         r"shape \(2, 4\)"):
        fs.matmul(a, b, None, np.ones(3))
    with pytest.raises(ValueError, match="c contains NaN.*fixed-point"):
        fs.matmul(a, b, SPECS["fixed"], np.nan)
    with pytest.raises(TypeError, match="c must hold real numbers"):
        fs.matmul(a, b, None, "x")
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, "stochastic"), seed=1)
    with pytest.raises(ValueError, match="batch dimensions takes no stochastic"):
        fs.matmul(np.ones((2, 2, 3)), np.ones((2, 3, 4)), spec)
    fs.matmul(np.ones((2, 2, 3)), np.ones((3, 4)), spec)  # a 2-D b: draws as before
