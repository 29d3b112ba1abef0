"""Dot products of the K-quants (Q2_K..Q6_K) with Q8_K activations: ggml's
ggml_vec_dot_q*_K_q8_K, AVX2 version, ported operation for operation onto kquant.matmul.simd.

Weight blocks (256 values, ggml-common.h):
  Q2_K  (84 B): scales[16] (scale | min << 4), qs[64] (2-bit), d, dmin
  Q3_K (110 B): hmask[32], qs[64] (low 2 bits), scales[12] (6-bit, signed - 32), d
  Q4_K (144 B): d, dmin, scales[12] (6-bit scales and mins), qs[128] (nibbles)
  Q5_K (176 B): d, dmin, scales[12], qh[32] (5th bits), qs[128]
  Q6_K (210 B): ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] (int8), d
Activation block (Q8_K): d (float32), qs[256] (int8), bsums[16] (int16 sums of 16 quants).

Per super-block, as ggml: an exact int32 sum  sumi = sum_j scale_j * sum_{l in j} q_l * a_l  in
8 lanes (`vpmaddubsw` of quants and activations, `vpmaddwd` with the sub-block scales), then
float lanes  acc = fma(a.d * w.d, float(sumi), acc)  (one rounding, as _mm256_fmadd_ps).
Q6_K takes its -32 offset as 32 * sum_j scale_j * bsums_j, Q3_K its -4 (high bit clear) as
a second maddubs. The mins (dmin = -a.d * w.dmin, m = sum_j min_j * bsums_j) go where ggml
puts them: Q2_K into the same 8 lanes before the scales (acc = fma(dmin, float(m lanes),
acc)); Q4_K into 4 lanes (ggml's acc_m: min 2k and 2k+1 against bsums 4k..4k+3), summed as
(l0 + l2) + (l1 + l3) and added to the lane sum; Q5_K as one float, summs = fma(dmin,
float(m), summs). The 8 lanes are added up once per row in hsum_float_8's order. The
result is bit for bit ggml's AVX2 vec_dot (the integer lane sums are exact, every float
operation is ggml's, in its order; tests/test_matmul_cpu.py checks the bits).

AVX2 check, `python -m kquant.matmul.asm Q2_K Q3_K Q4_K Q5_K Q6_K --dump DIR` (this
project's AMD EPYC): all ymm code, per super-block 8 vpmaddubsw (16 for Q3_K: low bits and
high bits), 8-9 vpmaddwd with the scales (broadcast by vpshufb, vpermq), vpaddd, then one
vcvtdq2ps + vfmadd231ps (two with mins); the scale bytes unpack with ggml's 32-bit shifts
and masks and widen by vpmovzxbw / vpmovsxbw; d and dmin by one vcvtph2ps (f16x2); no
float64. The super-block loop is, in instructions (ggml's AVX2 loop in libggml-cpu.so, by
objdump): Q2_K 90 (80), Q3_K 143 (140), Q4_K 96 (99), Q5_K 120 (134), Q6_K 94 (99).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prims import F32, fma32, load_u32
from .simd import (add32, add8, and8, andnot8, f16x2, fma, from_u32x4, hadd32, halves16, hsum32,
                   hsum4, hsumf, lane16, lane16x2, load16, load32, load_i16, madd, maddubs, or8,
                   pairs16, sext16, shl32, shl8, shr8, sub16, sub32, sub8, zero32, zerof, zext16)

_K1 = np.uint32(0x3F3F3F3F)
_K2 = np.uint32(0x0F0F0F0F)
_K3 = np.uint32(0x03030303)
_ZERO = np.float32(0.0)


@njit(cache=True, error_model="numpy", inline="always")
def _q2_k(wr, aq, ad, bs):
    acc = zerof()
    for i in range(ad.shape[0]):
        o = i * 84
        x = i * 256
        wd, wm = f16x2(wr, o + 80)
        d = ad[i] * wd
        dmin = -ad[i] * wm
        sc = load16(wr, o)
        scales = zext16(and8(sc, 15))
        mins = zext16(shr8(sc, 4))
        acc = fma(dmin, madd(mins, load_i16(bs, 16 * i)), acc)
        sumi = zero32()
        for j in range(2):
            q2 = load32(wr, o + 16 + 32 * j)
            sc = halves16(scales, j)
            for s in range(4):
                p = maddubs(and8(shr8(q2, 2 * s), 3), load32(aq, x + 128 * j + 32 * s))
                sumi = add32(sumi, madd(lane16x2(sc, 2 * s, 8 + 2 * s + 1), p))
        acc = fma(d, sumi, acc)
    return hsumf(acc)


@njit(cache=True, error_model="numpy", inline="always")
def _q3_k(wr, aq, ad, bs):
    acc = zerof()
    for i in range(ad.shape[0]):
        o = i * 110
        x = i * 256
        d = ad[i] * f16x2(wr, o + 106)[1]   # [0]: two scale bytes, unused
        a0 = load_u32(wr, o + 96)
        a1 = load_u32(wr, o + 100)
        a2 = load_u32(wr, o + 104)
        s128 = from_u32x4((a0 & _K2) | ((a2 & _K3) << 4),
                          (a1 & _K2) | (((a2 >> 2) & _K3) << 4),
                          ((a0 >> 4) & _K2) | (((a2 >> 4) & _K3) << 4),
                          ((a1 >> 4) & _K2) | (((a2 >> 6) & _K3) << 4))
        scales = sext16(sub8(s128, 32))
        hbits = load32(wr, o)
        sumi = zero32()
        for j in range(2):
            q3 = load32(wr, o + 32 + 32 * j)
            sc = halves16(scales, j)
            for s in range(4):
                bit = 4 * j + s
                lo = and8(shr8(q3, 2 * s), 3)
                hi = shl8(shr8(andnot8(hbits, 1 << bit), bit), 2)   # 4 where the bit is clear
                a = load32(aq, x + 128 * j + 32 * s)
                p = sub16(maddubs(lo, a), maddubs(hi, a))
                sumi = add32(sumi, madd(lane16x2(sc, 2 * s, 8 + 2 * s + 1), p))
        acc = fma(d, sumi, acc)
    return hsumf(acc)


@njit(cache=True, error_model="numpy", inline="always")
def _k4_scales(wr, o):
    """Q4_K/Q5_K's 12 scale bytes -> int16 lanes 0-7 the 8 scales, 8-15 the 8 mins (ggml's
    utmp shuffle)."""
    u0 = load_u32(wr, o)
    u1 = load_u32(wr, o + 4)
    u2 = load_u32(wr, o + 8)
    return zext16(from_u32x4(u0 & _K1, (u2 & _K2) | (((u0 >> 6) & _K3) << 4), u1 & _K1,
                             ((u2 >> 4) & _K2) | (((u1 >> 6) & _K3) << 4)))


@njit(cache=True, error_model="numpy", inline="always")
def _q4_k(wr, aq, ad, bs):
    acc = zerof()
    accm = zerof()
    for i in range(ad.shape[0]):
        o = i * 144
        x = i * 256
        wd, wm = f16x2(wr, o)
        d = ad[i] * wd
        dmin = -ad[i] * wm
        ms = _k4_scales(wr, o + 4)
        # ggml's 4 lanes: mins 2k, 2k+1 against bsums 4k..4k+3 (lanes 4-7: a copy, unused)
        accm = fma(dmin, hadd32(madd(load_i16(bs, 16 * i), pairs16(ms, 8))), accm)
        sumi = zero32()
        for j in range(4):
            q4 = load32(wr, o + 16 + 32 * j)
            plo = maddubs(and8(q4, 15), load32(aq, x + 64 * j))
            phi = maddubs(shr8(q4, 4), load32(aq, x + 64 * j + 32))
            plo = madd(lane16(ms, 2 * j), plo)
            phi = madd(lane16(ms, 2 * j + 1), phi)
            sumi = add32(sumi, add32(plo, phi))
        acc = fma(d, sumi, acc)
    return hsumf(acc) + hsum4(accm)


@njit(cache=True, error_model="numpy", inline="always")
def _q5_k(wr, aq, ad, bs):
    acc = zerof()
    summs = _ZERO
    for i in range(ad.shape[0]):
        o = i * 176
        x = i * 256
        wd, wm = f16x2(wr, o)
        d = ad[i] * wd
        dmin = -ad[i] * wm
        ms = _k4_scales(wr, o + 4)
        summs = fma32(dmin, F32(hsum32(madd(load_i16(bs, 16 * i), pairs16(ms, 8)))), summs)
        hbits = load32(wr, o + 16)
        sumi = zero32()
        for j in range(4):
            q5 = load32(wr, o + 48 + 32 * j)
            b0 = 2 * j
            b1 = 2 * j + 1
            v0 = add8(and8(q5, 15), shl8(shr8(and8(hbits, 1 << b0), b0), 4))
            v1 = add8(shr8(q5, 4), shl8(shr8(and8(hbits, 1 << b1), b1), 4))
            p0 = maddubs(v0, load32(aq, x + 64 * j))
            p1 = maddubs(v1, load32(aq, x + 64 * j + 32))
            sumi = add32(sumi, add32(madd(lane16(ms, b0), p0), madd(lane16(ms, b1), p1)))
        acc = fma(d, sumi, acc)
    return hsumf(acc) + summs


@njit(cache=True, error_model="numpy", inline="always")
def _q6_k(wr, aq, ad, bs):
    acc = zerof()
    for i in range(ad.shape[0]):
        o = i * 210
        x = i * 256
        d = ad[i] * f16x2(wr, o + 206)[1]   # [0]: two scale bytes, unused
        scales = sext16(load16(wr, o + 192))
        sumi = zero32()
        for j in range(2):
            b1 = load32(wr, o + 64 * j)
            b2 = load32(wr, o + 64 * j + 32)
            h = load32(wr, o + 128 + 32 * j)
            v0 = or8(and8(b1, 15), shl8(and8(h, 3), 4))
            v1 = or8(and8(b2, 15), shl8(and8(h, 12), 2))
            v2 = or8(shr8(b1, 4), and8(h, 48))
            v3 = or8(shr8(b2, 4), shr8(and8(h, 192), 2))
            y = x + 128 * j
            sc = halves16(scales, j)
            p0 = madd(lane16x2(sc, 0, 9), maddubs(v0, load32(aq, y)))
            p1 = madd(lane16x2(sc, 2, 11), maddubs(v1, load32(aq, y + 32)))
            p2 = madd(lane16x2(sc, 4, 13), maddubs(v2, load32(aq, y + 64)))
            p3 = madd(lane16x2(sc, 6, 15), maddubs(v3, load32(aq, y + 96)))
            sumi = add32(sumi, add32(add32(p0, p1), add32(p2, p3)))
        sumi = sub32(sumi, shl32(madd(load_i16(bs, 16 * i), scales), 5))
        acc = fma(d, sumi, acc)
    return hsumf(acc)


# One kernel per type: weight rows in parallel, each row against every token while it is in
# cache. w: uint8 (rows, row_bytes); aq: int8 (n_tok, k); ad: float32 (n_tok, k/256);
# bs: int16 bsums (n_tok, k/16); out: float32 (n_tok, rows).

@njit(cache=True, error_model="numpy", inline="always")
def _rows(w, aq, ad, bs, out, row):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = row(w[r], aq[t], ad[t], bs[t])


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q2_k(w, aq, ad, bs, out):
    _rows(w, aq, ad, bs, out, _q2_k)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q3_k(w, aq, ad, bs, out):
    _rows(w, aq, ad, bs, out, _q3_k)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q4_k(w, aq, ad, bs, out):
    _rows(w, aq, ad, bs, out, _q4_k)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q5_k(w, aq, ad, bs, out):
    _rows(w, aq, ad, bs, out, _q5_k)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q6_k(w, aq, ad, bs, out):
    _rows(w, aq, ad, bs, out, _q6_k)
