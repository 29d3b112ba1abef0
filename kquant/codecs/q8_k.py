"""Q8_K: the 8-bit activation format K-quant dot products use (llama.cpp never stores it).

block_q8_K (292 bytes): d (f32), qs[256] (int8), bsums[16] (int16 sums of 16 quants).
Ports quantize_row_q8_K_ref and dequantize_row_q8_K. No imatrix form exists.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, get_f32, nearest_int, put_f32, signed_absmax
from .layout import QK_K, dequantize_blocks, quantize_blocks

BLOCK_BYTES = 292
_D, _QS, _BSUMS = 0, 4, 260
_ZERO = F32(0.0)


@njit(cache=True, error_model="numpy")
def quantize_block(x, y):
    max_, amax = signed_absmax(QK_K, x)
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


@njit(cache=True, error_model="numpy", inline="always")
def _no_scratch():
    return 0


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x, qw, use_qw, y, s, fell_back):
    quantize_block(x, y)  # no imatrix form, no scratch


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows(x, qw, use_qw, out):
    quantize_blocks(x, qw, use_qw, out, BLOCK_BYTES, _no_scratch, _quantize_block, None)


@njit(cache=True, error_model="numpy", inline="always")
def _dequantize_block(b, y, qk):
    d = get_f32(b, _D)
    for j in range(QK_K):
        y[j] = d * F32(np.int8(b[_QS + j]))


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_rows(q, out):
    dequantize_blocks(q, out, BLOCK_BYTES, _dequantize_block)
