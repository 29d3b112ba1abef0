"""Q3_K: 256-value super-blocks of 16 sub-blocks, 3-bit symmetric levels, 6-bit scales.

block_q3_K (110 bytes): hmask[32] (high bits), qs[64] (low 2 bits), scales[12], d (f16).
Ports quantize_row_q3_K_ref, quantize_row_q3_K_impl and dequantize_row_q3_K.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, get_f16, nearest_int, put_f16, round_nearest, signed_absmax
from .layout import QK_K, dequantize_blocks, pack_2bit, q3_scale, quantize_blocks, set_levels_blocks
from .search import imatrix_sigma2, imatrix_weights, make_q3_quants, make_qx_quants, workspace

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
    _pack_levels(L, y)


@njit(cache=True, error_model="numpy", inline="always")
def _pack_levels(L, y):
    """Levels 0..7 (value + 4) into hmask and qs; L keeps only its low two bits after."""
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
    for j in range(QK_K // 16):
        scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], True)
    max_scale = signed_absmax(QK_K // 16, scales)[0]
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
    sigma2 = imatrix_sigma2(x, F32(2.0))
    for j in range(QK_K // 16):
        xs = x[16 * j:16 * j + 16]
        sw[j] = imatrix_weights(16, qw[16 * j:16 * j + 16], xs, sigma2, weight)
        scales[j] = make_qx_quants(16, 4, xs, L[16 * j:16 * j + 16], weight, True, ws)
    for j in range(12):
        y[_SCALES + j] = 0
    d_block = make_qx_quants(QK_K // 16, 32, scales, Ls, sw, True, ws)
    for j in range(QK_K // 16):
        _pack_scale(y, j, np.int64(Ls[j]))
    put_f16(y, _D, d_block)
    _finish(x, y, L)


@njit(cache=True, error_model="numpy", inline="always")
def _scratch():
    """L, scales, weight, sw, Ls and the search workspace."""
    return (np.empty(QK_K, np.int8), np.empty(16, np.float32), np.empty(16, np.float32),
            np.empty(16, np.float32), np.empty(16, np.int8), workspace())


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x, qw, use_qw, y, s, fell_back):
    L, scales, weight, sw, Ls, ws = s
    if use_qw:
        quantize_block_imatrix(x, qw, y, L, scales, weight, sw, Ls, ws)
    else:
        quantize_block(x, y, L, scales)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows(x, qw, use_qw, out):
    quantize_blocks(x, qw, use_qw, out, BLOCK_BYTES, _scratch, _quantize_block, None)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows_ref(x, out):
    """quantize_rows without an imatrix: the constant use_qw prunes the imatrix fit, so a job
    without one never compiles it (kquant.codecs.BlockCodec picks this kernel)."""
    quantize_blocks(x, np.empty(0, np.float32), False, out, BLOCK_BYTES, _scratch, _quantize_block, None)


@njit(cache=True, error_model="numpy", inline="always")
def _dequantize_block(b, y, qk):
    d_all = get_f16(b, _D)
    for j in range(QK_K // 16):
        dl = d_all * F32(q3_scale(b, _SCALES, j))
        for ii in range(16):
            p = 16 * j + ii
            low = (b[_QS + (p // 128) * 32 + p % 32] >> (2 * ((p % 128) // 32))) & 3
            high = (b[_HMASK + p % 32] >> (p // 32)) & 1
            y[p] = dl * F32(np.int64(low) - (0 if high else 4))


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_rows(q, out):
    dequantize_blocks(q, out, BLOCK_BYTES, _dequantize_block)


@njit(cache=True, error_model="numpy", nogil=True)
def set_levels_rows(data, levels):
    """Stored levels (rows, 256) into one block a row, its scales kept: 0..7, value d*(scale-32)*(L-4)."""
    set_levels_blocks(data, levels, _pack_levels)
