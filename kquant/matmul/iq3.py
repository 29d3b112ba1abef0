"""Dot products of the IQ3 types with Q8_K activations (ggml_vec_dot_iq3_xxs_q8_K and
ggml_vec_dot_iq3_s_q8_K), AVX2 versions, ported operation for operation onto
kquant.matmul.simd.

Weight blocks (ggml-common.h; layouts drawn in kquant/codecs/iq3.py):
  IQ3_XXS  (98 B): d, qs[64] grid indices, scales_and_signs: 8 x u32
  IQ3_S   (110 B): d, qs[64] low index bytes, qh[8], signs[32], scales[4]
Each sub-block of 32 values is 8 grid points of 4 unsigned bytes (iq3xxs_grid: 4..62,
iq3s_grid: 1..15), built into one vector as ggml's _mm256_set_epi32 does; the signs go onto
the activations, not the weights (IQ3_XXS: 4 x 7 bits through keven_signs_q2xs, 8 bytes of
+-1 each; IQ3_S: 32 sign bits, a byte 0xFF where set, q8 ^ s - s), then vpmaddubsw (grid bytes
unsigned, at most 2 * 62 * 127: no saturation) and vpmaddwd with the sub-block's scale
2 * ls + 1. Per super-block two int32 accumulators (even and odd sub-blocks), then
acc = fma(fp16(w.d) * a.d, float(sumi1 + sumi2), acc) on 8 float lanes; per row
hsum_float_8(acc), times 0.25f for IQ3_XXS (its grid counts quarter steps). The integer sums
are exact and every float operation is ggml's in its order, so the results are ggml's AVX2
vec_dot bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..codecs.lattice import KSIGNS
from ..codecs.iq3_grids import IQ3S_GRID, IQ3XXS_GRID
from .prims import F32
from .simd import (add32, bitmask32, f16at, fma, from_u32x8, from_u64x4, hsumf, load32, madd,
                   maddubs, sign8, splat16, sub8, u32at, xor8, zero32, zerof)

_XXS = 98
_S = 110
_I32 = np.int32
_QUARTER = F32(0.25)

_GRID_XXS = np.array(IQ3XXS_GRID, np.uint32)
_GRID_S = np.array(IQ3S_GRID, np.uint32)
#: ggml's keven_signs_q2xs: for 7 sign bits i (the 8th their parity, KSIGNS[i]), 8 bytes,
#: byte j 0xFF (-1) where bit j is set, else 0x01
_EVEN_SIGNS = np.where((KSIGNS[:, None] >> np.arange(8)) & 1, 0xFF, 0x01).astype(np.uint8) \
    .view(np.uint64).reshape(128)


@njit(cache=True, error_model="numpy", inline="always")
def _grid8(g, wr, o):
    """Eight grid points of the 8 index bytes at o (IQ3_XXS)."""
    return from_u32x8(g[wr[o]], g[wr[o + 1]], g[wr[o + 2]], g[wr[o + 3]],
                      g[wr[o + 4]], g[wr[o + 5]], g[wr[o + 6]], g[wr[o + 7]])


@njit(cache=True, error_model="numpy", inline="always")
def _signs_xxs(a):
    """The 32 sign bytes of one IQ3_XXS sub-block from its scale-and-signs word. The 7-bit
    fields are shifted out one after the other: four parallel shifts of `a` are what LLVM's
    SLP vectorizer turns into vector shifts and lane extracts, slower than ggml's scalar ones."""
    s = _EVEN_SIGNS
    b = a >> 7
    c = b >> 7
    return from_u64x4(s[a & 127], s[b & 127], s[c & 127], s[(c >> 7) & 127])


@njit(cache=True, error_model="numpy", inline="always")
def _super_blocks(wr, aq, ad, size, pairs, unrolled):
    """ggml's frame of both kernels: per super-block of `size` bytes the int32 lanes of its
    even and odd sub-blocks (pairs(wr, aq, o, x, ib): sub-blocks ib and ib + 1) summed apart,
    then acc = fma(fp16(w.d) * a.d, float(sumi1 + sumi2), acc); hsum_float_8(acc).

    `unrolled` (a constant, for LLVM to drop the other branch): the four pairs written out.
    IQ3_S wants it: as a loop, LLVM kept its byte offsets of four strides (qs, qh, signs,
    scales) in a vector of induction variables and extracted them every pass (0.96x ggml,
    1.01x written out); IQ3_XXS's loop is faster as a loop (1.1x against 1.0x)."""
    acc = zerof()
    for i in range(ad.shape[0]):
        o = i * size
        x = i * 256
        if unrolled:
            a1, a2 = pairs(wr, aq, o, x, 0)
            b1, b2 = pairs(wr, aq, o, x + 64, 2)
            c1, c2 = pairs(wr, aq, o, x + 128, 4)
            e1, e2 = pairs(wr, aq, o, x + 192, 6)
            sumi1 = add32(add32(add32(a1, b1), c1), e1)
            sumi2 = add32(add32(add32(a2, b2), c2), e2)
        else:
            sumi1 = zero32()
            sumi2 = zero32()
            for ib in range(0, 8, 2):
                p1, p2 = pairs(wr, aq, o, x + 32 * ib, ib)
                sumi1 = add32(sumi1, p1)
                sumi2 = add32(sumi2, p2)
        acc = fma(f16at(wr, o) * ad[i], add32(sumi1, sumi2), acc)
    return hsumf(acc)


