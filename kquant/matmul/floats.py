"""Dot products of the float weight types: F32 x F32, F16 x F16, BF16 x BF16, bit for bit
ggml's AVX2 ggml_vec_dot_f32 / _f16 / _bf16 (ggml-cpu/vec.cpp, simd-mappings.h, as gcc
compiles them: checked against libggml-cpu's disassembly).

All three: both operands widened to float32 (vcvtph2ps for F16, a 16-bit shift for BF16),
4 accumulators of 8 float lanes over 32 values a step (GGML_F32_STEP), each a fused
multiply-add (F32, F16: _mm256_fmadd_ps; BF16: ggml writes mul + add, gcc fuses them), the 4
added as (s0 + s2) + (s1 + s3), then the 8 lanes summed. What differs is the lane sum and
the n % 32 leftovers:
- F32: GGML_F32x8_REDUCE, t = lo4 + hi4, (t0 + t1) + (t2 + t3) (two vhaddps), in float; the
  leftovers added one by one in float, the first (n % 32) & ~3 as a rounded product then an
  add (gcc vectorises that part of the loop: vmulps, then vaddss lane by lane), the last
  n % 4 fused (vfmadd231ss);
- F16: the same reduction, then in double: each leftover's float product (exact) added;
- BF16: hsum_float_8's order, t = lo4 + hi4, (t0 + t2) + (t1 + t3), then in double,
  0.0 + that, and each leftover's float product added.
The result is rounded to float32 at the end. The loops are written with
kquant.matmul.simd's float lanes (8-lane vfmadd231ps on ymm registers, 4 accumulators, as
ggml; `python -m kquant.matmul.asm F32 F16 BF16`).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prims import F32, bits_f32, fma32, half_to_float
from .simd import addf, fmaf8, hsum_hadd, hsumf, loadbf, loadf, loadh, zerof

_ZERO = F32(0.0)


@njit(cache=True, error_model="numpy", inline="always")
def _steps(wr, xt, load):
    """The 32-value steps: 4 accumulators of 8 lanes, fused multiply-adds; returns
    (s0 + s2) + (s1 + s3) and the number of values done."""
    n = wr.shape[0]
    np_ = n - n % 32
    s0 = zerof()
    s1 = zerof()
    s2 = zerof()
    s3 = zerof()
    for i in range(0, np_, 32):
        s0 = fmaf8(load(wr, i), load(xt, i), s0)
        s1 = fmaf8(load(wr, i + 8), load(xt, i + 8), s1)
        s2 = fmaf8(load(wr, i + 16), load(xt, i + 16), s2)
        s3 = fmaf8(load(wr, i + 24), load(xt, i + 24), s3)
    return addf(addf(s0, s2), addf(s1, s3)), np_


@njit(cache=True, error_model="numpy", inline="always")
def _load_f32(a, i):
    return loadf(a, i)


@njit(cache=True, error_model="numpy", inline="always")
def _load_f16(a, i):
    return loadh(a, i)


@njit(cache=True, error_model="numpy", inline="always")
def _load_bf16(a, i):
    return loadbf(a, i)


@njit(cache=True, error_model="numpy", inline="always")
def _bf16(v):
    return bits_f32(np.uint32(v) << 16)


@njit(cache=True, error_model="numpy", inline="always")
def _row_f32(wr, xt):
    v, np_ = _steps(wr, xt, _load_f32)
    s = hsum_hadd(v)
    n = wr.shape[0]
    u = np_ + (n - np_) // 4 * 4
    for j in range(np_, u):
        s += wr[j] * xt[j]
    for j in range(u, n):
        s = fma32(wr[j], xt[j], s)
    return s


@njit(cache=True, error_model="numpy", inline="always")
def _row_f16(wr, xt):
    v, np_ = _steps(wr, xt, _load_f16)
    s = np.float64(hsum_hadd(v))
    for j in range(np_, wr.shape[0]):
        s += np.float64(half_to_float(wr[j]) * half_to_float(xt[j]))
    return F32(s)


@njit(cache=True, error_model="numpy", inline="always")
def _row_bf16(wr, xt):
    v, np_ = _steps(wr, xt, _load_bf16)
    s = 0.0 + np.float64(hsumf(v))
    for j in range(np_, wr.shape[0]):
        s += np.float64(_bf16(wr[j]) * _bf16(xt[j]))
    return F32(s)


# w: the weights as (rows, k) float32 / uint16 (F16, BF16 bits); x: (n_tok, k) the same type;
# out: float32 (n_tok, rows).

@njit(cache=True, error_model="numpy", inline="always")
def _rows(w, x, out, row):
    for r in prange(w.shape[0]):
        wr = w[r]
        for t in range(x.shape[0]):
            out[t, r] = row(wr, x[t])


@njit(cache=True, error_model="numpy", parallel=True)
def mm_f32(w, x, out):
    _rows(w, x, out, _row_f32)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_f16(w, x, out):
    _rows(w, x, out, _row_f16)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_bf16(w, x, out):
    _rows(w, x, out, _row_bf16)
