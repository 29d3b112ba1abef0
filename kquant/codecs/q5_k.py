"""Q5_K: Q4_K's scheme with 5-bit levels (the fifth bit in `qh`).

block_q5_K (176 bytes): d (f16), dmin (f16), scales[12], qh[32], qs[128].
The scale/min fits are Q4_K's (`q4_k.scales_mins`) with nmax 31 and Q5_K's search steps.
Ports quantize_row_q5_K_ref, quantize_row_q5_K_impl and dequantize_row_q5_K.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32
from .layout import QK_K, dequantize_blocks, quantize_blocks, set_levels_blocks
from .q4_k import dequantize_block_k4, scales_mins, scratch

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


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x, qw, use_qw, y, s, fell_back):
    _pack(scales_mins(x, qw, use_qw, y, s, 31, True, F32(-0.5), F32(0.1), 15, None, fell_back), y)


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_quick_block(x, qw, use_qw, y, s, fell_back):
    _pack(scales_mins(x, qw, use_qw, y, s, 31, True, F32(-0.5), F32(0.1), 15, 1, fell_back), y)


# the row kernels, as Q4_K's (q4_k.py)
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
def _dequantize_block(b, y, qk):
    dequantize_block_k4(b, y, qk, _QS, _QH)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_rows(q, out):
    dequantize_blocks(q, out, BLOCK_BYTES, _dequantize_block)


@njit(cache=True, error_model="numpy", nogil=True)
def set_levels_rows(data, levels):
    """Stored levels (rows, 256) into one block a row, its scales kept: 0..31, value d*scale*L - dmin*min."""
    set_levels_blocks(data, levels, _pack)