@njit(cache=True, error_model="numpy", inline="always")
def _xxs_pairs(wr, aq, o, x, ib):
    a1 = u32at(wr, o + 66 + 4 * ib)
    a2 = u32at(wr, o + 70 + 4 * ib)
    dot1 = maddubs(_grid8(_GRID_XXS, wr, o + 2 + 8 * ib), sign8(load32(aq, x), _signs_xxs(a1)))
    dot2 = maddubs(_grid8(_GRID_XXS, wr, o + 10 + 8 * ib),
                   sign8(load32(aq, x + 32), _signs_xxs(a2)))
    return (madd(dot1, splat16(2 * _I32(a1 >> 28) + 1)),
            madd(dot2, splat16(2 * _I32(a2 >> 28) + 1)))


@njit(cache=True, error_model="numpy", inline="always")
def _xxs_row(wr, aq, ad):
    return _QUARTER * _super_blocks(wr, aq, ad, _XXS, _xxs_pairs, False)


@njit(cache=True, error_model="numpy", inline="always")
def _grid8_s(wr, o, qh):
    """Eight iq3s_grid points: index byte j at o, its 9th bit bit j of qh (ggml's
    (qh << (8 - j)) & 256)."""
    g = _GRID_S
    return from_u32x8(g[_I32(wr[o]) | ((qh << 8) & 256)], g[_I32(wr[o + 1]) | ((qh << 7) & 256)],
                      g[_I32(wr[o + 2]) | ((qh << 6) & 256)], g[_I32(wr[o + 3]) | ((qh << 5) & 256)],
                      g[_I32(wr[o + 4]) | ((qh << 4) & 256)], g[_I32(wr[o + 5]) | ((qh << 3) & 256)],
                      g[_I32(wr[o + 6]) | ((qh << 2) & 256)], g[_I32(wr[o + 7]) | ((qh << 1) & 256)])


@njit(cache=True, error_model="numpy", inline="always")
def _signed_s(aq, x, wr, o):
    """32 activations with IQ3_S's 32 sign bits at o applied: (s ^ q8) - s, s = 0xFF per set
    bit (ggml's shuffle / and / cmpeq expansion, then xor and sub)."""
    s = bitmask32(u32at(wr, o))
    return sub8(xor8(s, load32(aq, x)), s)


@njit(cache=True, error_model="numpy", inline="always")
def _s_pairs(wr, aq, o, x, ib):
    qh = _I32(u32at(wr, o + 66 + ib) & 0xFFFF)     # the two sub-blocks' qh bytes
    q2_1 = _grid8_s(wr, o + 2 + 8 * ib, qh & 0xFF)
    q2_2 = _grid8_s(wr, o + 10 + 8 * ib, qh >> 8)
    dot1 = maddubs(q2_1, _signed_s(aq, x, wr, o + 74 + 4 * ib))
    dot2 = maddubs(q2_2, _signed_s(aq, x + 32, wr, o + 78 + 4 * ib))
    sc = _I32(wr[o + 106 + ib // 2])
    return madd(dot1, splat16(2 * (sc & 0xF) + 1)), madd(dot2, splat16(2 * (sc >> 4) + 1))


@njit(cache=True, error_model="numpy", inline="always")
def _s_row(wr, aq, ad):
    return _super_blocks(wr, aq, ad, _S, _s_pairs, True)


# One kernel per type, kquant.matmul.cpu's signature: w uint8 (rows, row_bytes); aq int8
# (n_tok, k); ad float32 (n_tok, blocks); Q8_K's bsums (unused); out float32 (n_tok, rows).
# Weight rows in parallel, each against every token.

@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq3_xxs(w, aq, ad, unused, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _xxs_row(w[r], aq[t], ad[t])


@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq3_s(w, aq, ad, unused, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _s_row(w[r], aq[t], ad[t])
