"""Scalar primitives every codec shares, written to give ggml's results bit for bit.

Numba has no float16 type and no scalar bit-cast, so the conversions here follow ggml-impl.h
(`ggml_compute_fp32_to_fp16` and friends) on raw bits, through two tiny LLVM intrinsics.
All arithmetic stays float32: a Python float literal would promote to float64, so constants
are `np.float32` globals (Numba freezes them as float32 constants).
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32, as uint32 (C's memcpy/union pun)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose IEEE bits are the low 32 bits of an integer."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


_MAGIC_ROUND = F32(12582912.0)  # 1.5 * 2**23


@njit(cache=True, error_model="numpy", inline="always")
def nearest_int(fval):
    """ggml's nearest_int: round half to even via the 1.5*2^23 trick (valid for |fval| < 2^22)."""
    val = F32(fval) + _MAGIC_ROUND
    return np.int64(f32_bits(val) & 0x007FFFFF) - 0x00400000


@njit(cache=True, error_model="numpy", inline="always")
def round_nearest(fval):
    """nearest_int(fval) as a float32: the same rounding, kept in float lanes.

    Vector loops want this form: AVX2 has no packed int64 <-> float conversion, so the integer
    version stops LLVM from vectorizing. Adding then subtracting 1.5*2^23 is exact (no
    fast-math, so LLVM does not fold it away).
    """
    return (F32(fval) + _MAGIC_ROUND) - _MAGIC_ROUND


_SCALE_TO_INF = F32(2.0 ** 112)
_SCALE_TO_ZERO = F32(2.0 ** -110)


@njit(cache=True, error_model="numpy", inline="always")
def fp32_to_fp16_soft(f):
    """ggml_compute_fp32_to_fp16: round to nearest even, NaN -> 0x7E00 with the sign kept."""
    f = F32(f)
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = np.int64(f32_bits(f))
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32((bias >> 1) + 0x07800000) + base
    bits = np.int64(f32_bits(base))
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return np.uint16((sign >> 16) | nonsign)


@intrinsic
def _fptrunc_f16(typingctx, x):
    """IEEE float32 -> float16 bits, round to nearest even (one vcvtps2ph with F16C)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(cache=True, error_model="numpy", inline="always")
def fp32_to_fp16_f16c(f):
    """The same bits as fp32_to_fp16_soft: the hardware rounds every non-NaN value alike
    (checked on all special values and 4M random ones), NaN gets ggml's 0x7E00."""
    f = F32(f)
    if f != f:
        return np.uint16(((f32_bits(f) >> 16) & 0x8000) | 0x7E00)
    return _fptrunc_f16(f)


# Without F16C, LLVM would lower fptrunc to a runtime-library call Numba may not link.
HAS_F16C = "+f16c" in llvm_binding.get_host_cpu_features().flatten().split(",")
fp32_to_fp16 = fp32_to_fp16_f16c if HAS_F16C else fp32_to_fp16_soft


_EXP_SCALE = F32(2.0 ** -112)
_MAGIC_BIAS = F32(0.5)


@njit(cache=True, error_model="numpy", inline="always")
def fp16_to_fp32(h):
    """ggml_compute_fp16_to_fp32 (exact: every half is a float)."""
    w = np.int64(h) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    normalized = bits_f32((two_w >> 4) + (0xE0 << 23)) * _EXP_SCALE
    denormalized = bits_f32((two_w >> 17) | (126 << 23)) - _MAGIC_BIAS
    if two_w < (1 << 27):
        return bits_f32(sign | np.int64(f32_bits(denormalized)))
    return bits_f32(sign | np.int64(f32_bits(normalized)))


@njit(cache=True, error_model="numpy", inline="always")
def fp32_to_bf16(f):
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet."""
    u = np.int64(f32_bits(F32(f)))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16((u >> 16) | 64)
    return np.uint16(((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF)


@njit(cache=True, error_model="numpy", inline="always")
def bf16_to_fp32(h):
    return bits_f32(np.int64(h) << 16)


# Little-endian field access inside a block's bytes (`y` is a uint8 view of one block).

@njit(cache=True, error_model="numpy", inline="always")
def put_f16(y, pos, f):
    h = fp32_to_fp16(f)
    y[pos] = h & 0xFF
    y[pos + 1] = h >> 8


@njit(cache=True, error_model="numpy", inline="always")
def get_f16(y, pos):
    return fp16_to_fp32(np.uint16(y[pos]) | (np.uint16(y[pos + 1]) << 8))


@njit(cache=True, error_model="numpy", inline="always")
def put_f32(y, pos, f):
    u = f32_bits(F32(f))
    y[pos] = u & 0xFF
    y[pos + 1] = (u >> 8) & 0xFF
    y[pos + 2] = (u >> 16) & 0xFF
    y[pos + 3] = u >> 24


@njit(cache=True, error_model="numpy", inline="always")
def get_f32(y, pos):
    u = (np.int64(y[pos]) | (np.int64(y[pos + 1]) << 8)
         | (np.int64(y[pos + 2]) << 16) | (np.int64(y[pos + 3]) << 24))
    return bits_f32(u)


@njit(cache=True, error_model="numpy", inline="always")
def signed_absmax(n, x):
    """(x[i], |x[i]|) for the first i of largest |x[i]| among x[:n] (C's `if (ax > amax)`
    scan: a NaN is passed over); (0, 0) when all are zero or NaN."""
    max_ = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    return max_, amax
