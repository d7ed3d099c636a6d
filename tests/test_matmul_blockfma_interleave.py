"""BlockFMA with ``interleave``: the products of each chunk of ``promote`` dealt to its blocks
in groups, round robin (how Hopper and Blackwell run the FP8 ``mma.sync`` of K = 32 on their
FP16 unit). The blockfma row against the oracle (reference.dot), bit for bit and count for
count; the order by hand; a result that only the dealt order gives; the arguments; policies.
"""

import dataclasses

import numpy as np
import pytest
from blockfma_cases import check, one_numba_thread, operands
from helpers import assert_policy_round_trips
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import hardware, reference

R = fs.Rounding


@pytest.fixture(autouse=True)
def one_thread():
    with one_numba_thread():
        yield


@st.composite
def interleaved(draw):
    """A BlockFMA with promote and interleave: blocks of 2 to 8, 1 to 3 blocks per chunk."""
    fmt = draw(st.sampled_from([fs.FP32, fs.FP16]))
    block = draw(st.sampled_from([2, 4, 6, 8]))
    group = draw(st.sampled_from([g for g in (1, 2, 3, 4) if block % g == 0]))
    return fs.BlockFMA(
        block, draw(st.integers(-12, 4)),
        rounding=draw(st.sampled_from([R.TOWARD_ZERO, R.NEAREST_EVEN, R.UP, R.ODD])),
        fmt=fmt, output_frac_bits=draw(st.none() | st.integers(1, fmt.man_bits)),
        min_exp=draw(st.none() | st.integers(-150, 2)),
        promote=block * draw(st.integers(1, 3)), interleave=group)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), acc=interleaved(),
       fmt=st.sampled_from([fs.FP16, fs.BF16, fs.FP8_E4M3, fs.FP8_E5M2]),
       shape=st.tuples(st.integers(1, 3), st.integers(0, 30), st.integers(1, 3)),
       with_c=st.booleans())
def test_interleave_matches_the_oracle(data, acc, fmt, shape, with_c):
    """The row (operands dealt, padded, the kernel per chunk, then the promotions) is the
    oracle's (reference.dot deals each chunk itself), bit for bit and count for count."""
    M, K, N = shape
    assume(K > 0 or not with_c)
    a = data.draw(operands(fmt, (M, K)))
    b = data.draw(operands(fmt, (K, N)))
    c = data.draw(operands(acc.fmt, (M, N))) if with_c else None
    check(a, b, fs.MatmulSpec(input=fmt, accumulator=acc), c)


def test_the_order_by_hand():
    """Groups of 2 of a chunk of 32, two blocks: the first takes k mod 4 in {0, 1}."""
    assert reference.deal(32, 16, 2) == ([k for k in range(32) if k % 4 < 2]
                                         + [k for k in range(32) if k % 4 >= 2])
    assert reference.deal(12, 4, 2) == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
    assert reference.deal(8, 8, 2) == list(range(8))  # one block: the order is kept
    assert reference.deal(8, 2, 2) == list(range(8))  # groups as large as blocks


def test_only_the_dealt_order_gives_it():
    """The H100 FP8 -> FP16 preset on ``1 + 2**-11 + 2**-11`` (products 0, 1, 2): block 1 takes
    products 0 and 1, ``1 + 2**-11`` is a tie in FP16 and rounds to 1; block 2 adds product 2
    to that: a tie again, 1. Consecutive blocks (k 0..15 first) sum all three exactly:
    ``1 + 2**-10``, which FP16 holds. C is added last, with one rounding."""
    acc = hardware.spec("H100", "e4m3", "fp16").accumulator
    assert acc == fs.BlockFMA(16, 2, rounding=R.NEAREST_EVEN, fmt=fs.FP16, min_exp=-21,
                              promote=32, interleave=2)
    a = np.array([[1.0, 2.0**-6, 2.0**-6]])
    b = np.array([[1.0], [2.0**-5], [2.0**-5]])
    spec = fs.MatmulSpec(input=fs.FP8_E4M3, accumulator=acc)
    consecutive = fs.MatmulSpec(input=fs.FP8_E4M3,
                                accumulator=dataclasses.replace(acc, interleave=None))
    got, cnt = fs.matmul(a, b, spec, stats=True)
    assert got[0, 0] == 1.0 and cnt.paths == {"blockfma": 1}
    assert reference.dot(a[0], b[:, 0], spec) == 1.0
    assert fs.matmul(a, b, consecutive)[0, 0] == 1.0 + 2.0**-10
    assert cnt.accumulator.roundings == 2 + 1  # both blocks of the padded chunk, one addition
    assert cnt.alignment.roundings == 32 + 2  # the padded chunk's terms and block starts
    assert acc.roundings(33) == 2 * 3
    # C takes part in no block: 2**-11 added to 1 is a tie, to even
    assert fs.matmul(a, b, spec, np.array([[2.0**-11]]))[0, 0] == 1.0
    assert fs.matmul(a, b, spec, np.array([[3 * 2.0**-11]]))[0, 0] == 1.0 + 2.0**-9


@pytest.mark.parametrize("kw,err,match", [
    (dict(interleave=2), ValueError, "BlockFMA interleave needs promote"),
    (dict(promote=8, interleave=3), ValueError,
     r"BlockFMA interleave must be a divisor of block \(4\), got 3"),
    (dict(promote=8, interleave=0), ValueError, "interleave must be a divisor"),
    (dict(promote=8, interleave=2.0), TypeError, "BlockFMA interleave must be an int"),
    (dict(promote=8, interleave=True), TypeError, "BlockFMA interleave must be an int"),
])
def test_bad_interleave_names_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        fs.BlockFMA(4, 0, **kw)


def test_a_policy_keeps_interleave(tmp_path):
    from fixedsim.nn.policy import Policy

    spec = hardware.spec("B200", "e5m2", "fp32")
    assert repr(spec.accumulator) == "BlockFMA(16, 2, min_exp=-133, promote=32, interleave=2)"
    p = dataclasses.replace(Policy.fp16_mixed(), name="b200", forward=spec)
    d = p.to_dict()
    assert d["forward"]["accumulator"]["interleave"] == 2
    assert_policy_round_trips(p, tmp_path)
    with pytest.raises(ValueError, match=r"forward.accumulator.*interleave needs promote"):
        Policy.from_dict({"forward": {"accumulator": {"kind": "block_fma", "block": 16,
                                                      "extra_bits": 2, "interleave": 2}}})
