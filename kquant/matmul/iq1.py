"""Dot products of the IQ1 types with Q8_K activations (ggml's vec_dot: ggml_vec_dot_iq1_s_q8_K,
ggml_vec_dot_iq1_m_q8_K), AVX2 versions (the BMI2 branch: each 32 values' 4 grid indices
packed into 16-bit fields by two pdep; without BMI2 a bit loop gives the same), ported onto
kquant.matmul.simd.

Weight blocks (ggml-common.h, 256 values; every 8 values a point of iq1s_grid, bytes -1, 0,
+1, shifted by a delta of -+1/8; value = d * (2s + 1) * (grid + delta)):
  IQ1_S (50 B): d, qs[32] (grid index low 8 bits), qh: 8 x u16 per 32 values: 3 high index
                bits a group (bits 0-11), the scale s (bits 12-14), the delta's sign (bit 15)
  IQ1_M (56 B): qs[32], qh[16] (per 8 values a nibble: 3 high index bits, the delta's sign
                in bit 3), scales: 4 x u16, a 3-bit scale per 16 values (bits 0-11) and the
                fp16 d in the 4 top nibbles
Per 32 values the 4 grid entries in one vector (iq2.grid4), the signed-byte product
(mul_add_epi8: vpsignb x2, vpmaddubsw), vpmaddwd with the scale into int32 lanes. The delta
term: IQ1_S sums it as a scalar int, sumi1 += (bsums of its 32) * sign * scale, and keeps
accum1 += d * sumi1 (fused by gcc's -ffp-contract=fast: one vfmadd231ss); IQ1_M sums the
activations signed by each 8's delta (vpmaddubsw with ones) into a second lane set. Per super-
block the lane sums go into float lanes with one fma (d = a.d * fp16(w.d)); per row
  IQ1_S: hsum_float_8(accum) + 0.125 * accum1
  IQ1_M: hsum_float_8(accum1) + 0.125 * hsum_float_8(accum2)
(the 0.125 products are exact, fused or not). The integer sums are exact, so the results
are ggml's AVX2 vec_dot bit for bit.

Speed (tools/bench_matvec.py): the four chunk pairs written out, each pair's qs and qh read by
one 64-bit and one 32-bit load (byte loads OR-ed together were not merged); IQ1_M's 16 scales
built once a super-block as ggml does (vpsrlvq, a chunk's two picked by one in-lane shuffle),
its delta signs as ggml's (pdep of the sign bits to bytes 0x80, vpmovsxbq, or 1); IQ1_S's 8
scales from one 16-byte load of qh a super-block, and its delta term (ggml: per chunk, scalar)
as one vpmaddwd of the 16 bsums with the signed scales and an exact int32 hsum (the same
integer). IQ1_M 0.66x -> 0.97x ggml's vec_dot; IQ1_S 0.75x -> 0.85x with the wide loads, and
the vector scales and delta term make it 1.13x faster again (2 threads, 4096 x 4096).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .iq2 import grid4, pdep, sign8, u64at
from .iq_grids import IQ1S_GRID
from .prims import F32, f16_to_f32, fma32
from .simd import (I8x32, I16x16, _int, _shuffle, _splat, _vec_ptr, add32, f16at, fma, hsum32,
                   hsumf, lane16x2, load_i16, load32, madd, maddubs, sdot16, u32at, zerof)

_S = 50
_M = 56
_ONES = np.full(32, 1, np.int8)


def _s_scales(signed):
    def impl(typingctx, arr, off):
        """IQ1_S's 8 scales 2s + 1 of a super-block from its qh (8 u16 at byte off): each in
        int16 lanes c and 8 + c (a chunk's picked by one in-lane shuffle); or, signed, each
        negated where its delta is negative, in lanes 2c and 2c + 1 (against the bsums: one
        vpmaddwd gives the delta term of every chunk)."""
        if not (isinstance(arr, types.Array) and arr.dtype == types.uint8
                and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            t = ir.VectorType(ir.IntType(16), 8)
            v = builder.load(_vec_ptr(context, builder, sig.args[0], args[0], args[1],
                                      sig.args[1], t), align=1)

            def c(k):
                return ir.Constant(t, [k] * 8)
            ls = builder.add(builder.shl(builder.and_(builder.lshr(v, c(12)), c(7)), c(1)), c(1))
            if not signed:
                return _shuffle(builder, ls, ls, list(range(8)) * 2)
            neg = builder.ashr(v, c(15))
            sls = builder.sub(builder.xor(ls, neg), neg)
            return _shuffle(builder, sls, sls, [j // 2 for j in range(16)])
        return I16x16(arr, off), codegen
    impl.__name__ = "_s_signed_scales" if signed else "_s_scales"
    return intrinsic(impl)


_s_ls = _s_scales(False)
_s_sls = _s_scales(True)


@njit(cache=True, error_model="numpy", inline="always")
def _s_pair(wr, o, p, ls, aq, x, grid):
    """Chunks 2p and 2p + 1 (64 values) of the IQ1_S block at o (ggml's loop body, from one
    64-bit load of qs and one 32-bit load of the two qh words): their grid lanes."""
    qs = np.int64(u64at(wr, o + 2 + 8 * p))
    qh = np.int64(u32at(wr, o + 34 + 4 * p))
    # the 4 indices in 16-bit fields: 8 bits of qs, 3 of qh each (ggml's BMI2 branch)
    idx1 = pdep(qs & 0xFFFFFFFF, 0x00FF00FF00FF00FF) | pdep(qh & 0xFFFF, 0x0700070007000700)
    idx2 = pdep((qs >> 32) & 0xFFFFFFFF, 0x00FF00FF00FF00FF) | pdep(qh >> 16, 0x0700070007000700)
    q1 = grid4(grid, idx1 & 0xFFFF, (idx1 >> 16) & 0xFFFF, (idx1 >> 32) & 0xFFFF, idx1 >> 48)
    q2 = grid4(grid, idx2 & 0xFFFF, (idx2 >> 16) & 0xFFFF, (idx2 >> 32) & 0xFFFF, idx2 >> 48)
    p1 = madd(sdot16(q1, load32(aq, x + 64 * p)), lane16x2(ls, 2 * p, 2 * p + 8))
    p2 = madd(sdot16(q2, load32(aq, x + 64 * p + 32)), lane16x2(ls, 2 * p + 1, 2 * p + 9))
    return add32(p1, p2)


@njit(cache=True, error_model="numpy", inline="always")
def _s_row(wr, aq, ad, bs):
    grid = IQ1S_GRID
    acc = zerof()
    accum1 = F32(0.0)
    for i in range(ad.shape[0]):
        o = i * _S
        x = i * 256
        ls = _s_ls(wr, o + 34)
        a = _s_pair(wr, o, 0, ls, aq, x, grid)
        b = _s_pair(wr, o, 1, ls, aq, x, grid)
        c = _s_pair(wr, o, 2, ls, aq, x, grid)
        e = _s_pair(wr, o, 3, ls, aq, x, grid)
        # the delta term, sum of (bsums of each 32) * sign * scale: exact in int32
        sumi1 = hsum32(madd(load_i16(bs, 16 * i), _s_sls(wr, o + 34)))
        d = ad[i] * f16at(wr, o)
        acc = fma(d, add32(add32(a, b), add32(c, e)), acc)
        accum1 = fma32(d, F32(sumi1), accum1)
    return hsumf(acc) + F32(0.125) * accum1


@intrinsic
def _m_scales(typingctx, u):
    """IQ1_M's 16 scales 2s + 1 of a super-block from its scales as one u64 (ggml: the word
    broadcast, vpsrlvq by 0, 6, 3, 9, and 7, times 2 plus 1): int16 lane 4k + j holds word j's
    field at shift (0, 6, 3, 9)[k], so that a chunk's two scales sit in one 128-bit half each."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        t64 = ir.VectorType(ir.IntType(64), 4)
        v = _splat(builder, _int(context, builder, args[0], sig.args[0], 64), t64)
        v = builder.lshr(v, ir.Constant(t64, [0, 6, 3, 9]))
        w = builder.bitcast(v, I16x16.llvm)
        w = builder.and_(w, ir.Constant(I16x16.llvm, [7] * 16))
        return builder.add(builder.shl(w, ir.Constant(I16x16.llvm, [1] * 16)),
                           ir.Constant(I16x16.llvm, [1] * 16))
    return I16x16(u), codegen


