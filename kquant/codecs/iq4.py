"""IQ4_NL and IQ4_XS: 4-bit indices into ggml's non-linear table kvalues_iq4nl.

block_iq4_nl (18 bytes), 32 values:
  0       2                                  18
  | d f16 | qs: 16 bytes                     |   value j: d * kvalues_iq4nl[index j]
  index j in the low nibble of qs[j], index j+16 in its high nibble (j < 16).

block_iq4_xs (136 bytes), a 256-value super-block of 8 sub-blocks of 32:
  0       2                 4                  8                                      136
  | d f16 | scales_h u16 LE | scales_l: 4 bytes | qs: 128 bytes, 16 per sub-block        |
  sub-block ib: 6-bit scale ls = (scales_l[ib/2] >> 4*(ib%2)) & 0xF | ((scales_h >> 2*ib) & 3) << 4,
  value = d * (ls - 32) * kvalues_iq4nl[index], indices packed as IQ4_NL's within the sub-block.

Ports ggml-quants.c's quantize_iq4_nl and quantize_iq4_xs (both quantize_row_iq4_nl_impl with
ntry = 7; with and without quant_weights), dequantize_row_iq4_nl and dequantize_row_iq4_xs,
float32 in C's order. ggml_quantize_chunk calls quantize_iq4_nl even without an imatrix, so
IQ4_NL never takes quantize_row_iq4_nl_ref's ntry = -1 path here.

Speed: each 32-value sub-block tries 16 scales (C's first guess and itry = -7..7), one after
another in C; here side by side, one SIMD lane per trial, each lane's sums in C's order over
j (as kquant/codecs/search.py does for the K-quants). best_index_int8's binary search becomes
a count of thresholds: the table is increasing, and C's tie rule `x - val[m-1] < val[m] - x`
picks the upper value exactly from the midpoint (val[m-1] + val[m]) / 2 on (both differences
are exact near the midpoints, all half-integers: checked in tests/test_iq4.py), so
index(x) = #{m : not (x < midpoint[m])}, which also sends NaN to 15 as the C does.
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np
from numba import njit

from .bits import F32, get_f16, nearest_int, put_f16, signed_absmax
from .layout import QK_K, quantize_blocks

QK4_NL = 32
NL_BYTES = 18
XS_BYTES = 136
_XS_D, _XS_SH, _XS_SL, _XS_QS = 0, 2, 4, 8

#: ggml-common.h's kvalues_iq4nl
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_KV = np.array(KVALUES_IQ4NL, np.float32)
#: where best_index_int8 steps from index m-1 to m (m = 1..15), and by how much the value grows
THRESHOLDS = np.array([(a + b) / 2 for a, b in pairwise(KVALUES_IQ4NL)],
                      np.float32)
_STEPS = np.array([b - a for a, b in pairwise(KVALUES_IQ4NL)], np.float32)
_V0 = F32(KVALUES_IQ4NL[0])

GROUP_MAX_EPS = F32(1e-15)
_ZERO = F32(0.0)
_ONE = F32(1.0)
_F32 = F32(32.0)
_NTRY = 7

# The trial lanes in one flat float32 workspace at constant offsets (see search.py): lane 0
# is C's first guess d = -max/values[0], lane k = 1..15 tries itry = k - 8.
_LANES = 16
_ID, _SX, _S2 = 0, _LANES, 2 * _LANES
_WS = 3 * _LANES


@njit(cache=True, error_model="numpy", inline="always")
def best_index(x):
    """best_index_int8(16, kvalues_iq4nl, x): the nearest table entry (ties up), NaN -> 15."""
    i = 0
    for m in range(15):
        if not x < THRESHOLDS[m]:
            i += 1
    return i


@njit(cache=True, error_model="numpy", inline="always")
def _sub_block_scale(xb, w, ws):
    """The scale quantize_row_iq4_nl_impl settles on for one 32-value sub-block xb with
    weights w (ntry = 7), or 0 when the sub-block is below GROUP_MAX_EPS."""
    max_, amax = signed_absmax(32, xb)
    if amax < GROUP_MAX_EPS:
        return _ZERO
    d = -max_ / _V0
    ws[_ID] = _ONE / d
    for k in range(1, _LANES):
        ws[_ID + k] = F32(k - 1 - _NTRY + KVALUES_IQ4NL[0]) / max_
    for k in range(_LANES):
        ws[_SX + k] = _ZERO
        ws[_S2 + k] = _ZERO
    for j in range(32):
        xj = xb[j]
        wj = w[j]
        for k in range(_LANES):
            al = ws[_ID + k] * xj
            q = _V0
            for m in range(15):
                q += _ZERO if al < THRESHOLDS[m] else _STEPS[m]
            wq = wj * q
            ws[_SX + k] += wq * xj
            ws[_S2 + k] += wq * q
    sumqx = ws[_SX]
    sumq2 = ws[_S2]
    d = sumqx / sumq2 if sumq2 > _ZERO else _ZERO
    best = d * sumqx
    for k in range(1, _LANES):
        sumqx = ws[_SX + k]
        sumq2 = ws[_S2 + k]
        if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True, error_model="numpy", inline="always")
def _weights(xb, qwb, use_qw, sigma2, w):
    """quant_weights[j] * sqrt(sigma2 + x^2), or x^2 without them."""
    if use_qw:
        for j in range(32):
            w[j] = qwb[j] * np.sqrt(sigma2 + xb[j] * xb[j])
    else:
        for j in range(32):
            w[j] = xb[j] * xb[j]


@njit(cache=True, error_model="numpy", inline="always")
def _sigma2(x, n):
    """C's sigma2 over the super-block: sum(x^2) in order, times 2/n."""
    s = _ZERO
    for j in range(n):
        s += x[j] * x[j]
    return s * (F32(2.0) / F32(n))


