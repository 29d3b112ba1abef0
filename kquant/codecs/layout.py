"""Bit layouts shared by several K-quant blocks (ggml-common.h's block_q*_K), and the codecs'
row drivers."""
from __future__ import annotations

import numpy as np
from numba import njit

QK_K = 256


# The row drivers of the K-quant codecs: each codec's quantize_rows / dequantize_rows is one
# call with its block function (inlined here, so the block function is a direct call); the
# Codec runs slices of the rows on threads (threads.py). qw is a zero-length placeholder without an imatrix; slicing it
# stays empty.

@njit(cache=True, error_model="numpy", inline="always")
def quantize_blocks(x, qw, use_qw, out, block_bytes, scratch, quantize_block, fell_back):
    """Rows in order, each with its own `scratch()` (buffers and search workspace),
    its QK_K-value blocks in order: quantize_block(x, qw, use_qw, y, scratch, fell_back)
    (fell_back: None, or the quick kernels' flag, see search.py)."""
    nrows, n = x.shape
    for r in range(nrows):
        s = scratch()
        for i in range(n // QK_K):
            quantize_block(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K], use_qw,
                           out[r, i * block_bytes:(i + 1) * block_bytes], s, fell_back)


@njit(cache=True, error_model="numpy", inline="always")
def set_levels_blocks(data, levels, pack_levels):
    """Rows in order: one block each (data (rows, block bytes), levels (rows, QK_K) stored
    levels), pack_levels(L, y) writing the levels into the block and leaving its scales alone.
    For GPTQ (kquant.quantization.gptq), which keeps a block's scales and re-rounds its values."""
    for r in range(data.shape[0]):
        L = np.empty(QK_K, np.int32)
        for i in range(QK_K):
            L[i] = levels[r, i]
        pack_levels(L, data[r])


@njit(cache=True, error_model="numpy", inline="always")
def dequantize_blocks(q, out, block_bytes, dequantize_block):
    """Rows in order: dequantize_block(b, y, qk) for each block b and its QK_K values y.

    qk is QK_K as a value LLVM cannot fold (from the shapes): loops bounded by it vectorize
    where a constant bound does not (see legacy.dequantize_rows); most blocks ignore it."""
    nrows, n = out.shape
    qk = n // (q.shape[1] // block_bytes) if q.shape[1] else QK_K
    for r in range(nrows):
        for i in range(n // QK_K):
            dequantize_block(q[r, i * block_bytes:(i + 1) * block_bytes],
                             out[r, i * QK_K:(i + 1) * QK_K], qk)


@njit(cache=True, error_model="numpy", inline="always")
def pack_2bit(L, qs, off):
    """Four 2-bit levels a byte, in 128-value halves: Q2_K and Q3_K's `qs`."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            qs[off + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2)
                                    | (L[j + l + 64] << 4) | (L[j + l + 96] << 6))


@njit(cache=True, error_model="numpy", inline="always")
def pack_scale_min_k4(y, off, j, ls, lm):
    """Store 6-bit scale `ls` and min `lm` of sub-block j (Q4_K/Q5_K's 12-byte `scales`)."""
    if j < 4:
        y[off + j] = ls
        y[off + j + 4] = lm
    else:
        y[off + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        y[off + j - 4] |= (ls >> 4) << 6
        y[off + j] |= (lm >> 4) << 6


@njit(cache=True, error_model="numpy", inline="always")
def get_scale_min_k4(j, q, off):
    """ggml's get_scale_min_k4: (scale, min) of sub-block j."""
    if j < 4:
        return np.int64(q[off + j]) & 63, np.int64(q[off + j + 4]) & 63
    d = (np.int64(q[off + j + 4]) & 0xF) | ((np.int64(q[off + j - 4]) >> 6) << 4)
    m = (np.int64(q[off + j + 4]) >> 4) | ((np.int64(q[off + j]) >> 6) << 4)
    return d, m


@njit(cache=True, error_model="numpy", inline="always")
def q3_scale(scales, off, j):
    """Signed 6-bit scale of Q3_K sub-block j, from its 12 packed bytes."""
    lo = np.int64(scales[off + j]) & 0xF if j < 8 else np.int64(scales[off + j - 8]) >> 4
    hi = (np.int64(scales[off + 8 + j % 4]) >> (2 * (j // 4))) & 3
    return (lo | (hi << 4)) - 32
