"""Q2_K: 256-value super-blocks of 16 sub-blocks, 2-bit levels, 4-bit scales and mins.

block_q2_K (84 bytes): scales[16] (scale | min << 4), qs[64], d (f16), dmin (f16).
Ports quantize_row_q2_K_ref (no imatrix), quantize_row_q2_K_impl (imatrix) and
dequantize_row_q2_K from ggml-quants.c.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, get_f16, nearest_int, put_f16
from .layout import QK_K, dequantize_blocks, pack_2bit, quantize_blocks, set_levels_blocks
from .search import (imatrix_sigma2, imatrix_weights, make_qkx_quants, make_qp_quants,
                     max_scale_min, qkx_scratch)

BLOCK_BYTES = 84
_SCALES, _QS, _D, _DMIN = 0, 16, 80, 82
_Q4SCALE = F32(15.0)
_ZERO = F32(0.0)


@njit(cache=True, error_model="numpy", inline="always")
def _requantize(x, y, L):
    """Levels again against the stored (rounded) scales and mins, as the C does last."""
    d_all = get_f16(y, _D)
    m_all = get_f16(y, _DMIN)
    for j in range(QK_K // 16):
        sc = y[_SCALES + j]
        d = d_all * F32(sc & 0xF)
        if d == _ZERO:
            continue
        dm = m_all * F32(sc >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + dm) / d)
            L[16 * j + ii] = max(0, min(3, l))


@njit(cache=True, error_model="numpy")
def quantize_block(x, y, L, weights, scales, mins, ws):
    for j in range(QK_K // 16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            weights[l] = abs(xs[l])
        scales[j], mins[j] = make_qkx_quants(16, 3, xs, weights, L[16 * j:16 * j + 16],
                                             F32(-0.5), F32(0.1), 15, True, ws)
    max_scale, max_min = max_scale_min(QK_K // 16, scales, mins)
    if max_scale > _ZERO:
        iscale = _Q4SCALE / max_scale
        for j in range(QK_K // 16):
            y[_SCALES + j] = nearest_int(iscale * scales[j])
        put_f16(y, _D, max_scale / _Q4SCALE)
    else:
        for j in range(QK_K // 16):
            y[_SCALES + j] = 0
        put_f16(y, _D, _ZERO)
    if max_min > _ZERO:
        iscale = _Q4SCALE / max_min
        for j in range(QK_K // 16):
            y[_SCALES + j] |= nearest_int(iscale * mins[j]) << 4
        put_f16(y, _DMIN, max_min / _Q4SCALE)
    else:
        put_f16(y, _DMIN, _ZERO)
    _requantize(x, y, L)
    pack_2bit(L, y, _QS)


@njit(cache=True, error_model="numpy")
def quantize_block_imatrix(x, qw, y, L, weights, scales, mins, sw, Ls, Lm, ws):
    sigma2 = imatrix_sigma2(x, F32(1.0))  # 1 * sum is the sum: C has no factor here
    for j in range(QK_K // 16):
        xs = x[16 * j:16 * j + 16]
        sw[j] = imatrix_weights(16, qw[16 * j:16 * j + 16], xs, sigma2, weights)
        scales[j], mins[j] = make_qkx_quants(16, 3, xs, weights, L[16 * j:16 * j + 16],
                                             F32(-0.9), F32(0.05), 36, False, ws)
    dm = make_qp_quants(QK_K // 16, 15, scales, Ls, sw, ws)
    mm = make_qp_quants(QK_K // 16, 15, mins, Lm, sw, ws)
    put_f16(y, _D, dm)
    put_f16(y, _DMIN, mm)
    for j in range(QK_K // 16):
        y[_SCALES + j] = Ls[j] | (Lm[j] << 4)
    _requantize(x, y, L)
    pack_2bit(L, y, _QS)


@njit(cache=True, error_model="numpy", inline="always")
def _scratch():
    return qkx_scratch(16, 16)


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x, qw, use_qw, y, s, fell_back):
    L, weights, scales, mins, sw, Ls, Lm, ws = s
    if use_qw:
        quantize_block_imatrix(x, qw, y, L, weights, scales, mins, sw, Ls, Lm, ws)
    else:
        quantize_block(x, y, L, weights, scales, mins, ws)


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
    d = get_f16(b, _D)
    dmin = get_f16(b, _DMIN)
    # C's order: two 128-value halves, each four 2-bit planes of 32 bytes, each plane
    # two sub-blocks of 16 with their own scale and min
    for h in range(2):
        for shift in range(4):
            for g in range(2):
                sc = b[_SCALES + 8 * h + 2 * shift + g]
                dl = d * F32(sc & 0xF)
                ml = dmin * F32(sc >> 4)
                base = 128 * h + 32 * shift + 16 * g
                qb = _QS + 32 * h + 16 * g
                for l in range(16):
                    y[base + l] = dl * F32((b[qb + l] >> (2 * shift)) & 3) - ml


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_rows(q, out):
    dequantize_blocks(q, out, BLOCK_BYTES, _dequantize_block)


@njit(cache=True, error_model="numpy", inline="always")
def _pack_levels(L, y):
    pack_2bit(L, y, _QS)


@njit(cache=True, error_model="numpy", nogil=True)
def set_levels_rows(data, levels):
    """Stored levels (rows, 256) into one block a row, its scales kept: 0..3, value d*scale*L - dmin*min."""
    set_levels_blocks(data, levels, _pack_levels)
