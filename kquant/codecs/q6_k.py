"""Q6_K: 256-value super-blocks of 16 sub-blocks, 6-bit symmetric levels, int8 scales.

block_q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (f16).
Ports quantize_row_q6_K_ref, quantize_row_q6_K_impl and dequantize_row_q6_K.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, get_f16, nearest_int, put_f16, signed_absmax
from .layout import QK_K, dequantize_blocks, quantize_blocks, set_levels_blocks
from .search import GROUP_MAX_EPS, make_qx_quants, workspace

BLOCK_BYTES = 210
_QL, _QH, _SCALES, _D = 0, 128, 192, 208
_ZERO = F32(0.0)


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, use_qw, y, s, fell_back):
    """Both C paths in one: the imatrix path passes the raw importance as make_qx_quants'
    weights, the reference path weights by x^2 (rmse_type 1 with no weights)."""
    L, scales, ws = s
    for ib in range(QK_K // 16):
        scales[ib] = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16],
                                    qw[16 * ib:16 * ib + 16], use_qw, ws)
    max_scale, max_abs_scale = signed_absmax(QK_K // 16, scales)
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(BLOCK_BYTES):
            y[k] = 0
        return
    iscale = F32(-128.0) / max_scale
    put_f16(y, _D, F32(1.0) / iscale)
    for ib in range(QK_K // 16):
        y[_SCALES + ib] = min(127, nearest_int(iscale * scales[ib]))
    d_all = get_f16(y, _D)
    for j in range(QK_K // 16):
        d = d_all * F32(np.int8(y[_SCALES + j]))
        if d == _ZERO:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    _pack_levels(L, y)


@njit(cache=True, error_model="numpy", inline="always")
def _pack_levels(L, y):
    """Levels 0..63 (value + 32): low nibbles into ql, high two bits into qh."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            y[_QL + j // 2 + l] = q1 | (q3 << 4)
            y[_QL + j // 2 + l + 32] = q2 | (q4 << 4)
            y[_QH + j // 4 + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                                   | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6))


@njit(cache=True, error_model="numpy", inline="always")
def _scratch():
    """L, scales and the search workspace."""
    return np.empty(QK_K, np.int8), np.empty(16, np.float32), workspace()


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows(x, qw, use_qw, out):
    quantize_blocks(x, qw, use_qw, out, BLOCK_BYTES, _scratch, quantize_block, None)


@njit(cache=True, error_model="numpy", inline="always")
def _dequantize_block(b, y, qk):
    d = get_f16(b, _D)
    for h in range(2):
        ql = _QL + 64 * h
        qh = _QH + 32 * h
        sc = _SCALES + 8 * h
        for l in range(32):
            is_ = l // 16
            hb = b[qh + l]
            q1 = np.int64((b[ql + l] & 0xF) | (((hb >> 0) & 3) << 4)) - 32
            q2 = np.int64((b[ql + l + 32] & 0xF) | (((hb >> 2) & 3) << 4)) - 32
            q3 = np.int64((b[ql + l] >> 4) | (((hb >> 4) & 3) << 4)) - 32
            q4 = np.int64((b[ql + l + 32] >> 4) | (((hb >> 6) & 3) << 4)) - 32
            y[128 * h + l] = d * F32(np.int8(b[sc + is_])) * F32(q1)
            y[128 * h + l + 32] = d * F32(np.int8(b[sc + is_ + 2])) * F32(q2)
            y[128 * h + l + 64] = d * F32(np.int8(b[sc + is_ + 4])) * F32(q3)
            y[128 * h + l + 96] = d * F32(np.int8(b[sc + is_ + 6])) * F32(q4)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_rows(q, out):
    dequantize_blocks(q, out, BLOCK_BYTES, _dequantize_block)


@njit(cache=True, error_model="numpy", nogil=True)
def set_levels_rows(data, levels):
    """Stored levels (rows, 256) into one block a row, its scales kept: 0..63, value d*scale*(L-32)."""
    set_levels_blocks(data, levels, _pack_levels)
