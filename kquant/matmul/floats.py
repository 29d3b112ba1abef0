"""Dot products of the float weight types: F32 x F32, F16 x F16, BF16 x BF16 (ggml's
ggml_vec_dot_f32 / _f16 / _bf16: both operands widened to float32, multiplied and added in
float32; ggml keeps 4 x 8 float lanes).

These are plain loops that LLVM's loop vectorizer handles once it may reassociate the float
sum (`fastmath={"reassoc", "contract"}` on these kernels only: the order of the additions is
the one thing that changes, as it does between ggml's own SIMD widths). AVX2 check
(`python -m kquant.matmul.asm F32 F16 BF16`, this project's AMD EPYC): 8-lane vfmadd231ps on
ymm registers, 4 accumulators (32 values an iteration, as ggml's GGML_F32_STEP); F16 widens
with vcvtph2ps ymm, BF16 with vpmovzxwd + vpslld; no float64.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prims import F32, bits_f32, half_to_float

_ZERO = F32(0.0)
_FAST = {"reassoc", "contract"}


@njit(cache=True, error_model="numpy", inline="always")
def _f32(v):
    return v


@njit(cache=True, error_model="numpy", inline="always")
def _bf16(v):
    return bits_f32(np.uint32(v) << 16)


# w: the weights as (rows, k) float32 / uint16 (F16, BF16 bits); x: (n_tok, k) the same type;
# out: float32 (n_tok, rows). `widen` gives an element's float32 value.

@njit(cache=True, error_model="numpy", inline="always")
def _rows(w, x, out, widen):
    for r in prange(w.shape[0]):
        wr = w[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = _ZERO
            for j in range(wr.shape[0]):
                acc += widen(wr[j]) * widen(xt[j])
            out[t, r] = acc


@njit(cache=True, error_model="numpy", parallel=True, fastmath=_FAST)
def mm_f32(w, x, out):
    _rows(w, x, out, _f32)


@njit(cache=True, error_model="numpy", parallel=True, fastmath=_FAST)
def mm_f16(w, x, out):
    _rows(w, x, out, half_to_float)


@njit(cache=True, error_model="numpy", parallel=True, fastmath=_FAST)
def mm_bf16(w, x, out):
    _rows(w, x, out, _bf16)
