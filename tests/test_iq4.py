"""The IQ4 codecs' pieces that need no libggml: best_index_int8 as a count of midpoints,
and the block layouts (the byte-for-byte checks against ggml are in test_parity.py and
test_golden.py)."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import kquant
from kquant.codecs import iq4


def best_index_int8(x: np.float32) -> int:
    """ggml-quants.c's best_index_int8(16, kvalues_iq4nl, x), literally, in float32."""
    val = [np.float32(v) for v in iq4.KVALUES_IQ4NL]
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - val[mu - 1]) < np.float32(val[mu] - x) else mu


@njit(cache=True)
def _indices(xs):
    out = np.empty(xs.size, np.int64)
    for i in range(xs.size):
        out[i] = iq4.best_index(xs[i])
    return out


def _around(v: float, k: int = 64) -> np.ndarray:
    """The k float32 values either side of v, and v."""
    if v == 0:
        pos = np.arange(0, k, dtype=np.int32).view(np.float32)  # +0.0 and the denormals
        return np.concatenate([pos, -pos])
    bits = np.array([v], np.float32).view(np.int32)[0]  # same-sign neighbours: bits +- 1
    return np.arange(bits - k, bits + k + 1, dtype=np.int32).view(np.float32)


def test_best_index_is_ggmls_binary_search():
    rng = np.random.default_rng(0)
    probes = [_around(float(t)) for t in iq4.THRESHOLDS]
    probes += [_around(float(v)) for v in iq4.KVALUES_IQ4NL] + [_around(0.0)]
    probes += [(rng.standard_normal(20000) * 60).astype(np.float32),
               rng.uniform(-200, 200, 20000).astype(np.float32),
               np.array([np.inf, -np.inf, np.nan, -np.nan, 3e38, -3e38, 1e-45, -1e-45,
                         -0.0, 0.0, 1e30, -1e30], np.float32)]
    xs = np.concatenate(probes).astype(np.float32)
    got = _indices(xs)
    want = np.array([best_index_int8(x) for x in xs])
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, f"{bad.size} differ, first x={xs[bad[0]]!r}"


def test_thresholds_are_the_midpoints_where_ggml_steps_up():
    v = np.array(iq4.KVALUES_IQ4NL, np.float32)
    assert np.all(np.diff(v) > 0)
    for m, t in enumerate(iq4.THRESHOLDS, start=1):
        below = np.nextafter(t, np.float32(-np.inf), dtype=np.float32)
        assert best_index_int8(t) == m and best_index_int8(below) == m - 1


@pytest.mark.parametrize("name, block, size", [("IQ4_NL", 32, 18), ("IQ4_XS", 256, 136)])
def test_layout_and_round_trip(name, block, size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    q = kquant.quantize(x, name)
    assert q.shape == (5, 512 // block * size) and q.dtype == np.uint8
    y = kquant.dequantize(q, name)
    assert y.shape == x.shape
    # 4-bit non-linear levels: a few percent of the signal's energy
    assert np.mean((y - x) ** 2) / np.mean(x ** 2) < 0.02
    assert np.array_equal(kquant.quantize(np.zeros((2, 256), np.float32), name),
                          kquant.quantize(np.zeros((2, 256), np.float32), name))


def test_iq4_xs_scales_follow_the_block_layout():
    """A super-block whose sub-blocks grow by powers of two: the decoded scale of each
    sub-block (d * (ls - 32)) tracks its magnitude, from scales_l / scales_h as drawn."""
    x = np.concatenate([np.linspace(-1, 1, 32, dtype=np.float32) * np.float32(2.0 ** (i - 4))
                        for i in range(8)])[None]
    q = kquant.quantize(x, "IQ4_XS")[0]
    d = q[:2].view(np.float16)[0].astype(np.float32)
    sh = int(q[2]) | int(q[3]) << 8
    ls = [(int(q[4 + ib // 2]) >> 4 * (ib % 2)) & 0xF | ((sh >> 2 * ib) & 3) << 4 for ib in range(8)]
    scale = np.abs(d * (np.array(ls) - 32))
    assert ls[-1] == 0 and np.all(np.diff(scale) >= 0)  # the largest sub-block: ls - 32 = -32
    assert np.allclose(scale[2:], np.float32(2.0) ** np.arange(-6, 0) * scale[-1] * 2, rtol=0.1)
