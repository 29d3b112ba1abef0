"""Dot products of the IQ2 types with Q8_K activations (ggml's vec_dot: ggml_vec_dot_iq2_xxs_q8_K,
_iq2_xs_q8_K, _iq2_s_q8_K), AVX2 versions, ported onto kquant.matmul.simd.

Weight blocks (ggml-common.h, 256 values; every 8 values a point of an unsigned grid, levels
8, 25, 43, with 8 signs; value = d * (0.5 + s) * 0.25 * grid * sign / 8, s the 4-bit scale):
  IQ2_XXS (66 B): d, qs: 32 x u16        per 32 values two u32: 4 grid bytes (iq2xxs_grid),
                                         then 4 x 7-bit sign indices + the scale in bits 28-31
  IQ2_XS  (74 B): d, qs: 32 x u16, scales[8]   per 8 values a u16: grid index (9 bits,
                                         iq2xs_grid) + 7-bit sign index; a 4-bit scale a 16
  IQ2_S   (82 B): d, qs[32] (grid index low 8 bits), signs[32] (8 explicit sign bits a group),
                  qh[8] (2 high index bits a group), scales[8]   (iq2s_grid: 1024 entries)
7-bit sign indices: the 8th sign is the parity (KSIGNS_Q2XS, ggml's keven_signs_q2xs).

ggml's scheme, kept here: per 32 values the 4 grid entries in one vector (grid4: ggml's
_mm256_set_epi64x of 4 table loads), the activations signed by the weights' signs (vpsignb),
vpmaddubsw (grid bytes <= 43, |q8| <= 127: no saturation), vpmaddwd with the odd scale
2s + 1 per 16 or 32 values into int32 lanes (two accumulators, added per super-block);
acc = fma(fp16(w.d) * a.d, float(lanes), acc) per super-block; 0.125 * hsum_float_8(acc) per
row. Integer lane sums are exact whatever order they are added in, and every float operation
is ggml's in its order, so the results are ggml's AVX2 vec_dot bit for bit. IQ2_S's 4 grid
indices of 32 values are packed into 16-bit fields with two BMI2 pdep (as ggml's IQ1 kernels
do theirs; 0.73x -> 0.90x ggml's speed on one thread): the scalar index arithmetic per group
of 8 is where these kernels spend the time ggml saves (tools/bench_matvec.py). IQ2_XS
follows ggml's loop of 4 chunks: the sign bytes of its 16 u16 made in one vector (bits 9-15,
their parity as bit 7), each chunk's 32 signs picked from it by a shuffle, and-compare (no
sign-table lookups), its grid indices from one 64-bit load a chunk: 0.73x -> 1.00x ggml; its
16 scales built once a super-block (nib_scales, as IQ2_S's; ggml's scales vector), another
1.25x faster.
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .iq_grids import IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, KSIGNS_Q2XS
from .prims import F32, load_u32
from .simd import (I8x32, I16x16, _i32, _int, _psign, _shuffle, _x86, add32, bitmask32,
                   f16at, fma, hsumf, lane16x2, load32, madd, maddubs, or8, splat16, zerof)

_XXS = 66
_XS = 74
_S = 82
_i64 = ir.IntType(64)


# ---- the few vector operations the i-quant grids need (beside kquant.matmul.simd's) -----------

@intrinsic
def grid4(typingctx, tab, i0, i1, i2, i3):
    """32 bytes from 4 uint64 table entries (ggml's _mm256_set_epi64x(tab[i3], tab[i2],
    tab[i1], tab[i0])): the 4 groups of 8 values of 32 weights. Indices unchecked."""
    if not (isinstance(tab, types.Array) and tab.ndim == 1 and tab.dtype == types.uint64
            and all(isinstance(t, types.Integer) for t in (i0, i1, i2, i3))):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, value=args[0])
        v = ir.Constant(ir.VectorType(_i64, 4), ir.Undefined)
        for j in range(4):
            idx = context.cast(builder, args[1 + j], sig.args[1 + j], types.intp)
            e = builder.load(builder.gep(a.data, [idx]), align=8)
            v = builder.insert_element(v, e, ir.Constant(_i32, j))
        return builder.bitcast(v, I8x32.llvm)
    return I8x32(tab, i0, i1, i2, i3), codegen


@intrinsic
def sign8(typingctx, a, b):
    """ggml's _mm256_sign_epi8(a, b): a where b > 0, -a where b < 0, 0 where b == 0."""
    if not (a == I8x32 and b == I8x32):
        return None

    def codegen(context, builder, sig, args):
        return _psign(builder, args[0], args[1])
    return I8x32(a, b), codegen


