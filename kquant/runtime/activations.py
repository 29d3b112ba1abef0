"""Activations rounded as llama.cpp's CPU backend rounds them before a quantized product.

ggml multiplies a weight row of type T by the activations converted to T's `vec_dot_type`
(ggml-cpu.c type_traits_cpu): Q8_K for the K-quants, Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for
Q4_1/Q5_1, F16 for F16 and BF16 for BF16 (F32 stays F32). The integer block dot it then takes is
exactly the float product of the dequantized weights and these rounded activations, so
`x_rounded @ dequantized(W).T` gives llama.cpp's result up to float32 summation order, at BLAS
speed. Q8_0 and Q8_1 give the same values (Q8_1 adds the block sums), so one kernel serves both.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from ..codecs.bits import fp16_to_fp32, fp32_to_fp16
from ..matmul.cpu import vec_dot_type

F32 = np.float32

@njit(parallel=True, cache=True)
def _round_q8_0(x, out):
    """quantize_row_q8_0 of ggml-cpu/arch/x86/quants.c (AVX2), then dequantized: per 32 values
    d = amax / 127 (stored as fp16), q = round-half-even(x * 127 / amax)."""
    rows, n = x.shape
    for r in prange(rows * (n // 32)):
        i, b = r // (n // 32), r % (n // 32)
        blk = x[i, b * 32:(b + 1) * 32]
        amax = F32(0.0)
        for j in range(32):
            amax = max(amax, abs(blk[j]))
        d = fp16_to_fp32(fp32_to_fp16(amax / F32(127.0)))
        inv = F32(127.0) / amax if amax != F32(0.0) else F32(0.0)
        for j in range(32):
            out[i, b * 32 + j] = d * np.rint(blk[j] * inv)


@njit(parallel=True, cache=True)
def _round_q8_k(x, out):
    """quantize_row_q8_K_ref (what x86 uses), then dequantized: per 256 values the value of
    largest magnitude m sets iscale = -127 / m, q = min(127, nearest(iscale * x)), d = 1 / iscale."""
    rows, n = x.shape
    for r in prange(rows * (n // 256)):
        i, b = r // (n // 256), r % (n // 256)
        blk = x[i, b * 256:(b + 1) * 256]
        amax = F32(0.0)
        mx = F32(0.0)
        for j in range(256):
            ax = abs(blk[j])
            if ax > amax:
                amax = ax
                mx = blk[j]
        if amax == F32(0.0):
            for j in range(256):
                out[i, b * 256 + j] = F32(0.0)
            continue
        iscale = F32(-127.0) / mx
        d = F32(1.0) / iscale
        for j in range(256):
            out[i, b * 256 + j] = d * min(F32(127.0), np.rint(iscale * blk[j]))


def _bf16_round(x: Any, xp: Any) -> Any:
    """ggml_compute_fp32_to_bf16: round to nearest even on the upper 16 bits (NaN kept quiet)."""
    u = x.view(xp.uint32)
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
    r = xp.where(xp.isnan(x), (u >> 16 | 64) << 16, r).astype(xp.uint32)
    return r.view(xp.float32)


def _round_blocks_xp(x: Any, xp: Any, qk: int, k_quant: bool) -> Any:
    """The same roundings as array expressions (the CuPy path)."""
    rows, n = x.shape
    b = x.reshape(rows, n // qk, qk)
    if k_quant:
        idx = xp.abs(b).argmax(axis=-1)[..., None]
        m = xp.take_along_axis(b, idx, axis=-1)
        safe = xp.where(m == 0, F32(1.0), m)
        iscale = F32(-127.0) / safe
        q = xp.minimum(F32(127.0), xp.rint(iscale * b))
        out = (F32(1.0) / iscale) * q
        out = xp.where(m == 0, F32(0.0), out)
    else:
        amax = xp.abs(b).max(axis=-1, keepdims=True)
        d = (amax / F32(127.0)).astype(xp.float16).astype(F32)
        inv = xp.where(amax != 0, F32(127.0) / xp.where(amax == 0, F32(1.0), amax), F32(0.0))
        out = d * xp.rint(b * inv)
    return out.reshape(rows, n).astype(F32)


def round_activations(x: Any, weight_type: T, xp: Any = np) -> Any:
    """x (rows, k) float32 as ggml rounds it for a product with a `weight_type` weight."""
    vt = vec_dot_type(weight_type)
    if vt == T.F32:
        return x
    if vt == T.F16:
        return x.astype(xp.float16).astype(F32)
    if vt == T.BF16:
        return _bf16_round(xp.ascontiguousarray(x, dtype=F32), xp)
    qk = 256 if vt == T.Q8_K else 32
    if x.shape[1] % qk:
        raise ValueError(f"rows of {x.shape[1]} values do not split into {vt.name} blocks of {qk}")
    if xp is not np:
        return _round_blocks_xp(x, xp, qk, vt == T.Q8_K)
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty_like(x)
    (_round_q8_k if vt == T.Q8_K else _round_q8_0)(x, out)
    return out


@njit(parallel=True, cache=True)
def _q8_1_sum_error(x, out):
    """Per 32 values: fp16(d * sum(q)) - fp16(d) * sum(q), the part of Q8_1's stored block sum s
    (quantize_row_q8_1, x86) that the dequantized values do not carry."""
    rows, n = x.shape
    nb = n // 32
    for r in prange(rows * nb):
        i, b = r // nb, r % nb
        blk = x[i, b * 32:(b + 1) * 32]
        amax = F32(0.0)
        for j in range(32):
            amax = max(amax, abs(blk[j]))
        d = amax / F32(127.0)
        inv = F32(127.0) / amax if amax != F32(0.0) else F32(0.0)
        total = 0
        for j in range(32):
            total += int(np.rint(blk[j] * inv))
        s = F32(total)
        out[i, b] = fp16_to_fp32(fp32_to_fp16(d * s)) - fp16_to_fp32(fp32_to_fp16(d)) * s


def min_term_correction(x: Any, weight_type: T, xp: Any = np) -> Any:
    """For Q4_1/Q5_1 weights, ggml adds each block's min times the activation block sum s that
    Q8_1 stores as fp16(d * sum(q)) (ggml_vec_dot_q4_1_q8_1: summs += m * s), not the sum of the
    rounded values. Returns the per-block differences (rows, k / 32); the caller adds
    differences @ mins.T to the product. None for other types."""
    if weight_type not in (T.Q4_1, T.Q5_1):
        return None
    if xp is not np:
        rows, n = x.shape
        b = x.reshape(rows, n // 32, 32)
        amax = xp.abs(b).max(axis=-1)
        d = amax / F32(127.0)
        inv = xp.where(amax != 0, F32(127.0) / xp.where(amax == 0, F32(1.0), amax), F32(0.0))
        s = xp.rint(b * inv[..., None]).sum(axis=-1).astype(F32)
        f16 = lambda v: v.astype(xp.float16).astype(F32)  # noqa: E731
        return f16(d * s) - f16(d) * s
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty((x.shape[0], x.shape[1] // 32), F32)
    _q8_1_sum_error(x, out)
    return out


def block_mins(raw: np.ndarray, weight_type: T, rows: int) -> np.ndarray:
    """The fp16 min `m` of every block of Q4_1/Q5_1 weights, (rows, k / 32) float32: bytes 2-3
    of each 20-byte (Q4_1) or 24-byte (Q5_1) block."""
    size = 20 if weight_type == T.Q4_1 else 24
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1, size)
    return np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0].astype(F32)
