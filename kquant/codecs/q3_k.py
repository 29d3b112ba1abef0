"""Q3_K: 256-value super-blocks of 16 sub-blocks, 3-bit symmetric levels, 6-bit scales.

block_q3_K (110 bytes): hmask[32] (high bits), qs[64] (low 2 bits), scales[12], d (f16).
Ports quantize_row_q3_K_ref, quantize_row_q3_K_impl and dequantize_row_q3_K.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import F32, get_f16, nearest_int, put_f16, round_nearest
from .layout import QK_K, pack_2bit, q3_scale
from .search import make_q3_quants, make_qx_quants, workspace

BLOCK_BYTES = 110
_HMASK, _QS, _SCALES, _D = 0, 32, 96, 108
_ZERO = F32(0.0)
_F3 = F32(3.0)
_FM4 = F32(-4.0)
_ROUND_LIMIT = F32(4194304.0)  # round_nearest equals nearest_int below 2^22


@njit(cache=True, error_model="numpy", inline="always")
def _pack_scale(y, j, l):
    """Store the 6-bit level l (0..63) of sub-block j into the 12 scale bytes."""
    if j < 8:
        y[_SCALES + j] = l & 0xF
    else:
        y[_SCALES + j - 8] |= (l & 0xF) << 4
    y[_SCALES + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))


@njit(cache=True, error_model="numpy", inline="always")
def _finish(x, y, L):
    """Requantize against the stored scales, then split levels into hmask and qs."""
    d_all = get_f16(y, _D)
    for j in range(QK_K // 16):
        d = d_all * F32(q3_scale(y, _SCALES, j))
        if d == _ZERO:
            continue
        ok = True
        for ii in range(16):
            v = x[16 * j + ii] / d
            ok &= abs(v) < _ROUND_LIMIT
            L[16 * j + ii] = np.int32(min(_F3, max(_FM4, round_nearest(v)))) + 4
        if not ok:  # inf/NaN: C's nearest_int returns mantissa bits there, not a clamp
            for ii in range(16):
                L[16 * j + ii] = max(-4, min(3, nearest_int(x[16 * j + ii] / d))) + 4
    # value j's third bit goes to bit j // 32 of hmask[j % 32]
    for m in range(QK_K // 8):
        y[_HMASK + m] = 0
    for b in range(8):
        for m in range(32):
            lv = L[32 * b + m]
            y[_HMASK + m] |= (lv >> 2) << b
            L[32 * b + m] = lv & 3
    pack_2bit(L, y, _QS)


@njit(cache=True, error_model="numpy")
def quantize_block(x, y, L, scales):
    max_scale = _ZERO
    amax = _ZERO
    for j in range(QK_K // 16):
        scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], True)
        scale = abs(scales[j])
        if scale > amax:
            amax = scale
            max_scale = scales[j]
    for j in range(12):
        y[_SCALES + j] = 0
    if max_scale != _ZERO:
        iscale = F32(-32.0) / max_scale
        for j in range(QK_K // 16):
            l = np.int8(nearest_int(iscale * scales[j]))  # C stores into an int8_t first
            l = max(-32, min(31, l)) + 32
            _pack_scale(y, j, l)
        put_f16(y, _D, F32(1.0) / iscale)
    else:
        put_f16(y, _D, _ZERO)
    _finish(x, y, L)


@njit(cache=True, error_model="numpy")
def quantize_block_imatrix(x, qw, y, L, scales, weight, sw, Ls, ws):
    sumx2 = _ZERO
    for j in range(QK_K):
        sumx2 += x[j] * x[j]
    sigma2 = F32(2.0) * sumx2 / F32(QK_K)
    for j in range(QK_K // 16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l])
        sumw = _ZERO
        for l in range(16):
            sumw += weight[l]
        sw[j] = sumw
        scales[j] = make_qx_quants(16, 4, xs, L[16 * j:16 * j + 16], weight, True, ws)
    for j in range(12):
        y[_SCALES + j] = 0
    d_block = make_qx_quants(QK_K // 16, 32, scales, Ls, sw, True, ws)
    for j in range(QK_K // 16):
        _pack_scale(y, j, np.int64(Ls[j]))
    put_f16(y, _D, d_block)
    _finish(x, y, L)


@njit(cache=True, error_model="numpy", parallel=True)
def quantize_rows(x, qw, use_qw, out):
    nrows, n = x.shape
    for r in prange(nrows):
        L = np.empty(QK_K, np.int8)
        scales = np.empty(16, np.float32)
        weight = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.int8)
        ws = workspace()
        for i in range(n // QK_K):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            yb = out[r, i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]
            if use_qw:
                quantize_block_imatrix(xb, qw[i * QK_K:(i + 1) * QK_K], yb, L, scales, weight, sw, Ls, ws)
            else:
                quantize_block(xb, yb, L, scales)


@njit(cache=True, error_model="numpy", parallel=True)
def dequantize_rows(q, out):
    nrows, n = out.shape
    for r in prange(nrows):
        for i in range(n // QK_K):
            b = q[r, i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]
            y = out[r, i * QK_K:(i + 1) * QK_K]
            d_all = get_f16(b, _D)
            for j in range(QK_K // 16):
                dl = d_all * F32(q3_scale(b, _SCALES, j))
                for ii in range(16):
                    p = 16 * j + ii
                    low = (b[_QS + (p // 128) * 32 + p % 32] >> (2 * ((p % 128) // 32))) & 3
                    high = (b[_HMASK + p % 32] >> (p // 32)) & 1
                    y[p] = dl * F32(np.int64(low) - (0 if high else 4))
