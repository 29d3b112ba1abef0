"""The one activation quantizer (kquant.matmul.activations) on exact ties.

kquant used to port ggml's activation quantizers twice: kquant.matmul for its block kernels
(quantize_activations: ggml's bytes) and kquant.runtime for its float products
(round_activations, min_term_correction: the dequantized values). Both now go through the same
block quantizers; these inputs sit exactly halfway between two levels, where a rounding rule
shows: ggml's AVX2 quantize_row_q8_0/q8_1 (_mm256_round_ps) and quantize_row_q8_K_ref
(nearest_int) round half to even, the Q8_0 file format's quantize_row_q8_0_ref (roundf) half
away from zero, and so does any `floor(v + 0.5)`.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.matmul import quantize_activations
from kquant.matmul.activations import min_term_correction, round_activations

# v and what round half to even makes of it; half away from zero gives 1, 3, -1, -3, 127, -127
TIES = [(0.5, 0), (2.5, 2), (-0.5, 0), (-2.5, -2), (126.5, 126), (-126.5, -126), (1.5, 2),
        (-3.5, -4), (1.25, 1), (-1.75, -2)]


class _NumpyStandIn:
    """numpy under another name: the array-expression (CuPy) path, run on the CPU."""

    def __getattr__(self, name):
        return getattr(np, name)


def _tie_blocks(block: int, top: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of two blocks: x, where each value v of TIES becomes v / scale, and the levels
    round half to even gives. Block 0 holds `top` (so x / d is exact), block 1 `top` / 2 with
    the ties halved: its scale is twice as fine, the same levels."""
    x = np.zeros((2, 2 * block), np.float32)
    q = np.zeros((2, 2 * block), np.int64)
    for b, div in ((0, 1.0), (1, 2.0)):
        o = b * block
        x[:, o] = top / div
        q[:, o] = round(top * scale)
        for j, (v, want) in enumerate(TIES, start=1):
            x[:, o + j] = v / scale / div
            q[:, o + j] = want
    x[1] = -x[1]   # the negated ties round to the negated levels
    q[1] = -q[1]
    return x, q


def _assert_paths_agree(x: np.ndarray, weight_type: T) -> np.ndarray:
    """The runtime's rounding = the block kernels' activations dequantized = the array path."""
    act = quantize_activations(x, weight_type)
    rounded = round_activations(x, weight_type)
    np.testing.assert_array_equal(rounded, act.dequantize())
    np.testing.assert_array_equal(round_activations(x, weight_type, _NumpyStandIn()), rounded)
    return rounded


@pytest.mark.parametrize("weight_type", [T.Q4_0, T.Q8_0, T.Q4_1, T.Q5_1])
def test_q8_0_and_q8_1_round_ties_to_even(weight_type):
    # amax 127: d = 1, id = 127 / amax = 1; block 1: amax 63.5, d = 0.5, id = 2, both exact
    x, q = _tie_blocks(32, 127.0, 1.0)
    act = quantize_activations(x, weight_type)
    assert act.qs.tolist() == q.tolist()
    assert act.d.tolist() == [[1.0, 0.5]] * 2
    rounded = _assert_paths_agree(x, weight_type)
    np.testing.assert_array_equal(rounded, q * np.repeat(act.d, 32, axis=1))


def test_the_q8_0_file_format_rounds_ties_away_from_zero():
    """The contrast that makes the tests above able to fail: quantize_row_q8_0_ref (roundf)."""
    x, q = _tie_blocks(32, 127.0, 1.0)
    ref = kquant.quantize(x, "Q8_0").reshape(2, 2, 34)[:, :, 2:].view(np.int8).reshape(2, 64)
    away = np.sign(x) * np.floor(np.abs(x) * np.array([1.0] * 32 + [2.0] * 32) + 0.5)
    assert ref.tolist() == away.astype(int).tolist() != q.tolist()


@pytest.mark.parametrize("weight_type", [T.Q4_1, T.Q5_1])
def test_q8_1_block_sums_on_ties(weight_type):
    """s = fp16(d * sum(q)), d before its fp16 rounding; the runtime's correction is s minus
    what the dequantized values sum to, on all three paths."""
    x, q = _tie_blocks(32, 127.0, 1.0)
    act = quantize_activations(x, weight_type)
    sums = q.reshape(2, 2, 32).sum(axis=-1)
    d = np.array([127.0 / 127.0, 63.5 / 127.0], np.float32)
    want_s = (d * sums.astype(np.float32)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(act.s, want_s)
    corr = min_term_correction(x, weight_type)
    np.testing.assert_array_equal(corr, act.s - act.d * sums.astype(np.float32))
    np.testing.assert_array_equal(min_term_correction(x, weight_type, _NumpyStandIn()), corr)


def test_q8_k_rounds_ties_to_even():
    # the value of largest magnitude sets the sign: row 0's 127 gives iscale = -127 / 127 = -1,
    # d = -1 (block 1: 63.5, iscale -2, d -0.5), row 1's -127 iscale 1, d = 1; so the quants
    # q = nearest_int(iscale * x) are minus the levels in both rows
    x, q = _tie_blocks(256, 127.0, 1.0)
    sign = np.array([[1], [-1]])
    act = quantize_activations(x, T.Q4_K)
    assert act.qs.tolist() == (-q * sign).tolist()
    assert act.d.tolist() == (sign * [-1.0, -0.5]).tolist()
    assert act.sums.tolist() == (-q * sign).reshape(2, 32, 16).sum(axis=-1).tolist()
    rounded = _assert_paths_agree(x, T.Q4_K)
    np.testing.assert_array_equal(rounded, q * np.repeat([1.0, 0.5], 256))  # d * qs


def _f16_bits(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint16)


def _bf16_bits(v: np.ndarray) -> np.ndarray:
    return (v.view(np.uint32) >> 16).astype(np.uint16)   # exact: v is a bfloat16 value


@pytest.mark.parametrize("weight_type, bits, to_bits", [(T.F16, 10, _f16_bits),
                                                        (T.BF16, 7, _bf16_bits)])
def test_half_floats_round_ties_to_even(weight_type, bits, to_bits):
    """1 + k/2 ulp for k = 1, 3, 5 sit halfway: they go to 1, 1 + 2 ulp, 1 + 2 ulp (even)."""
    u = 2.0 ** -bits
    x = np.array([[1 + u / 2, 1 + 3 * u / 2, 1 + 5 * u / 2, -(1 + 3 * u / 2)]], np.float32)
    want = np.array([[1.0, 1 + 2 * u, 1 + 2 * u, -(1 + 2 * u)]], np.float32)
    np.testing.assert_array_equal(_assert_paths_agree(x, weight_type), want)
    assert quantize_activations(x, weight_type).values.tolist() == to_bits(want).tolist()
