"""Q4_K: 256-value super-blocks of 8 sub-blocks of 32, 4-bit levels, 6-bit scales and mins.

block_q4_K (144 bytes): d (f16), dmin (f16), scales[12], qs[128].
Also holds the scale/min search that Q5_K shares (it differs only in nmax and packing).
Ports quantize_row_q4_K_ref, quantize_row_q4_K_impl and dequantize_row_q4_K.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import F32, get_f16, nearest_int, put_f16
from .layout import QK_K, get_scale_min_k4, pack_scale_min_k4
from .search import make_qkx_quants, make_qp_quants, workspace

BLOCK_BYTES = 144
_D, _DMIN, _SCALES, _QS = 0, 2, 4, 16
_ZERO = F32(0.0)
_S63 = F32(63.0)


@njit(cache=True, error_model="numpy")
def scales_mins_ref(x, y, L, weights, scales, mins, nmax, rmin, rdelta, nstep, ws):
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
                                             rmin, rdelta, nstep, False, ws)
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(QK_K // 32):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
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
def scales_mins_imatrix(x, qw, y, L, weights, scales, mins, sw, Ls, Lm, nmax, clamp63, ws):
    """The imatrix sub-block fit of Q4_K/Q5_K (make_qkx3 + make_qp for the 6-bit scales).

    `clamp63`: Q5_K's C clamps the levels to 63 before packing, Q4_K's does not; they differ
    only when make_qp_quants wrapped a negative level into its uint8 array."""
    sum_x2 = _ZERO
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    sigma2 = F32(2.0) * sum_x2 / F32(QK_K)
    for j in range(QK_K // 32):
        xs = x[32 * j:32 * j + 32]
        for l in range(32):
            weights[l] = qw[32 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l])
        sumw = _ZERO
        for l in range(32):
            sumw += weights[l]
        sw[j] = sumw
        scales[j], mins[j] = make_qkx_quants(32, nmax, xs, weights, L[32 * j:32 * j + 32],
                                             F32(-0.9), F32(0.05), 36, False, ws)
    d_block = make_qp_quants(QK_K // 32, 63, scales, Ls, sw, ws)
    m_block = make_qp_quants(QK_K // 32, 63, mins, Lm, sw, ws)
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


@njit(cache=True, error_model="numpy", parallel=True)
def quantize_rows(x, qw, use_qw, out):
    nrows, n = x.shape
    for r in prange(nrows):
        L = np.empty(QK_K, np.uint8)
        ws = workspace()
        weights = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        sw = np.empty(8, np.float32)
        Ls = np.empty(8, np.uint8)
        Lm = np.empty(8, np.uint8)
        for i in range(n // QK_K):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            yb = out[r, i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]
            if use_qw:
                scales_mins_imatrix(xb, qw[i * QK_K:(i + 1) * QK_K], yb, L, weights,
                                    scales, mins, sw, Ls, Lm, 15, False, ws)
            else:
                scales_mins_ref(xb, yb, L, weights, scales, mins, 15,
                                F32(-1.0), F32(0.1), 20, ws)
            _pack(L, yb)


@njit(cache=True, error_model="numpy", parallel=True)
def dequantize_rows(q, out):
    nrows, n = out.shape
    # 32 as a value LLVM cannot fold: see legacy.dequantize_rows (vectorizes the l loops)
    sub = n // (q.shape[1] // BLOCK_BYTES) // 8 if q.shape[1] else 32
    for r in prange(nrows):
        for i in range(n // QK_K):
            b = q[r, i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]
            y = out[r, i * QK_K:(i + 1) * QK_K]
            d = get_f16(b, _D)
            dmin = get_f16(b, _DMIN)
            for j in range(QK_K // 64):
                sc, m = get_scale_min_k4(2 * j, b, _SCALES)
                d1 = d * F32(sc)
                m1 = dmin * F32(m)
                sc, m = get_scale_min_k4(2 * j + 1, b, _SCALES)
                d2 = d * F32(sc)
                m2 = dmin * F32(m)
                for l in range(sub):
                    qb = b[_QS + 32 * j + l]
                    y[64 * j + l] = d1 * F32(qb & 0xF) - m1
                    y[64 * j + 32 + l] = d2 * F32(qb >> 4) - m2
