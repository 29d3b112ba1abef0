"""Q4_K: 256-value super-blocks of 8 sub-blocks of 32, 4-bit levels, 6-bit scales and mins.

block_q4_K (144 bytes): d (f16), dmin (f16), scales[12], qs[128].
Also holds the scale/min search that Q5_K shares (it differs only in nmax and packing).
Ports quantize_row_q4_K_ref, quantize_row_q4_K_impl and dequantize_row_q4_K.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, get_f16, nearest_int, put_f16
from .layout import (QK_K, dequantize_blocks, get_scale_min_k4,
                     pack_scale_min_k4, quantize_blocks, set_levels_blocks)
from .search import (FELL_BACK, imatrix_sigma2, imatrix_weights, make_qkx_quants, make_qp_quants,
                     max_scale_min, qkx_scratch)

BLOCK_BYTES = 144
_D, _DMIN, _SCALES, _QS = 0, 2, 4, 16
_ZERO = F32(0.0)
_S63 = F32(63.0)


@njit(cache=True, error_model="numpy")
def scales_mins_ref(x, y, L, weights, scales, mins, nmax, rmin, rdelta, nstep, ws, quick=None):
    """The reference (no imatrix) sub-block fit of Q4_K/Q5_K, then levels re-fit to the
    stored 6-bit scales. Fills y's d, dmin and scales, and L."""
    for j in range(QK_K // 32):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = _ZERO
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / F32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scales[j], mins[j] = make_qkx_quants(32, nmax, xs, weights, L[32 * j:32 * j + 32],
                                             rmin, rdelta, np.int64(nstep), False, ws, quick)
    max_scale, max_min = max_scale_min(QK_K // 32, scales, mins)
    inv_scale = _S63 / max_scale if max_scale > _ZERO else _ZERO
    inv_min = _S63 / max_min if max_min > _ZERO else _ZERO
    for j in range(QK_K // 32):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # C: uint8_t, then MIN(63, .)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        pack_scale_min_k4(y, _SCALES, j, ls, lm)
    put_f16(y, _D, max_scale / _S63)
    put_f16(y, _DMIN, max_min / _S63)
    requantize(x, y, L, nmax)


@njit(cache=True, error_model="numpy")
def scales_mins_imatrix(x, qw, y, L, weights, scales, mins, sw, Ls, Lm, nmax, clamp63, ws, quick=None):
    """The imatrix sub-block fit of Q4_K/Q5_K (make_qkx3 + make_qp for the 6-bit scales).

    `clamp63`: Q5_K's C clamps the levels to 63 before packing, Q4_K's does not; they differ
    only when make_qp_quants wrapped a negative level into its uint8 array."""
    sigma2 = imatrix_sigma2(x, F32(2.0))
    for j in range(QK_K // 32):
        xs = x[32 * j:32 * j + 32]
        sw[j] = imatrix_weights(32, qw[32 * j:32 * j + 32], xs, sigma2, weights)
        # nstep as a plain int64, not the literal 36 (or 20 above): one compiled search
        # serves both fits (a literal would compile it twice, 2.5 s on a first run)
        scales[j], mins[j] = make_qkx_quants(32, nmax, xs, weights, L[32 * j:32 * j + 32],
                                             F32(-0.9), F32(0.05), np.int64(36), False, ws, quick)
    d_block = make_qp_quants(QK_K // 32, 63, scales, Ls, sw, ws, quick)
    m_block = make_qp_quants(QK_K // 32, 63, mins, Lm, sw, ws, quick)
    for j in range(QK_K // 32):
        ls = np.int64(Ls[j])
        lm = np.int64(Lm[j])
        if clamp63:
            ls = min(63, ls)
            lm = min(63, lm)
        pack_scale_min_k4(y, _SCALES, j, ls, lm)
    put_f16(y, _D, d_block)
    put_f16(y, _DMIN, m_block)
    requantize(x, y, L, nmax)


@njit(cache=True, error_model="numpy", inline="always")
def requantize(x, y, L, nmax):
    d_all = get_f16(y, _D)
    m_all = get_f16(y, _DMIN)
    for j in range(QK_K // 32):
        sc, m = get_scale_min_k4(j, y, _SCALES)
        d = d_all * F32(sc)
        if d == _ZERO:
            continue
        dm = m_all * F32(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(cache=True, error_model="numpy", inline="always")
def _pack(L, y):
    for j in range(0, QK_K, 64):
        for l in range(32):
            y[_QS + j // 2 + l] = L[j + l] | (L[j + l + 32] << 4)


@njit(cache=True, error_model="numpy", inline="always")
def scratch():
    """Q4_K/Q5_K's per-row buffers (8 sub-blocks of 32)."""
    return qkx_scratch(32, 8)


@njit(cache=True, error_model="numpy", inline="always")
def scales_mins(x, qw, use_qw, y, s, nmax, clamp63, rmin, rdelta, nstep, quick, fell_back):
    """Q4_K/Q5_K's fit of one block, imatrix or reference (its search steps rmin, rdelta,
    nstep): fills y's d, dmin and scales; returns the levels L, to pack. `quick` None: the
    searches with their literal fallback; 1 (a constant): without, fell_back[0] = 1 where the
    block needed it (search.py)."""
    L, weights, scales, mins, sw, Ls, Lm, ws = s
    if quick is None:
        if use_qw:
            scales_mins_imatrix(x, qw, y, L, weights, scales, mins, sw, Ls, Lm, nmax, clamp63, ws)
        else:
            scales_mins_ref(x, y, L, weights, scales, mins, nmax, rmin, rdelta, nstep, ws)
    else:
        ws[FELL_BACK] = _ZERO
        if use_qw:
            scales_mins_imatrix(x, qw, y, L, weights, scales, mins, sw, Ls, Lm, nmax, clamp63, ws, 1)
        else:
            scales_mins_ref(x, y, L, weights, scales, mins, nmax, rmin, rdelta, nstep, ws, 1)
        if ws[FELL_BACK] != _ZERO:
            fell_back[0] = 1
    return L


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x, qw, use_qw, y, s, fell_back):
    _pack(scales_mins(x, qw, use_qw, y, s, 15, False, F32(-1.0), F32(0.1), 20, None, fell_back), y)


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_quick_block(x, qw, use_qw, y, s, fell_back):
    _pack(scales_mins(x, qw, use_qw, y, s, 15, False, F32(-1.0), F32(0.1), 20, 1, fell_back), y)


# The row kernels (kquant.codecs.BlockCodec picks one): both fits, or the reference fit alone
# (the constant use_qw prunes the imatrix fit, so a job without an imatrix never compiles
# it); with the literal fallback of the searches, or quick (fell_back: see search.py).
@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows(x, qw, use_qw, out):
    quantize_blocks(x, qw, use_qw, out, BLOCK_BYTES, scratch, _quantize_block, None)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows_ref(x, out):
    quantize_blocks(x, np.empty(0, np.float32), False, out, BLOCK_BYTES, scratch, _quantize_block, None)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows_quick(x, qw, use_qw, out, fell_back):
    quantize_blocks(x, qw, use_qw, out, BLOCK_BYTES, scratch, _quantize_quick_block, fell_back)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows_ref_quick(x, out, fell_back):
    quantize_blocks(x, np.empty(0, np.float32), False, out, BLOCK_BYTES, scratch, _quantize_quick_block, fell_back)


@njit(cache=True, error_model="numpy", inline="always")
def dequantize_block_k4(b, y, qk, qs, qh):
    """dequantize_row_q4_K's block (qh < 0), or dequantize_row_q5_K's: its fifth bits at qh."""
    d = get_f16(b, _D)
    dmin = get_f16(b, _DMIN)
    sub = qk // 8  # 32 as a value LLVM cannot fold: see layout.dequantize_blocks
    for j in range(QK_K // 64):
        sc, m = get_scale_min_k4(2 * j, b, _SCALES)
        d1 = d * F32(sc)
        m1 = dmin * F32(m)
        sc, m = get_scale_min_k4(2 * j + 1, b, _SCALES)
        d2 = d * F32(sc)
        m2 = dmin * F32(m)
        u1 = 1 << (2 * j)
        u2 = 2 << (2 * j)
        for l in range(sub):
            qb = b[qs + 32 * j + l]
            h1 = 0
            h2 = 0
            if qh >= 0:
                h1 = 16 if b[qh + l] & u1 else 0
                h2 = 16 if b[qh + l] & u2 else 0
            y[64 * j + l] = d1 * F32((qb & 0xF) + h1) - m1
            y[64 * j + 32 + l] = d2 * F32((qb >> 4) + h2) - m2


@njit(cache=True, error_model="numpy", inline="always")
def _dequantize_block(b, y, qk):
    dequantize_block_k4(b, y, qk, _QS, -1)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_rows(q, out):
    dequantize_blocks(q, out, BLOCK_BYTES, _dequantize_block)


@njit(cache=True, error_model="numpy", nogil=True)
def set_levels_rows(data, levels):
    """Stored levels (rows, 256) into one block a row, its scales kept: 0..15, value d*scale*L - dmin*min."""
    set_levels_blocks(data, levels, _pack)