def _m_delta(h):
    def impl(typingctx, ds):
        """The delta signs of chunk h of a pair: bytes 4h..4h+3 of ds (0x80 where the group's
        delta is negative) sign-extended to 8 bytes each, or 1 (ggml: cvtepi8_epi64 of the
        pdep'ed signs, or mone8): bytes +1 or negative."""
        if not isinstance(ds, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = builder.bitcast(_int(context, builder, args[0], sig.args[0], 64),
                                ir.VectorType(ir.IntType(8), 8))
            v = _shuffle(builder, v, v, range(4 * h, 4 * h + 4))
            v = builder.bitcast(builder.sext(v, ir.VectorType(ir.IntType(64), 4)), I8x32.llvm)
            return builder.or_(v, ir.Constant(I8x32.llvm, [1] * 32))
        return I8x32(ds), codegen
    impl.__name__ = f"_m_delta{h}"
    return intrinsic(impl)


_m_delta0 = _m_delta(0)
_m_delta1 = _m_delta(1)


@njit(cache=True, error_model="numpy", inline="always")
def _m_pair(wr, o, p, scales, aq, x, grid, ones):
    """Chunks 2p and 2p + 1 of the IQ1_M block at o (ggml's loop body): the grid lanes and the
    delta lanes of both."""
    qs = np.int64(u64at(wr, o + 8 * p))
    qh = np.int64(u32at(wr, o + 32 + 4 * p))
    idx1 = pdep(qs & 0xFFFFFFFF, 0x00FF00FF00FF00FF) | pdep(qh & 0x7777, 0x0F000F000F000F00)
    idx2 = (pdep((qs >> 32) & 0xFFFFFFFF, 0x00FF00FF00FF00FF)
            | pdep((qh >> 16) & 0x7777, 0x0F000F000F000F00))
    q1 = grid4(grid, idx1 & 0xFFFF, (idx1 >> 16) & 0xFFFF, (idx1 >> 32) & 0xFFFF, idx1 >> 48)
    q2 = grid4(grid, idx2 & 0xFFFF, (idx2 >> 16) & 0xFFFF, (idx2 >> 32) & 0xFFFF, idx2 >> 48)
    ds = pdep(qh & 0x88888888, np.int64(-0x0F0F0F0F0F0F0F10))  # 0xF0F0F0F0F0F0F0F0
    q8a = load32(aq, x + 64 * p)
    q8b = load32(aq, x + 64 * p + 32)
    sc1 = lane16x2(scales, p, 8 + p)
    sc2 = lane16x2(scales, 4 + p, 12 + p)
    g = add32(madd(sdot16(q1, q8a), sc1), madd(sdot16(q2, q8b), sc2))
    dl = add32(madd(maddubs(ones, sign8(q8a, _m_delta0(ds))), sc1),
               madd(maddubs(ones, sign8(q8b, _m_delta1(ds))), sc2))
    return g, dl


@njit(cache=True, error_model="numpy", inline="always")
def _m_row(wr, aq, ad):
    grid = IQ1S_GRID
    ones = load32(_ONES, 0)
    acc1 = zerof()
    acc2 = zerof()
    for i in range(ad.shape[0]):
        o = i * _M
        x = i * 256
        u = np.int64(u64at(wr, o + 48))
        scale = (((u >> 12) & 0x000F) | ((u >> 24) & 0x00F0) | ((u >> 36) & 0x0F00)
                 | ((u >> 48) & 0xF000))
        scales = _m_scales(u)
        a1, a2 = _m_pair(wr, o, 0, scales, aq, x, grid, ones)
        b1, b2 = _m_pair(wr, o, 1, scales, aq, x, grid, ones)
        c1, c2 = _m_pair(wr, o, 2, scales, aq, x, grid, ones)
        e1, e2 = _m_pair(wr, o, 3, scales, aq, x, grid, ones)
        d = ad[i] * f16_to_f32(scale)
        acc1 = fma(d, add32(add32(a1, b1), add32(c1, e1)), acc1)
        acc2 = fma(d, add32(add32(a2, b2), add32(c2, e2)), acc2)
    return hsumf(acc1) + F32(0.125) * hsumf(acc2)


# kquant.matmul.cpu's kernel signature: w uint8 (rows, row_bytes); aq int8 (n_tok, k); ad
# float32 (n_tok, blocks); bs int16 bsums (n_tok, k / 16; IQ1_M does not read them); out
# float32 (n_tok, rows). Weight rows in parallel, each against every token.

@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq1_s(w, aq, ad, bs, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _s_row(w[r], aq[t], ad[t], bs[t])


@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq1_m(w, aq, ad, unused, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _m_row(w[r], aq[t], ad[t])
