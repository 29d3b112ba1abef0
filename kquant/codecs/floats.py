"""The unquantized storage types: F32 (a copy), F16 and BF16 (ggml's round-to-nearest-even).

F16 follows ggml_fp32_to_fp16_row, BF16 ggml_fp32_to_bf16_row_ref (what ggml_quantize_chunk
calls); both agree with numpy on finite values and differ from it on NaN payloads.
"""
from __future__ import annotations

from numba import njit

from .bits import bf16_to_fp32, fp16_to_fp32, fp32_to_bf16, fp32_to_fp16

F16, BF16 = 0, 1


@njit(cache=True, error_model="numpy", inline="always")
def _convert_rows(kind, src, out, to_f16, to_bf16):
    """out[r, j] = to_f16(src[r, j]) (kind F16) or to_bf16(src[r, j]), rows in order (threads.py runs slices of them side by side)."""
    nrows, n = out.shape
    for r in range(nrows):
        if kind == F16:
            for j in range(n):
                out[r, j] = to_f16(src[r, j])
        else:
            for j in range(n):
                out[r, j] = to_bf16(src[r, j])


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_rows(kind, x, out):
    """out: uint16 (nrows, n_per_row)."""
    _convert_rows(kind, x, out, fp32_to_fp16, fp32_to_bf16)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_rows(kind, h, out):
    _convert_rows(kind, h, out, fp16_to_fp32, bf16_to_fp32)
