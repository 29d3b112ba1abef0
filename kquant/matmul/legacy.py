"""Dot products of the 32-value block types with 8-bit activations (ggml's vec_dot):
Q4_0, Q5_0, Q8_0 against Q8_0 and Q4_1, Q5_1 against Q8_1.

Weight layouts (ggml-common.h; fp16 scales little-endian):
  Q4_0 (18 B): d, qs[16]          Q4_1 (20 B): d, m, qs[16]
  Q5_0 (22 B): d, qh[4], qs[16]   Q5_1 (24 B): d, m, qh[4], qs[16]
  Q8_0 (34 B): d, qs[32] (int8)
Value j of a block is qs[j] & 15 (j < 16) or qs[j - 16] >> 4, plus bit j of qh times 16.

Per block, as ggml's ggml_vec_dot_q*_q8_* (a: activation block, w: weight block):
  Q4_0: w.d * a.d * sum((q - 8) * a.q)       Q5_0: w.d * a.d * sum((q - 16) * a.q)
  Q8_0: w.d * a.d * sum(q * a.q)
  Q4_1, Q5_1: w.d * a.d * sum(q * a.q) + w.m * a.s      (a.s = fp16(a.d * sum(a.q)))
The integer sums are exact and land in 8 int32 lanes per block (ggml's mul_sum_*_pairs);
the lanes are converted and added into 8 float lanes with one fused multiply-add a block,
block after block, (w.d * a.d) the scale, as ggml's _mm256_fmadd_ps; Q4_1 / Q5_1's
w.m * a.s go, block after block, into a scalar fma chain (ggml's `summs`, fused by gcc);
the lanes are summed once per row in hsum_float_8's order, then + summs. The result is bit
for bit ggml's AVX2 vec_dot (tests/test_matmul_cpu.py checks the bits). Q4_0 / Q5_0 take
their offset as maddubs(q, a) -
maddubs(8 or 16, a) (exact in int16), where ggml subtracts first and uses the sign trick;
Q8_0 uses ggml's sign trick (vpsignb). Blocks go 8 at a time so the 8 fp16 weight scales are
widened by one vcvtph2ps (8 16-bit loads + vpinsrw) and multiplied by 8 activation scales at
once.

AVX2 check, `python -m kquant.matmul.asm Q4_0 Q4_1 Q5_0 Q5_1 Q8_0` (this project's AMD EPYC,
counts over the whole kernel): ymm code throughout, per block one vpmaddubsw (two for
Q4_0 / Q5_0) + one vpmaddwd + vcvtdq2ps + vfmadd231ps; nibbles from vpsrlw + vpand +
vinserti128, Q5's fifth bits from ggml's vpbroadcastd + vpshufb + vpor + vpcmpeqb; Q8_0
vpsignb x2; no float64 (vcvtss2sd/vaddsd). Instructions per block in the 8-block loop (ggml's
AVX2 loop in libggml-cpu.so, by objdump): Q4_0 15.9 (22), Q4_1 14.4 (22), Q5_0 21.9 (27),
Q5_1 22 (28), Q8_0 12.9 (17).
"""
from __future__ import annotations

from numba import njit, prange

from .prims import F32, fma32, load_f16, load_u32
from .simd import (and8, bitmask32, dot8, dotu8, dotu8_off, f16at, f16x8, fma,
                   hsumf, lanef, load32, loadf, mulf, nibbles32, or8, zerof)

_ZERO = F32(0.0)


# The integer part of one block against its activation block: 8 int32 lanes.

@njit(cache=True, error_model="numpy", inline="always")
def _i_q4_0(wr, aq, b):
    return dotu8_off(nibbles32(wr, b * 18 + 2), load32(aq, b * 32), 8)


@njit(cache=True, error_model="numpy", inline="always")
def _i_q5_0(wr, aq, b):
    o = b * 22
    qx = or8(nibbles32(wr, o + 6), and8(bitmask32(load_u32(wr, o + 2)), 0x10))
    return dotu8_off(qx, load32(aq, b * 32), 16)


@njit(cache=True, error_model="numpy", inline="always")
def _i_q8_0(wr, aq, b):
    return dot8(load32(wr, b * 34 + 2), load32(aq, b * 32))


