"""Scalar helpers the dot-product kernels share: fp16 scales, little-endian words.

Two things learned writing scalar Numba loops for LLVM to vectorise (kept here for the scalar
parts that remain): Numba types `int32 * int32` (and `+`) as int64, and an int64 accumulator
stops LLVM from using the 16/32-bit AVX2 integer instructions (it falls back to vpmuldq /
vpaddq on 4 lanes), so integer products and sums are wrapped in `I32(...)`, which lets LLVM
narrow the chain (e.g. vpmovsxbw + vpmaddwd for an int8 dot product); and scalar fp16
conversions need care (f16_to_f32 below).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..codecs.bits import HAS_F16C, bits_f32

F32 = np.float32
I32 = np.int32

_P112 = F32(2.0 ** 112)


@njit(cache=True, error_model="numpy", inline="always")
def f16_to_f32(h):
    """An fp16 value's float32 (exact, like ggml's GGML_CPU_FP16_TO_FP32), without branches.

    The half's exponent and mantissa are moved into a float32's bits and multiplied by 2^112,
    which rebiases the exponent and renormalises half subnormals; exponent 31 (Inf, NaN)
    gets 224 added so it lands on 255, which the multiply keeps. Not `fpext half`: LLVM
    lowers a scalar fpext to `vpinsrw $0, mem, %xmmN` + `vcvtph2ps`, inserting into whatever
    register was free, in the Q8_0 kernel the float accumulator; that false dependency chained
    every block to the previous one's sum (6.6 instead of 10.4 GB/s). `vmovd` from a general
    register starts a fresh chain. No branch either: one here kept LLVM's SLP vectorizer off
    the whole block loop (2.7 instead of 11 GB/s).
    """
    h = np.uint32(h)
    inf_nan = (((h & 0x7C00) + 0x0400) >> 15) * np.uint32(0x70000000)
    return bits_f32(((h & 0x8000) << 16) | (((h & 0x7FFF) << 13) + inf_nan)) * _P112


@njit(cache=True, error_model="numpy", inline="always")
def load_f16(b, o):
    """The fp16 at byte offset o of a uint8 array, as float32."""
    return f16_to_f32(np.uint32(b[o]) | (np.uint32(b[o + 1]) << 8))


@njit(cache=True, error_model="numpy", inline="always")
def load_u32(b, o):
    return (np.uint32(b[o]) | (np.uint32(b[o + 1]) << 8) | (np.uint32(b[o + 2]) << 16)
            | (np.uint32(b[o + 3]) << 24))


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c for float32 scalars with one rounding (`llvm.fma.f32`: vfmadd231ss), where
    gcc's -ffp-contract=fast fuses ggml's scalar `s += a * b`."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _fpext_half(typingctx, h):
    """IEEE half bits -> float32 (`fpext half`: vcvtph2ps with F16C)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        i16 = ir.IntType(16)
        v = builder.trunc(v, i16) if v.type.width > 16 else (
            builder.zext(v, i16) if v.type.width < 16 else v)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


# In vectorised loops LLVM turns fpext into 8-lane vcvtph2ps (F16 weights); without F16C it
# would call a runtime helper Numba may not link, so the integer version stands in.
half_to_float = _fpext_half if HAS_F16C else f16_to_f32
