"""Dot products of the IQ4 types with 8-bit activations (ggml's vec_dot): IQ4_NL against Q8_0
(ggml_vec_dot_iq4_nl_q8_0) and IQ4_XS against Q8_K (ggml_vec_dot_iq4_xs_q8_K), AVX2 versions,
ported operation for operation onto kquant.matmul.simd.

Weight blocks (ggml-common.h; layouts drawn in kquant/codecs/iq4.py):
  IQ4_NL  (18 B): d, qs[16]                       value j: d * kv[index j]
  IQ4_XS (136 B): d, scales_h (u16), scales_l[4], qs[128]
                  value j of sub-block ib: d * (ls_ib - 32) * kv[index], ls_ib 6 bits
Indices as Q4_0's nibbles (value j < 16 the low nibble of qs[j], j >= 16 the high nibble of
qs[j - 16]); kv = kvalues_iq4nl, signed bytes -127..113, looked up 32 at a time by `vpshufb`
(simd.iq4vals32). Products of signed bytes take ggml's sign trick (mul_add_epi8: vpsignb x2,
vpmaddubsw; int16 pairs stay below 2 * 127 * 127).

IQ4_NL per row: blocks in pairs, the even block into float lanes acc1 and the odd one into
acc2, each acc = fma(fp16(a.d) * fp16(w.d), float(sumi lanes), acc) (sumi: vpmaddwd of the
int16 pairs with ones; the scale products of 8 blocks at a time in one vector, each rounded
once as ggml's scalar product: 1.05-1.09x ggml's vec_dot on 2 threads, 0.81-0.85x with one
vcvtph2ps and scalar product a block); then hsum_float_8(acc1 + acc2); an odd last block is added after
the lane sum, sumf = fma(d, float(sumi), sumf) (ggml's scalar tail loop, which gcc fuses
into vfmadd231ss; tests/test_matmul_cpu.py checks the bits with odd block counts).
IQ4_XS per super-block: two int32 accumulators (even and odd sub-blocks), each += vpmaddwd of
its int16 pairs with the sub-block's signed scale ls - 32; acc = fma(fp16(w.d) * a.d,
float(sumi1 + sumi2), acc); hsum_float_8 once per row. All integer sums are exact, every
float operation is ggml's in its order, so the results are ggml's AVX2 vec_dot bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prims import F32, fma32
from .simd import (add32, addf, dot8, f16at, f16x8, fma, hsum32, hsumf, iq4vals32, lanef,
                   load32, loadf, madd, mulf, sdot16, splat16, zero32, zerof)

_NL = 18
_XS = 136
_I32 = np.int32


@njit(cache=True, error_model="numpy", inline="always")
def _nl_pair(wr, aq, dd, k, b, acc1, acc2):
    """Blocks b (even, into acc1) and b + 1 (into acc2), their scale products lanes k, k + 1
    of dd."""
    o = b * _NL
    acc1 = fma(lanef(dd, k), dot8(iq4vals32(wr, o + 2), load32(aq, b * 32)), acc1)
    acc2 = fma(lanef(dd, k + 1), dot8(iq4vals32(wr, o + _NL + 2), load32(aq, b * 32 + 32)), acc2)
    return acc1, acc2


@njit(cache=True, error_model="numpy", inline="always")
def _nl_row(wr, aq, ad):
    nb = ad.shape[0]
    acc1 = zerof()
    acc2 = zerof()
    # 8 blocks at a time: their 8 scale products fp16(a.d) * fp16(w.d) in one vector (one
    # vcvtph2ps, one vmulps: the same roundings as ggml's one scalar product a block)
    g8 = nb - nb % 8
    for b0 in range(0, g8, 8):
        dd = mulf(loadf(ad, b0), f16x8(wr, b0 * _NL, _NL))
        acc1, acc2 = _nl_pair(wr, aq, dd, 0, b0, acc1, acc2)
        acc1, acc2 = _nl_pair(wr, aq, dd, 2, b0 + 2, acc1, acc2)
        acc1, acc2 = _nl_pair(wr, aq, dd, 4, b0 + 4, acc1, acc2)
        acc1, acc2 = _nl_pair(wr, aq, dd, 6, b0 + 6, acc1, acc2)
    ib = g8
    while ib + 1 < nb:
        o = ib * _NL
        acc1 = fma(ad[ib] * f16at(wr, o), dot8(iq4vals32(wr, o + 2), load32(aq, ib * 32)),
                   acc1)
        acc2 = fma(ad[ib + 1] * f16at(wr, o + _NL),
                   dot8(iq4vals32(wr, o + _NL + 2), load32(aq, ib * 32 + 32)), acc2)
        ib += 2
    sumf = hsumf(addf(acc1, acc2))
    if ib < nb:
        o = ib * _NL
        sumi = hsum32(dot8(iq4vals32(wr, o + 2), load32(aq, ib * 32)))
        sumf = fma32(ad[ib] * f16at(wr, o), F32(sumi), sumf)
    return sumf


@njit(cache=True, error_model="numpy", inline="always")
def _xs_row(wr, aq, ad):
    acc = zerof()
    for i in range(ad.shape[0]):
        o = i * _XS
        x = i * 256
        sh = _I32(wr[o + 2]) | (_I32(wr[o + 3]) << 8)
        sumi1 = zero32()
        sumi2 = zero32()
        for ib in range(0, 8, 2):
            sl = _I32(wr[o + 4 + ib // 2])
            ls1 = ((sl & 0xF) | ((sh << 4) & 0x30)) - 32
            ls2 = ((sl >> 4) | ((sh << 2) & 0x30)) - 32
            sh = sh >> 4
            p1 = sdot16(iq4vals32(wr, o + 8 + 16 * ib), load32(aq, x + 32 * ib))
            p2 = sdot16(iq4vals32(wr, o + 24 + 16 * ib), load32(aq, x + 32 * ib + 32))
            sumi1 = add32(madd(p1, splat16(ls1)), sumi1)
            sumi2 = add32(madd(p2, splat16(ls2)), sumi2)
        acc = fma(f16at(wr, o) * ad[i], add32(sumi1, sumi2), acc)
    return hsumf(acc)


# One kernel per type, kquant.matmul.cpu's signature: w uint8 (rows, row_bytes); aq int8
# (n_tok, k); ad float32 (n_tok, blocks); the third array (Q8_0's d again, Q8_K's bsums) is
# unused; out float32 (n_tok, rows). Weight rows in parallel, each against every token.

@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq4_nl(w, aq, ad, unused, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _nl_row(w[r], aq[t], ad[t])


@njit(cache=True, error_model="numpy", parallel=True)
def mm_iq4_xs(w, aq, ad, unused, out):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _xs_row(w[r], aq[t], ad[t])
