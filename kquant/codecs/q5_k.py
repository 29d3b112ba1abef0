"""Q5_K: Q4_K's scheme with 5-bit levels (the fifth bit in `qh`).

block_q5_K (176 bytes): d (f16), dmin (f16), scales[12], qh[32], qs[128].
The scale/min fits are Q4_K's (`q4_k.scales_mins_*`) with nmax 31 and Q5_K's search steps.
Ports quantize_row_q5_K_ref, quantize_row_q5_K_impl and dequantize_row_q5_K.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import F32, get_f16
from .layout import QK_K, get_scale_min_k4
from .q4_k import scales_mins_imatrix, scales_mins_ref
from .search import workspace

BLOCK_BYTES = 176
_D, _DMIN, _SCALES, _QH, _QS = 0, 2, 4, 16, 48


@njit(cache=True, error_model="numpy", inline="always")
def _pack(L, y):
    for j in range(32):
        y[_QH + j] = 0
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = np.int64(L[n + j])
            if l1 > 15:
                l1 -= 16
                y[_QH + j] |= m1
            l2 = np.int64(L[n + j + 32])
            if l2 > 15:
                l2 -= 16
                y[_QH + j] |= m2
            y[_QS + n // 2 + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2


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
                                    scales, mins, sw, Ls, Lm, 31, True, ws)
            else:
                scales_mins_ref(xb, yb, L, weights, scales, mins, 31,
                                F32(-0.5), F32(0.1), 15, ws)
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
                u1 = 1 << (2 * j)
                u2 = 2 << (2 * j)
                for l in range(sub):
                    qb = b[_QS + 32 * j + l]
                    qh = b[_QH + l]
                    y[64 * j + l] = d1 * F32((qb & 0xF) + (16 if qh & u1 else 0)) - m1
                    y[64 * j + 32 + l] = d2 * F32((qb >> 4) + (16 if qh & u2 else 0)) - m2
