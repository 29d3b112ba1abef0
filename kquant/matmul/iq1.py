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
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .iq2 import grid4, pdep, sign8, splat16x2
from .iq_grids import IQ1S_GRID
from .prims import F32, f16_to_f32, fma32, load_u32
from .simd import (add32, f16at, fma, hsumf, load32, madd, maddubs, sdot16, splat16, zero32,
                   zerof)

_S = 50
_M = 56
#: IQ1_M's deltas of 32 values, for the 4 sign bits m of its groups: 32 bytes, group l's 8 +1,
#: or -1 where bit l of m is set (ggml's 0x0101.. / 0xffff.. words, one load instead of four)
_DELTA32 = np.where((np.arange(16)[:, None] >> (np.arange(32)[None, :] // 8)) & 1, -1, 1).astype(
    np.int8).reshape(-1)
_ONES = np.full(32, 1, np.int8)


@njit(cache=True, error_model="numpy", inline="always")
def _u16(b, o):
    return np.int64(b[o]) | (np.int64(b[o + 1]) << 8)


@njit(cache=True, error_model="numpy", inline="always")
def _s_chunk(wr, o, ib, aq, x, bs, i, grid):
    """Chunk ib (32 values) of the IQ1_S block at o: its grid lanes, and its delta term (the
    chunk's two bsums, signed, times its scale)."""
    h = _u16(wr, o + 34 + 2 * ib)
    # the 4 indices in 16-bit fields: 8 bits of qs, 3 of qh each (ggml's BMI2 branch)
    idx = (pdep(np.int64(load_u32(wr, o + 2 + 4 * ib)), 0x00FF00FF00FF00FF)
           | pdep(h, 0x0700070007000700))
    q1 = grid4(grid, idx & 0xFFFF, (idx >> 16) & 0xFFFF, (idx >> 32) & 0xFFFF, idx >> 48)
    ls = 2 * ((h >> 12) & 7) + 1
    p = madd(sdot16(q1, load32(aq, x + 32 * ib)), splat16(ls))
    b2 = (np.int64(bs[16 * i + 2 * ib]) + np.int64(bs[16 * i + 2 * ib + 1])) * ls
    return p, b2 if h < 0x8000 else -b2


@njit(cache=True, error_model="numpy", inline="always")
def _s_row(wr, aq, ad, bs):
    grid = IQ1S_GRID
    acc = zerof()
    accum1 = F32(0.0)
    for i in range(ad.shape[0]):
        o = i * _S
        x = i * 256
        sumi = zero32()
        sumi1 = np.int64(0)
        for ib in range(0, 8, 2):       # in pairs, as ggml
            p1, s1 = _s_chunk(wr, o, ib, aq, x, bs, i, grid)
            p2, s2 = _s_chunk(wr, o, ib + 1, aq, x, bs, i, grid)
            sumi = add32(sumi, add32(p1, p2))
            sumi1 += s1 + s2
        d = ad[i] * f16at(wr, o)
        acc = fma(d, sumi, acc)
        accum1 = fma32(d, F32(np.int32(sumi1)), accum1)
    return hsumf(acc) + F32(0.125) * accum1


@njit(cache=True, error_model="numpy", inline="always")
def _m_chunk(wr, o, ib, sc, aq, x, grid, delta, ones):
    """Chunk ib (32 values) of the IQ1_M block at o, its halves' scales in bits 0-2 and 3-5 of
    sc: the grid part and the delta part of its lanes."""
    hh = _u16(wr, o + 32 + 2 * ib)
    idx = (pdep(np.int64(load_u32(wr, o + 4 * ib)), 0x00FF00FF00FF00FF)
           | pdep(hh & 0x7777, 0x0F000F000F000F00))
    q1 = grid4(grid, idx & 0xFFFF, (idx >> 16) & 0xFFFF, (idx >> 32) & 0xFFFF, idx >> 48)
    m = ((hh >> 3) & 1) | ((hh >> 6) & 2) | ((hh >> 9) & 4) | ((hh >> 12) & 8)
    dl = load32(delta, 32 * m)
    scl = splat16x2(2 * (sc & 7) + 1, 2 * ((sc >> 3) & 7) + 1)
    q8 = load32(aq, x + 32 * ib)
    return madd(sdot16(q1, q8), scl), madd(maddubs(ones, sign8(q8, dl)), scl)


@njit(cache=True, error_model="numpy", inline="always")
def _m_row(wr, aq, ad):
    grid = IQ1S_GRID
    delta = _DELTA32
    ones = load32(_ONES, 0)
    acc1 = zerof()
    acc2 = zerof()
    for i in range(ad.shape[0]):
        o = i * _M
        x = i * 256
        s0 = _u16(wr, o + 48)
        s1 = _u16(wr, o + 50)
        s2 = _u16(wr, o + 52)
        s3 = _u16(wr, o + 54)
        scale = (s0 >> 12) | ((s1 >> 8) & 0x00F0) | ((s2 >> 4) & 0x0F00) | (s3 & 0xF000)
        sumi1 = zero32()
        sumi2 = zero32()
        # chunks in pairs, as ggml: both take their scales from one word sc[ib / 2] (the even
        # chunk's halves at bits 0 and 3, the odd one's at 6 and 9: constant shifts)
        for ib in range(0, 8, 2):
            sc = _u16(wr, o + 48 + ib)
            p1, p2 = _m_chunk(wr, o, ib, sc, aq, x, grid, delta, ones)
            sumi1 = add32(sumi1, p1)
            sumi2 = add32(sumi2, p2)
            p1, p2 = _m_chunk(wr, o, ib + 1, sc >> 6, aq, x, grid, delta, ones)
            sumi1 = add32(sumi1, p1)
            sumi2 = add32(sumi2, p2)
        d = ad[i] * f16_to_f32(scale)
        acc1 = fma(d, sumi1, acc1)
        acc2 = fma(d, sumi2, acc2)
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