@njit(cache=True, error_model="numpy", inline="always")
def _i_q4_1(wr, aq, b):
    return dotu8(nibbles32(wr, b * 20 + 4), load32(aq, b * 32))


@njit(cache=True, error_model="numpy", inline="always")
def _i_q5_1(wr, aq, b):
    o = b * 24
    qx = or8(nibbles32(wr, o + 8), and8(bitmask32(load_u32(wr, o + 4)), 0x10))
    return dotu8(qx, load32(aq, b * 32))


# A row against Q8_0 activations: the sum over blocks of (w.d * a.d) * sumi into 8 float
# lanes, block after block with a fused multiply-add, as ggml; `with_m` (Q4_1 / Q5_1
# against Q8_1) adds, block after block, fma(w.m, a.s, summs) into a float (ggml's scalar
# `summs += m * s`, which gcc fuses into vfmadd231ss), each m converted by its own
# vcvtph2ps (f16at: cheaper than gathering 8 and taking the lanes apart for the chain).
# Blocks go 8 at a time so their 8 fp16 scales d convert in one vector (then each is
# broadcast to its block's lanes); the last nb % 8 blocks one by one. with_m is a constant:
# LLVM drops the m terms where it is False.

@njit(cache=True, error_model="numpy", inline="always")
def _row(wr, aq, ad, as_, bsize, blk, with_m):
    nb = ad.shape[0]
    acc = zerof()
    summs = _ZERO
    g8 = nb - nb % 8
    for b0 in range(0, g8, 8):
        if with_m:
            for b in range(b0, b0 + 8):
                summs = fma32(f16at(wr, b * bsize + 2), as_[b], summs)
        dd = mulf(f16x8(wr, b0 * bsize, bsize), loadf(ad, b0))
        # written out: a lane index LLVM cannot see as a constant goes through the stack
        acc = fma(lanef(dd, 0), blk(wr, aq, b0), acc)
        acc = fma(lanef(dd, 1), blk(wr, aq, b0 + 1), acc)
        acc = fma(lanef(dd, 2), blk(wr, aq, b0 + 2), acc)
        acc = fma(lanef(dd, 3), blk(wr, aq, b0 + 3), acc)
        acc = fma(lanef(dd, 4), blk(wr, aq, b0 + 4), acc)
        acc = fma(lanef(dd, 5), blk(wr, aq, b0 + 5), acc)
        acc = fma(lanef(dd, 6), blk(wr, aq, b0 + 6), acc)
        acc = fma(lanef(dd, 7), blk(wr, aq, b0 + 7), acc)
    for b in range(g8, nb):
        if with_m:
            summs = fma32(load_f16(wr, b * bsize + 2), as_[b], summs)
        acc = fma(load_f16(wr, b * bsize) * ad[b], blk(wr, aq, b), acc)
    if with_m:
        return hsumf(acc) + summs
    return hsumf(acc)


# One kernel per type: weight rows in parallel, each row against every token while it is in
# cache. w: uint8 (rows, row_bytes); aq: int8 (n_tok, k); ad: float32 (n_tok, k/32);
# as_: Q8_1's s, float32 (n_tok, k/32) (ignored for Q8_0); out: float32 (n_tok, rows).

@njit(cache=True, error_model="numpy", inline="always")
def _rows(w, aq, ad, as_, out, bsize, blk, with_m):
    for r in prange(w.shape[0]):
        for t in range(aq.shape[0]):
            out[t, r] = _row(w[r], aq[t], ad[t], as_[t], bsize, blk, with_m)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q4_0(w, aq, ad, as_, out):
    _rows(w, aq, ad, as_, out, 18, _i_q4_0, False)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q5_0(w, aq, ad, as_, out):
    _rows(w, aq, ad, as_, out, 22, _i_q5_0, False)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q8_0(w, aq, ad, as_, out):
    _rows(w, aq, ad, as_, out, 34, _i_q8_0, False)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q4_1(w, aq, ad, as_, out):
    _rows(w, aq, ad, as_, out, 20, _i_q4_1, True)


@njit(cache=True, error_model="numpy", parallel=True)
def mm_q5_1(w, aq, ad, as_, out):
    _rows(w, aq, ad, as_, out, 24, _i_q5_1, True)
