"""Q8_K: the 8-bit activation format K-quant dot products use (llama.cpp never stores it).

block_q8_K (292 bytes): d (f32), qs[256] (int8), bsums[16] (int16 sums of 16 quants).
Ports quantize_row_q8_K_ref and dequantize_row_q8_K. No imatrix form exists.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import F32, get_f32, nearest_int, put_f32
from .layout import QK_K

BLOCK_BYTES = 292
_D, _QS, _BSUMS = 0, 4, 260
_ZERO = F32(0.0)


@njit(cache=True, error_model="numpy")
def quantize_block(x, y):
    max_ = _ZERO
    amax = _ZERO
    for j in range(QK_K):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            max_ = x[j]
    if amax == _ZERO:
        # The C leaves bsums untouched here; kquant writes zeros (what a zeroed buffer holds).
        for k in range(BLOCK_BYTES):
            y[k] = 0
        return
    iscale = F32(-127.0) / max_
    for j in range(QK_K):
        y[_QS + j] = min(127, nearest_int(iscale * x[j]))
    for j in range(QK_K // 16):
        s = 0
        for ii in range(16):
            s += np.int64(np.int8(y[_QS + 16 * j + ii]))
        y[_BSUMS + 2 * j] = s & 0xFF
        y[_BSUMS + 2 * j + 1] = (s >> 8) & 0xFF
    put_f32(y, _D, F32(1.0) / iscale)


@njit(cache=True, error_model="numpy", parallel=True)
def quantize_rows(x, qw, use_qw, out):
    nrows, n = x.shape
    for r in prange(nrows):
        for i in range(n // QK_K):
            quantize_block(x[r, i * QK_K:(i + 1) * QK_K], out[r, i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES])


@njit(cache=True, error_model="numpy", parallel=True)
def dequantize_rows(q, out):
    nrows, n = out.shape
    for r in prange(nrows):
        for i in range(n // QK_K):
            b = q[r, i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]
            d = get_f32(b, _D)
            for j in range(QK_K):
                out[r, i * QK_K + j] = d * F32(np.int8(b[_QS + j]))