HAS_BMI2 = "+bmi2" in llvm_binding.get_host_cpu_features().flatten().split(",")


@intrinsic
def _pdep_bmi2(typingctx, x, mask):
    """BMI2's pdep: the low bits of x deposited at the set bits of mask (one instruction)."""
    if not (isinstance(x, types.Integer) and isinstance(mask, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = _int(context, builder, args[0], sig.args[0], 64)
        m = _int(context, builder, args[1], sig.args[1], 64)
        return _x86(builder, "llvm.x86.bmi.pdep.64", ir.IntType(64), [a, m])
    return types.int64(x, mask), codegen


@njit(cache=True, error_model="numpy", inline="always")
def _pdep_generic(x, mask):
    out = np.int64(0)
    k = 0
    for b in range(64):
        if (mask >> b) & 1:
            out |= ((x >> k) & 1) << b
            k += 1
    return out


#: ggml's _pdep_u64 (its BMI2 branch packs IQ1's 4 grid indices of 32 values with two of them;
#: IQ2_S's the same way here)
pdep = _pdep_bmi2 if HAS_BMI2 else _pdep_generic


@njit(cache=True, error_model="numpy", inline="always")
def _u16(b, o):
    return np.int64(b[o]) | (np.int64(b[o + 1]) << 8)


# ---- rows ------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy", inline="always")
def _xxs_chunk(wr, q, aq, xa, grid, signs):
    """32 values of IQ2_XXS: the two u32 at q (4 grid bytes; 4 sign indices and the scale) by
    one 64-bit load, their fields shifted out one after the other (parallel shifts of one
    word are what LLVM's SLP vectorizer turns into vector shifts and lane extracts). Signs
    computed in vectors (vpsrlvq, parity by shifts, and-compare) instead of the 4 table
    lookups were slower here (0.81x to 0.85x against 0.94x to 1.00x ggml)."""
    v = np.int64(u64at(wr, q))
    b = v >> 8
    c = b >> 8
    q2 = grid4(grid, v & 255, b & 255, c & 255, (c >> 8) & 255)
    a = (v >> 32) & 0xFFFFFFFF
    e = a >> 7
    f = e >> 7
    s2 = grid4(signs, a & 127, e & 127, f & 127, (f >> 7) & 127)
    dot = maddubs(q2, sign8(load32(aq, xa), s2))
    return madd(dot, splat16(2 * (a >> 28) + 1))


@njit(cache=True, error_model="numpy", inline="always")
def _xxs_row(wr, aq, ad):
    grid = IQ2XXS_GRID
    signs = KSIGNS_Q2XS
    acc = zerof()
    for i in range(ad.shape[0]):
        o = i * _XXS
        x = i * 256
        q = o + 2
        p0 = _xxs_chunk(wr, q, aq, x, grid, signs)
        p1 = _xxs_chunk(wr, q + 8, aq, x + 32, grid, signs)
        p2 = _xxs_chunk(wr, q + 16, aq, x + 64, grid, signs)
        p3 = _xxs_chunk(wr, q + 24, aq, x + 96, grid, signs)
        p4 = _xxs_chunk(wr, q + 32, aq, x + 128, grid, signs)
        p5 = _xxs_chunk(wr, q + 40, aq, x + 160, grid, signs)
        p6 = _xxs_chunk(wr, q + 48, aq, x + 192, grid, signs)
        p7 = _xxs_chunk(wr, q + 56, aq, x + 224, grid, signs)
        sumi = add32(add32(add32(p0, p2), add32(p4, p6)), add32(add32(p1, p3), add32(p5, p7)))
        acc = fma(f16at(wr, o) * ad[i], sumi, acc)
    return F32(0.125) * hsumf(acc)


@intrinsic
def u64at(typingctx, arr, off):
    """The little-endian uint64 at byte `off` of a uint8 array, one unaligned load."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.uint8
            and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, value=args[0])
        q = builder.gep(a.data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        return builder.load(builder.bitcast(q, _i64.as_pointer()), align=1)
    return types.uint64(arr, off), codegen


@intrinsic
def xs_signs(typingctx, v):
    """ggml's IQ2_XS sign bytes of 16 u16 (the 32 bytes v): per u16 its 7 sign bits (bits
    9-15) and their parity as bit 7, in the u16's low byte (ggml: srli 9, xor srli 13, the
    parity of the nibble by vpshufb; here by shifts, the same bits)."""
    if v != I8x32:
        return None

    def codegen(context, builder, sig, args):
        t = ir.VectorType(ir.IntType(16), 16)
        w = builder.bitcast(args[0], t)

        def c(k):
            return ir.Constant(t, [k] * 16)
        p = builder.lshr(w, c(9))
        x = builder.xor(p, builder.lshr(p, c(4)))
        x = builder.xor(x, builder.lshr(x, c(2)))
        x = builder.xor(x, builder.lshr(x, c(1)))
        full = builder.or_(p, builder.shl(builder.and_(x, c(1)), c(7)))
        return builder.bitcast(full, I8x32.llvm)
    return I8x32(v), codegen


def _xs_expand(c):
    def impl(typingctx, fs):
        """The 32 sign bytes (-1 where the bit is set, else +1) of chunk c of 4: from the sign
        bytes fs of xs_signs (ggml: vpshufb to 8 copies, and, cmpeq with the bit selector,
        or 1)."""
        if fs != I8x32:
            return None

        def codegen(context, builder, sig, args):
            s = _shuffle(builder, args[0], args[0], [2 * (4 * c + j // 8) for j in range(32)])
            sel = ir.Constant(I8x32.llvm, [1 << (j % 8) for j in range(32)])
            hit = builder.icmp_unsigned("==", builder.and_(s, sel), sel)
            return builder.or_(builder.sext(hit, I8x32.llvm), ir.Constant(I8x32.llvm, [1] * 32))
        return I8x32(fs), codegen
    impl.__name__ = f"xs_expand{c}"
    return intrinsic(impl)


_xs_expand0, _xs_expand1, _xs_expand2, _xs_expand3 = (_xs_expand(c) for c in range(4))


@njit(cache=True, error_model="numpy", inline="always")
def _xs_grid(wr, q, grid):
    """The 4 grid points of the 4 u16 at q (9-bit indices), from one 64-bit load."""
    v = np.int64(u64at(wr, q))
    b = v >> 16
    c = b >> 16
    return grid4(grid, v & 511, b & 511, c & 511, (c >> 16) & 511)


@njit(cache=True, error_model="numpy", inline="always")
def _xs_dot(q2, s2, aq, xa, sc):
    dot = maddubs(q2, sign8(load32(aq, xa), s2))
    return madd(dot, sc)


@njit(cache=True, error_model="numpy", inline="always")
def _xs_quad(wr, o, h, sc, aq, x, grid):
    """Chunks 4h..4h+3 of the IQ2_XS block at o (ggml's loop body: 16 u16 at once, their sign
    bytes in one vector); the int32 lanes of the even and of the odd chunks."""
    q = o + 2 + 32 * h
    fs = xs_signs(load32(wr, q))
    xa = x + 128 * h
    c = 4 * h
    p1 = _xs_dot(_xs_grid(wr, q, grid), _xs_expand0(fs), aq, xa, lane16x2(sc, c, c + 8))
    p2 = _xs_dot(_xs_grid(wr, q + 8, grid), _xs_expand1(fs), aq, xa + 32,
                 lane16x2(sc, c + 1, c + 9))
    p3 = _xs_dot(_xs_grid(wr, q + 16, grid), _xs_expand2(fs), aq, xa + 64,
                 lane16x2(sc, c + 2, c + 10))
    p4 = _xs_dot(_xs_grid(wr, q + 24, grid), _xs_expand3(fs), aq, xa + 96,
                 lane16x2(sc, c + 3, c + 11))
    return add32(p1, p3), add32(p2, p4)


@njit(cache=True, error_model="numpy", inline="always")
def _xs_row(wr, aq, ad):
    grid = IQ2XS_GRID
    acc = zerof()
    for i in range(ad.shape[0]):
        o = i * _XS
        x = i * 256
        sc = nib_scales(u64at(wr, o + 66))
        a1, a2 = _xs_quad(wr, o, 0, sc, aq, x, grid)
        b1, b2 = _xs_quad(wr, o, 1, sc, aq, x, grid)
        acc = fma(f16at(wr, o) * ad[i], add32(add32(a1, b1), add32(a2, b2)), acc)
    return F32(0.125) * hsumf(acc)


@intrinsic
def nib_scales(typingctx, u):
    """The 16 scales 2s + 1 of 8 scale bytes (the u64 u): int16 lanes 0-7 from the low
    nibbles of bytes 0-7, lanes 8-15 from the high ones (ggml's scales16), so that chunk c's
    two are lanes c and 8 + c, one in-lane pick."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        t8 = ir.VectorType(ir.IntType(8), 8)
        v = builder.bitcast(_int(context, builder, args[0], sig.args[0], 64), t8)
        lo = builder.and_(v, ir.Constant(t8, [15] * 8))
        hi = builder.lshr(v, ir.Constant(t8, [4] * 8))
        w = builder.zext(_shuffle(builder, lo, hi, range(16)), I16x16.llvm)
        return builder.add(builder.shl(w, ir.Constant(I16x16.llvm, [1] * 16)),
                           ir.Constant(I16x16.llvm, [1] * 16))
    return I16x16(u), codegen


@njit(cache=True, error_model="numpy", inline="always")
def _s_chunk(wr, o, c, scales, aq, xa, grid):
    """32 values of the IQ2_S block at o: chunk c (qs[4c..], signs[4c..], qh[c], scales[c])."""
    # the 4 indices in 16-bit fields, 8 bits of qs and 2 of qh each (pdep, as ggml's IQ1 kernels)
    idx = (pdep(np.int64(load_u32(wr, o + 2 + 4 * c)), 0x00FF00FF00FF00FF)
           | pdep(np.int64(wr[o + 66 + c]), 0x0300030003000300))
    q2 = grid4(grid, idx & 0xFFFF, (idx >> 16) & 0xFFFF, (idx >> 32) & 0xFFFF, idx >> 48)
    # byte j of the 32 negated where bit j of the 4 sign bytes is set (ggml: cmpeq, xor, sub)
    s2 = or8(bitmask32(load_u32(wr, o + 34 + 4 * c)), 1)
    dot = maddubs(q2, sign8(load32(aq, xa), s2))
    return madd(dot, lane16x2(scales, c, c + 8))


@njit(cache=True, error_model="numpy", inline="always")
def _s_row(wr, aq, ad):
    grid = IQ2S_GRID
    acc = zerof()
    for i in range(ad.shape[0]):
        o = i * _S
        x = i * 256
        scales = nib_scales(u64at(wr, o + 74))
        p0 = _s_chunk(wr, o, 0, scales, aq, x, grid)
        p1 = _s_chunk(wr, o, 1, scales, aq, x + 32, grid)
        p2 = _s_chunk(wr, o, 2, scales, aq, x + 64, grid)
        p3 = _s_chunk(wr, o, 3, scales, aq, x + 96, grid)
        p4 = _s_chunk(wr, o, 4, scales, aq, x + 128, grid)
        p5 = _s_chunk(wr, o, 5, scales, aq, x + 160, grid)
        p6 = _s_chunk(wr, o, 6, scales, aq, x + 192, grid)
        p7 = _s_chunk(wr, o, 7, scales, aq, x + 224, grid)
        sumi = add32(add32(add32(p0, p2), add32(p4, p6)), add32(add32(p1, p3), add32(p5, p7)))
        acc = fma(f16at(wr, o) * ad[i], sumi, acc)
    return F32(0.125) * hsumf(acc)


# One kernel per type, kquant.matmul.cpu's signature: w uint8 (rows, row_bytes); aq int8
# (n_tok, k); ad float32 (n_tok, blocks); bsums (unused here); out float32 (n_tok, rows).
# Weight rows in parallel, each against every token.

# (The grids are module globals: Numba freezes them into the compiled code as constants.)

@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq2_xxs(w, aq, ad, unused, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _xxs_row(w[r], aq[t], ad[t])


@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq2_xs(w, aq, ad, unused, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _xs_row(w[r], aq[t], ad[t])


@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq2_s(w, aq, ad, unused, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _s_row(w[r], aq[t], ad[t])