@njit(cache=True, error_model="numpy", inline="always")
def _pack(xb, inv, y, pos):
    """Indices of inv * xb (32 values) packed into 16 bytes at y[pos]."""
    for j in range(16):
        y[pos + j] = best_index(inv * xb[j]) | (best_index(inv * xb[j + 16]) << 4)


@njit(cache=True, error_model="numpy", inline="always")
def _nl_block(xb, qwb, use_qw, y, w, ws):
    sigma2 = _sigma2(xb, QK4_NL) if use_qw else _ZERO
    _weights(xb, qwb, use_qw, sigma2, w)
    d = _sub_block_scale(xb, w, ws)
    put_f16(y, 0, d)
    _pack(xb, _ONE / d if d != _ZERO else _ZERO, y, 2)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_nl_rows(x, qw, use_qw, out):
    """quantize_iq4_nl: rows in order (threads.py runs slices of them side by side), 32-value blocks in order."""
    nrows, n = x.shape
    for r in range(nrows):
        w = np.empty(32, np.float32)
        ws = np.empty(_WS, np.float32)
        for ib in range(n // QK4_NL):
            _nl_block(x[r, ib * QK4_NL:(ib + 1) * QK4_NL], qw[ib * QK4_NL:(ib + 1) * QK4_NL],
                      use_qw, out[r, ib * NL_BYTES:(ib + 1) * NL_BYTES], w, ws)


@njit(cache=True, error_model="numpy", inline="always")
def _xs_scratch():
    return np.empty(32, np.float32), np.empty(_WS, np.float32), np.empty(QK_K // 32, np.float32)


@njit(cache=True, error_model="numpy", inline="always")
def _xs_block(x, qw, use_qw, y, s, fell_back):
    w, ws, scales = s
    sigma2 = _sigma2(x, QK_K) if use_qw else _ZERO
    max_scale = _ZERO
    amax_scale = _ZERO
    for ib in range(QK_K // 32):
        xb = x[32 * ib:32 * ib + 32]
        _weights(xb, qw[32 * ib:32 * ib + 32], use_qw, sigma2, w)
        d = _sub_block_scale(xb, w, ws)
        scales[ib] = d
        abs_d = abs(d)
        if abs_d > amax_scale:
            amax_scale = abs_d
            max_scale = d
    d = -max_scale / _F32
    put_f16(y, _XS_D, d)
    inv = _ONE / d if d != _ZERO else _ZERO
    scales_h = 0
    for ib in range(QK_K // 32):
        l = max(-32, min(31, nearest_int(inv * scales[ib])))
        dl = d * F32(l)
        _pack(x[32 * ib:32 * ib + 32], _ONE / dl if dl != _ZERO else _ZERO, y,
              _XS_QS + 16 * ib)
        l += 32
        if ib % 2 == 0:
            y[_XS_SL + ib // 2] = l & 0xF
        else:
            y[_XS_SL + ib // 2] |= (l & 0xF) << 4
        scales_h |= (l >> 4) << (2 * ib)
    y[_XS_SH] = scales_h & 0xFF
    y[_XS_SH + 1] = scales_h >> 8


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_xs_rows(x, qw, use_qw, out):
    """quantize_iq4_xs: rows in order (threads.py runs slices of them side by side), 256-value super-blocks in order."""
    quantize_blocks(x, qw, use_qw, out, XS_BYTES, _xs_scratch, _xs_block, None)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_nl_rows(q, out):
    """dequantize_row_iq4_nl."""
    nrows, n = out.shape
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ib in range(n // QK4_NL):
            o = ib * NL_BYTES
            v = ib * QK4_NL
            d = get_f16(qr, o)
            for j in range(16):
                b = qr[o + 2 + j]
                y[v + j] = d * _KV[b & 0xF]
                y[v + j + 16] = d * _KV[b >> 4]


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_xs_rows(q, out):
    """dequantize_row_iq4_xs."""
    nrows, n = out.shape
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ibl in range(n // QK_K):
            o = ibl * XS_BYTES
            d = get_f16(qr, o + _XS_D)
            scales_h = np.int64(qr[o + _XS_SH]) | (np.int64(qr[o + _XS_SH + 1]) << 8)
            for ib in range(QK_K // 32):
                ls = ((np.int64(qr[o + _XS_SL + ib // 2]) >> (4 * (ib % 2))) & 0xF) \
                    | (((scales_h >> (2 * ib)) & 3) << 4)
                dl = d * F32(ls - 32)
                v = ibl * QK_K + 32 * ib
                p = o + _XS_QS + 16 * ib
                for j in range(16):
                    b = qr[p + j]
                    y[v + j] = dl * _KV[b & 0xF]
                    y[v + j + 16] = dl * _KV[b >> 4]


# GPTQ (kquant.quantization.gptq) keeps a block's scales and re-chooses its indices: one block
# a row (a block column of the matrix), 16 nibbles a 32-value group at qs, index j in the low
# nibble of qs[j] and index j + 16 in its high nibble.
@njit(cache=True, error_model="numpy", nogil=True)
def set_levels_rows(data, levels, qs0, stride):
    """Indices (rows, values) 0..15 into the block of each row, the scales kept: the groups of
    32 values at qs0, qs0 + stride, ... (IQ4_NL: 2, one group; IQ4_XS: 8, 8 groups of 16 bytes)."""
    for r in range(data.shape[0]):
        for g in range(levels.shape[1] // 32):
            p = qs0 + g * stride
            for j in range(16):
                data[r, p + j] = levels[r, 32 * g + j] | (levels[r, 32 * g + j + 16] << 4)


@njit(cache=True, error_model="numpy", nogil=True)
def levels_rows(data, levels, qs0, stride):
    """set_levels_rows' inverse: the indices the blocks hold."""
    for r in range(data.shape[0]):
        for g in range(levels.shape[1] // 32):
            p = qs0 + g * stride
            for j in range(16):
                levels[r, 32 * g + j] = data[r, p + j] & 0xF
                levels[r, 32 * g + j + 16] = data[r, p + j] >> 4
