"""Block decoders for the CUDA matmul kernels (kquant.matmul.cuda): one lane's share of a block.

A row of ggml blocks is cut into *slices*: lane `s` (0 <= s < lanes) of block `blk` of row
`row` (an unsigned integer) decodes
`runs * run_len` values, `run_len` consecutive values starting at `run_start(s, r)` for each
run r, into `vals[r * run_len + c]` as float32. The slices of one block cover it exactly,
and slice ids `blk * lanes + s` taken in order cover the row 128 values at a time (the tiled
kernel's chunk), so both kernels can share these decoders:

    type        values/block  lanes  runs x len  a lane reads
    Q2_K        256           16     4 x 4       one 32-bit word of qs, 2 words of scales
    Q3_K        256           16     4 x 4       1 word of qs, 1 of hmask, 3 of scales
    Q4_K/Q5_K   256           16     2 x 8       2 words of qs (+2 of qh), 3 of scales
    Q6_K        256           16     4 x 4       2 words of ql, 1 of qh, 2 of scales
    Q4_0..Q5_1  32            4      2 x 4       1 word of qs (+1 of qh)
    Q8_0        32            4      2 x 4       2 words of qs
    IQ4_NL      32            4      2 x 4       1 word of qs (Q4_0's slices, table levels)
    IQ4_XS      256           16     2 x 8       2 words of qs, 2 of d and scales
    IQ3_XXS     256           16     2 x 8       1 word of qs (4 grid indices), 1 of signs
    IQ3_S       256           16     2 x 8       1 word of qs, 1 of qh, signs, scales each
    IQ2_*/IQ1_* 256           16     2 x 8       2 groups of 8: their index bytes / words, a scale
    F32/F16/BF16 128          32     4x1 / 2x2   consecutive elements, lane-interleaved

Lanes with consecutive `s` read consecutive bytes of the block, so a warp's loads coalesce.
Each value is ggml's dequantized float32 (`dequantize_row_*`, same formula and operation
order; on a GPU the compiler may fuse a multiply-add, which changes the last bit at most).

Integers become floats without int-to-float conversions (a quarter-rate instruction on NVIDIA
GPUs): a level 0 <= q < 2^23 OR-ed into the bits of 2^23 is the float 2^23 + q, and subtracting
2^23 (+ the type's offset) gives q (- offset) exactly.

Words are read through an integer view of the raw block bytes: uint32 for types whose blocks
are a multiple of 4 bytes (Q2_K, Q4_K, Q5_K, Q4_1, Q5_1, IQ4_XS), uint16 pairs for the others
(Q3_K, Q6_K, Q4_0, Q5_0, Q8_0, IQ4_NL, IQ3_XXS, IQ3_S, whose blocks are only 2-byte aligned),
and the fp16 scales through a float16 view of the same bytes. Everything is widened to int64 before shifting, so Python's
numpy scalars (the CUDA simulator) and Numba agree bit for bit; LLVM narrows the arithmetic
back to 32 bits where it can.

These are plain Python functions registered with `register_jitable`: importing this module
needs no GPU and no numba.cuda; Numba compiles them for the kernels that call them, and the
CUDA simulator (and the tests, directly) run them as Python.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T
from numba.extending import register_jitable

from ..codecs.iq3_grids import IQ3S_GRID, IQ3XXS_GRID
from ..types import TYPES, QuantType


def _dev(fn):
    """A device helper: plain Python outside Numba, a device function inside a kernel.

    NVVM inlines them all (the PTX has no calls and no local memory); inlining them at
    Numba's IR level instead gives the same code, compiles 3-5x slower and trips a pedantic
    Numba SSA warning on the conditional expressions."""
    return register_jitable(inline="never")(fn)


_F = np.float32
_TWO23 = _F(8388608.0)          # 2^23
_TWO23_4 = _F(8388612.0)        # 2^23 + 4   (Q3_K levels are q - 4)
_TWO23_8 = _F(8388616.0)        # 2^23 + 8   (Q4_0)
_TWO23_16 = _F(8388624.0)       # 2^23 + 16  (Q5_0)
_TWO23_32 = _F(8388640.0)       # 2^23 + 32  (Q6_K levels, Q3_K scales)
_TWO23_128 = _F(8388736.0)      # 2^23 + 128 (int8 stored with its sign bit flipped)
_ZERO = _F(0.0)


@_dev
def _lvl(bits):
    """The float 2^23 + bits, for an integer 0 <= bits < 2^23 (exact, no conversion)."""
    return np.uint32(bits | 0x4B000000).view(np.float32)


@_dev
def _u(bits):
    """float32(bits) for an integer 0 <= bits < 2^23, exactly."""
    return _lvl(bits) - _TWO23


# Indices are converted to unsigned before indexing: Numba then omits its negative-index
# wraparound, which costs several 64-bit instructions per load on a GPU. `row` arrives as
# an unsigned integer from the kernels.

@_dev
def _w16(q, row, i):
    """The little-endian 32-bit word in uint16 elements i, i+1 of a row (as int64)."""
    return np.int64(q[row, np.uint64(i)]) | (np.int64(q[row, np.uint64(i + 1)]) << 16)


@_dev
def _w32(q, row, i):
    return np.int64(q[row, np.uint64(i)])


@_dev
def _f16(h, row, i):
    return np.float32(h[row, np.uint64(i)])


# --- K-quants: 256 values, 16 lanes of 16 values -------------------------------------------

@_dev
def _start_2bit(s, r):
    """Q2_K / Q3_K / Q6_K: lane s holds bytes 4(s&7).. of its 128-value half's planes."""
    return 128 * (s >> 3) + 32 * r + 4 * (s & 7)


@_dev
def _start_4bit(s, r):
    """Q4_K / Q5_K: lane s holds bytes 8s..8s+7 of qs: low nibbles, then high nibbles."""
    return 64 * (s >> 2) + 32 * r + 8 * (s & 3)


@_dev
def deq_q2_k(q, h, row, blk, s, n, vals):
    # block_q2_K: scales[16] @0, qs[64] @16, d @80, dmin @82; 21 uint32 words
    o = blk * 21
    d = _f16(h, row, blk * 42 + 40)
    dmin = _f16(h, row, blk * 42 + 41)
    w = _w32(q, row, o + 4 + s)              # qs bytes 32h + 16g + 4(s&3), h = s>>3, g = (s>>2)&1
    hh = s >> 3
    g = (s >> 2) & 1
    sa = _w32(q, row, o + 2 * hh)            # scales of this half: bytes 8h .. 8h+3
    sb = _w32(q, row, o + 2 * hh + 1)        # bytes 8h+4 .. 8h+7
    for r in range(4):                       # shift plane r: sub-block 8h + 2r + g
        sw = sa if r < 2 else sb
        sc = (sw >> (8 * (2 * (r & 1) + g))) & 0xFF
        dl = d * _u(sc & 0xF)
        ml = dmin * _u(sc >> 4)
        for c in range(4):
            vals[4 * r + c] = dl * _u((w >> (8 * c + 2 * r)) & 3) - ml


@_dev
def deq_q3_k(q, h, row, blk, s, n, vals):
    # block_q3_K: hmask[32] @0, qs[64] @32, scales[12] @96, d @108; 55 uint16
    o = blk * 55
    d = _f16(h, row, o + 54)
    hh = s >> 3
    g = (s >> 2) & 1
    t = s & 7
    w = _w16(q, row, o + 16 + 16 * hh + 2 * t)   # qs bytes 32h + 4t
    m = _w16(q, row, o + 2 * t)                  # hmask bytes 4t (bit 4h + r is the high bit)
    s0 = _w16(q, row, o + 48)                    # scales bytes 0-3
    s1 = _w16(q, row, o + 50)                    # 4-7
    s2 = _w16(q, row, o + 52)                    # 8-11
    for r in range(4):                           # sub-block j = 8h + 2r + g
        sh = 8 * (2 * (r & 1) + g)               # byte (2r+g) & 3 of s0 (r < 2) or s1
        lo = ((s0 if r < 2 else s1) >> (sh + 4 * hh)) & 0xF
        hi = (s2 >> (sh + 2 * (2 * hh + (r >> 1)))) & 3
        dl = d * (_lvl(lo | (hi << 4)) - _TWO23_32)
        for c in range(4):
            low = (w >> (8 * c + 2 * r)) & 3
            high = (m >> (8 * c + 4 * hh + r)) & 1
            vals[4 * r + c] = dl * (_lvl(low | (high << 2)) - _TWO23_4)


@_dev
def _scale_min_k4(j, s0, s1, s2):
    """ggml's get_scale_min_k4 from the 12 scale bytes held in three words."""
    if j < 4:
        return (s0 >> (8 * j)) & 63, (s1 >> (8 * j)) & 63
    jj = j - 4
    b = (s2 >> (8 * jj)) & 0xFF
    sc = (b & 0xF) | (((s0 >> (8 * jj + 6)) & 3) << 4)
    mn = (b >> 4) | (((s1 >> (8 * jj + 6)) & 3) << 4)
    return sc, mn


@_dev
def _scales_mins_k4(q, h, row, blk, s, words):
    """Q4_K/Q5_K (blocks of `words` uint32: d, dmin, then the 12 scale bytes): the factors
    d1, m1, d2, m2 of sub-blocks 2j, 2j+1, j = s >> 2, the pair slice s reads."""
    o = blk * words
    d = _f16(h, row, 2 * o)
    dmin = _f16(h, row, 2 * o + 1)
    s0 = _w32(q, row, o + 1)
    s1 = _w32(q, row, o + 2)
    s2 = _w32(q, row, o + 3)
    j = s >> 2
    sc, mn = _scale_min_k4(2 * j, s0, s1, s2)
    d1 = d * _u(sc)
    m1 = dmin * _u(mn)
    sc, mn = _scale_min_k4(2 * j + 1, s0, s1, s2)
    return d1, m1, d * _u(sc), dmin * _u(mn)


@_dev
def deq_q4_k(q, h, row, blk, s, n, vals):
    # block_q4_K: d @0, dmin @2, scales[12] @4, qs[128] @16; 36 uint32 words
    o = blk * 36
    d1, m1, d2, m2 = _scales_mins_k4(q, h, row, blk, s, 36)
    wa = _w32(q, row, o + 4 + 2 * s)
    wb = _w32(q, row, o + 5 + 2 * s)
    for c in range(4):
        vals[c] = d1 * _u((wa >> (8 * c)) & 0xF) - m1
        vals[4 + c] = d1 * _u((wb >> (8 * c)) & 0xF) - m1
        vals[8 + c] = d2 * _u((wa >> (8 * c + 4)) & 0xF) - m2
        vals[12 + c] = d2 * _u((wb >> (8 * c + 4)) & 0xF) - m2


@_dev
def deq_q5_k(q, h, row, blk, s, n, vals):
    # block_q5_K: d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48; 44 uint32 words
    o = blk * 44
    j = s >> 2
    d1, m1, d2, m2 = _scales_mins_k4(q, h, row, blk, s, 44)
    ha = _w32(q, row, o + 4 + 2 * (s & 3))     # qh bytes 8(s&3) .. +7: bit 2j / 2j+1
    hb = _w32(q, row, o + 5 + 2 * (s & 3))
    wa = _w32(q, row, o + 12 + 2 * s)
    wb = _w32(q, row, o + 13 + 2 * s)
    for c in range(4):
        sh = 8 * c
        lo = sh + 2 * j                         # qh bit of sub-block 2j for byte c
        vals[c] = d1 * _u(((wa >> sh) & 0xF) | (((ha >> lo) & 1) << 4)) - m1
        vals[4 + c] = d1 * _u(((wb >> sh) & 0xF) | (((hb >> lo) & 1) << 4)) - m1
        vals[8 + c] = d2 * _u(((wa >> (sh + 4)) & 0xF) | (((ha >> (lo + 1)) & 1) << 4)) - m2
        vals[12 + c] = d2 * _u(((wb >> (sh + 4)) & 0xF) | (((hb >> (lo + 1)) & 1) << 4)) - m2


@_dev
def deq_q6_k(q, h, row, blk, s, n, vals):
    # block_q6_K: ql[128] @0, qh[64] @128, scales[16] (int8) @192, d @208; 105 uint16
    o = blk * 105
    d = _f16(h, row, o + 104)
    hh = s >> 3
    t = s & 7
    sub = (s >> 2) & 1
    qa = _w16(q, row, o + 32 * hh + 2 * t)        # ql bytes 64h + 4t      (planes 0 and 2)
    qb = _w16(q, row, o + 32 * hh + 16 + 2 * t)   # ql bytes 64h + 32 + 4t (planes 1 and 3)
    qh = _w16(q, row, o + 64 + 16 * hh + 2 * t)   # qh bytes 32h + 4t
    sa = _w16(q, row, o + 96 + 4 * hh)            # scales bytes 8h .. 8h+3
    sb = _w16(q, row, o + 98 + 4 * hh)            # 8h+4 .. 8h+7
    for r in range(4):                            # plane r: scale sub + 2r
        sw = sa if r < 2 else sb
        b = (sw >> (8 * (2 * (r & 1) + sub))) & 0xFF
        ds = d * (_lvl(b ^ 0x80) - _TWO23_128)    # d * (int8)scale, as ggml: (d * sc) * q
        ql = qa if (r & 1) == 0 else qb
        for c in range(4):
            lv = ((ql >> (8 * c + 4 * (r >> 1))) & 0xF) | (((qh >> (8 * c + 2 * r)) & 3) << 4)
            vals[4 * r + c] = ds * (_lvl(lv) - _TWO23_32)


# --- legacy 32-value blocks: 4 lanes of 8 values ---------------------------------------------

@_dev
def _start_legacy(s, r):
    """Q4_0/Q4_1/Q5_0/Q5_1: lane s holds qs bytes 4s..4s+3: values 4s.. and 16+4s.."""
    return 4 * s + 16 * r


@_dev
def _start_q8_0(s, r):
    return 8 * s + 4 * r


@_dev
def deq_q4_0(q, h, row, blk, s, n, vals):
    # block_q4_0: d @0, qs[16] @2; 9 uint16
    o = blk * 9
    d = _f16(h, row, o)
    w = _w16(q, row, o + 1 + 2 * s)
    for c in range(4):
        vals[c] = (_lvl((w >> (8 * c)) & 0xF) - _TWO23_8) * d
        vals[4 + c] = (_lvl((w >> (8 * c + 4)) & 0xF) - _TWO23_8) * d


@_dev
def deq_q4_1(q, h, row, blk, s, n, vals):
    # block_q4_1: d @0, m @2, qs[16] @4; 5 uint32 words
    d = _f16(h, row, blk * 10)
    m = _f16(h, row, blk * 10 + 1)
    w = _w32(q, row, blk * 5 + 1 + s)
    for c in range(4):
        vals[c] = _u((w >> (8 * c)) & 0xF) * d + m
        vals[4 + c] = _u((w >> (8 * c + 4)) & 0xF) * d + m


@_dev
def deq_q5_0(q, h, row, blk, s, n, vals):
    # block_q5_0: d @0, qh[4] @2, qs[16] @6; 11 uint16
    o = blk * 11
    d = _f16(h, row, o)
    qh = _w16(q, row, o + 1)
    w = _w16(q, row, o + 3 + 2 * s)
    for c in range(4):
        j = 4 * s + c
        x0 = ((w >> (8 * c)) & 0xF) | (((qh >> j) & 1) << 4)
        x1 = ((w >> (8 * c + 4)) & 0xF) | (((qh >> (j + 16)) & 1) << 4)
        vals[c] = (_lvl(x0) - _TWO23_16) * d
        vals[4 + c] = (_lvl(x1) - _TWO23_16) * d


@_dev
def deq_q5_1(q, h, row, blk, s, n, vals):
    # block_q5_1: d @0, m @2, qh[4] @4, qs[16] @8; 6 uint32 words
    d = _f16(h, row, blk * 12)
    m = _f16(h, row, blk * 12 + 1)
    qh = _w32(q, row, blk * 6 + 1)
    w = _w32(q, row, blk * 6 + 2 + s)
    for c in range(4):
        j = 4 * s + c
        x0 = ((w >> (8 * c)) & 0xF) | (((qh >> j) & 1) << 4)
        x1 = ((w >> (8 * c + 4)) & 0xF) | (((qh >> (j + 16)) & 1) << 4)
        vals[c] = _u(x0) * d + m
        vals[4 + c] = _u(x1) * d + m


@_dev
def deq_q8_0(q, h, row, blk, s, n, vals):
    # block_q8_0: d @0, qs[32] (int8) @2; 17 uint16
    o = blk * 17
    d = _f16(h, row, o)
    for r in range(2):
        w = _w16(q, row, o + 1 + 4 * s + 2 * r)
        for c in range(4):
            vals[4 * r + c] = (_lvl(((w >> (8 * c)) & 0xFF) ^ 0x80) - _TWO23_128) * d


# --- IQ4: indices into kvalues_iq4nl ----------------------------------------------------------
# The table's 16 signed bytes (as stored, two's complement) in four 32-bit words, bytes 4j..4j+3
# in word j: a lane picks its level with shifts, no memory table.
_KV_WORDS = tuple(int.from_bytes(bytes(v & 0xFF for v in (-127, -104, -83, -65, -49, -35, -22, -10,
                                                          1, 13, 25, 38, 53, 69, 89, 113)
                                       [4 * j:4 * j + 4]), "little") for j in range(4))
_KV0, _KV1, _KV2, _KV3 = (np.int64(w) for w in _KV_WORDS)


@_dev
def _kv(i):
    """float32(kvalues_iq4nl[i]) for an index 0 <= i < 16, exactly."""
    j = i >> 2
    w = _KV0 if j == 0 else _KV1 if j == 1 else _KV2 if j == 2 else _KV3
    return _lvl(((w >> (8 * (i & 3))) & 0xFF) ^ 0x80) - _TWO23_128


@_dev
def _start_iq4_xs(s, r):
    """IQ4_XS: lane s holds qs bytes 8s..8s+7, half s & 1 of sub-block s >> 1: values
    32(s >> 1) + 8(s & 1).. (low nibbles) and 16 more (high nibbles)."""
    return 32 * (s >> 1) + 16 * r + 8 * (s & 1)


@_dev
def deq_iq4_nl(q, h, row, blk, s, n, vals):
    # block_iq4_nl: d @0, qs[16] @2; 9 uint16 (lanes sliced as Q4_0's)
    o = blk * 9
    d = _f16(h, row, o)
    w = _w16(q, row, o + 1 + 2 * s)
    for c in range(4):
        vals[c] = d * _kv((w >> (8 * c)) & 0xF)
        vals[4 + c] = d * _kv((w >> (8 * c + 4)) & 0xF)


@_dev
def deq_iq4_xs(q, h, row, blk, s, n, vals):
    # block_iq4_xs: d @0, scales_h @2, scales_l[4] @4, qs[128] @8; 34 uint32 words
    o = blk * 34
    d = _f16(h, row, 2 * o)
    ib = s >> 1
    sh = _w32(q, row, o) >> 16
    sl = _w32(q, row, o + 1)
    ls = ((sl >> (8 * (ib >> 1) + 4 * (ib & 1))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
    dl = d * (_lvl(ls) - _TWO23_32)
    for r in range(2):
        w = _w32(q, row, o + 2 + 2 * s + r)
        for c in range(4):
            vals[4 * r + c] = dl * _kv((w >> (8 * c)) & 0xF)
            vals[8 + 4 * r + c] = dl * _kv((w >> (8 * c + 4)) & 0xF)


# --- IQ3: grid points of 4 unsigned bytes, signs per value -----------------------------------
# The grids as int64 (a lane shifts its bytes out; in a CUDA kernel, global arrays become
# constant memory); KSIGNS: 7 sign bits with their parity as the 8th (ksigns_iq2xs).
_GRID_XXS = np.array(IQ3XXS_GRID, np.int64)
_GRID_S = np.array(IQ3S_GRID, np.int64)
_KSIGNS = np.array([i | (bin(i).count("1") % 2) << 7 for i in range(128)], np.int64)
_HALF = _F(0.5)


# --- grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): groups of 8 values from a table ------
# Lane s of a 256-value block decodes values 16s..16s+15: groups 2s, 2s+1 of 8 (32-value chunk
# s >> 1, its half s & 1). The grids are read as bytes of module-level tables (constant arrays
# in a kernel), each value ggml's dequantize_row_*: IQ2 d * (0.5 + s) * 0.25 * grid * sign,
# IQ1 d * (2s + 1) * (grid + delta).
from .iq_grids import IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID  # noqa: E402

_G2XXS = IQ2XXS_GRID.view(np.uint8)
_G2XS = IQ2XS_GRID.view(np.uint8)
_G2S = IQ2S_GRID.view(np.uint8)
_G1S = IQ1S_GRID.view(np.uint8)               # bytes 0xFF, 0, 1: the levels -1, 0, +1 (+ 1)
_QUARTER = _F(0.25)
_DELTA1 = _F(0.125)
_P112 = _F(2.0 ** 112)
_TWO23_1 = _F(8388609.0)        # 2^23 + 1   (iq1s_grid's levels, stored + 1)


@_dev
def _start_16(s, r):
    """IQ3_XXS, IQ3_S and the grid i-quants: lane s holds values 16s..16s+15 (half s & 1 of
    sub-block s >> 1) as 2 runs of 8 (IQ3: 4 grid points, 2 groups of 8 signs; the others:
    groups 2s and 2s + 1)."""
    return 16 * s + 8 * r


@_dev
def _iq3_put(vals, r, p, db, gw, sg):
    """Grid point p (4 values) of the lane's run r: db * level, negated where sign bit
    4p + c of sg is set (C's x * (bit ? -1.f : 1.f), a sign flip)."""
    for c in range(4):
        v = db * _u((gw >> (8 * c)) & 0xFF)
        vals[8 * r + 4 * p + c] = -v if (sg >> (4 * p + c)) & 1 else v


@_dev
def deq_iq3_xxs(q, h, row, blk, s, n, vals):
    # block_iq3_xxs: d @0, qs[64] @2, scales_and_signs[8] (u32) @66; 49 uint16
    o = blk * 49
    d = _f16(h, row, o)
    aux = _w16(q, row, o + 33 + 2 * (s >> 1))
    db = d * (_HALF + _u(aux >> 28)) * _HALF
    pts = _w16(q, row, o + 1 + 2 * s)            # qs bytes 4s..4s+3: the lane's 4 indices
    for r in range(2):
        sg = _KSIGNS[np.uint64((aux >> (7 * (2 * (s & 1) + r))) & 127)]
        for p in range(2):
            _iq3_put(vals, r, p, db, _GRID_XXS[np.uint64((pts >> (16 * r + 8 * p)) & 0xFF)], sg)


@_dev
def deq_iq3_s(q, h, row, blk, s, n, vals):
    # block_iq3_s: d @0, qs[64] @2, qh[8] @66, signs[32] @74, scales[4] @106; 55 uint16
    o = blk * 55
    d = _f16(h, row, o)
    ib = s >> 1
    db = d * _u(1 + 2 * ((_w16(q, row, o + 53) >> (4 * ib)) & 0xF))
    qh = (_w16(q, row, o + 33 + 2 * (ib >> 2)) >> (8 * (ib & 3))) & 0xFF
    sgw = _w16(q, row, o + 37 + 2 * ib)           # signs bytes 4ib..4ib+3
    pts = _w16(q, row, o + 1 + 2 * s)
    for r in range(2):
        l = 2 * (s & 1) + r                       # sign byte l, grid points 2l, 2l + 1
        sg = (sgw >> (8 * l)) & 0xFF
        for p in range(2):
            idx = ((pts >> (16 * r + 8 * p)) & 0xFF) | (((qh >> (2 * l + p)) & 1) << 8)
            _iq3_put(vals, r, p, db, _GRID_S[np.uint64(idx)], sg)


@_dev
def _byte16(q, row, i):
    """Byte i of a row read through its uint16 view."""
    return (np.int64(q[row, np.uint64(i >> 1)]) >> (8 * (i & 1))) & 0xFF


@_dev
def _half_bits(u):
    """The float32 of fp16 bits u (integer operations and one multiply, exact: prims.f16_to_f32)."""
    inf_nan = (((u & 0x7C00) + 0x0400) >> 15) * 0x70000000
    return np.uint32(((u & 0x8000) << 16) | (((u & 0x7FFF) << 13) + inf_nan)).view(np.float32) * _P112


@_dev
def _iq2_group(grid, gi, signs, db, vals, at):
    """8 values db * grid[gi][j] * (-1 where bit j of signs is set)."""
    for j in range(8):
        v = db * (_lvl(np.int64(grid[np.uint64(8 * gi + j)])) - _TWO23)
        vals[at + j] = -v if (signs >> j) & 1 else v


@_dev
def deq_iq2_xxs(q, h, row, blk, s, n, vals):
    # block_iq2_xxs: d @0, qs: 32 x u16 @2 (per 32 values: 4 grid bytes, then 4 x 7 sign bits
    # and the scale in the top 4); 33 uint16
    o = blk * 33
    d = _f16(h, row, o)
    c = s >> 1
    aux0 = _w16(q, row, o + 1 + 4 * c)
    aux1 = _w16(q, row, o + 3 + 4 * c)
    db = d * (_HALF + _u(aux1 >> 28)) * _QUARTER
    for g in range(2):
        lg = 2 * (s & 1) + g
        _iq2_group(_G2XXS, (aux0 >> (8 * lg)) & 0xFF,
                   np.int64(_KSIGNS[np.uint64((aux1 >> (7 * lg)) & 127)]), db, vals, 8 * g)


@_dev
def deq_iq2_xs(q, h, row, blk, s, n, vals):
    # block_iq2_xs: d @0, qs: 32 x u16 @2 (9-bit grid index, 7 sign bits), scales[8] @66; 37 uint16
    o = blk * 37
    d = _f16(h, row, o)
    c = s >> 1
    sc = _byte16(q, row, 2 * o + 66 + c)
    db = d * (_HALF + _u((sc >> (4 * (s & 1))) & 0xF)) * _QUARTER
    for g in range(2):
        w = np.int64(q[row, np.uint64(o + 1 + 2 * s + g)])
        _iq2_group(_G2XS, w & 511, np.int64(_KSIGNS[np.uint64(w >> 9)]), db, vals, 8 * g)


@_dev
def deq_iq2_s(q, h, row, blk, s, n, vals):
    # block_iq2_s: d @0, qs[32] @2, signs[32] @34, qh[8] @66, scales[8] @74; 41 uint16
    o = blk * 41
    b = 2 * o
    d = _f16(h, row, o)
    c = s >> 1
    sc = _byte16(q, row, b + 74 + c)
    qh = _byte16(q, row, b + 66 + c)
    db = d * (_HALF + _u((sc >> (4 * (s & 1))) & 0xF)) * _QUARTER
    for g in range(2):
        lg = 2 * (s & 1) + g
        gi = _byte16(q, row, b + 2 + 4 * c + lg) | ((qh << (8 - 2 * lg)) & 0x300)
        _iq2_group(_G2S, gi, _byte16(q, row, b + 34 + 4 * c + lg), db, vals, 8 * g)


@_dev
def _iq1_group(gi, dl, delta, vals, at):
    """8 values dl * (grid[gi][j] + delta), grid bytes -1, 0, +1."""
    for j in range(8):
        level = (np.int64(_G1S[np.uint64(8 * gi + j)]) + 1) & 0xFF      # 0, 1, 2
        vals[at + j] = dl * ((_lvl(level) - _TWO23_1) + delta)


@_dev
def deq_iq1_s(q, h, row, blk, s, n, vals):
    # block_iq1_s: d @0, qs[32] @2, qh: 8 x u16 @34 (3 index bits a group, scale, delta sign); 25 uint16
    o = blk * 25
    d = _f16(h, row, o)
    c = s >> 1
    qh = np.int64(q[row, np.uint64(o + 17 + c)])
    dl = d * _u(2 * ((qh >> 12) & 7) + 1)
    delta = -_DELTA1 if qh & 0x8000 else _DELTA1
    for g in range(2):
        lg = 2 * (s & 1) + g
        gi = _byte16(q, row, 2 * o + 2 + 4 * c + lg) | (((qh >> (3 * lg)) & 7) << 8)
        _iq1_group(gi, dl, delta, vals, 8 * g)


@_dev
def deq_iq1_m(q, h, row, blk, s, n, vals):
    # block_iq1_m: qs[32] @0, qh[16] @32, scales: 4 x u16 @48 (3-bit scales, the fp16 d in the
    # top nibbles); 14 uint32
    o = blk * 14
    w0 = _w32(q, row, o + 12)
    w1 = _w32(q, row, o + 13)
    u = (((w0 & 0xFFFF) >> 12) | (((w0 >> 16) >> 8) & 0xF0) | (((w1 & 0xFFFF) >> 4) & 0xF00)
         | ((w1 >> 16) & 0xF000))
    d = _half_bits(u)
    c = s >> 1
    sc = (w0 if c < 4 else w1) >> (16 * ((c >> 1) & 1))
    dl = d * _u(2 * ((sc >> (6 * (c & 1) + 3 * (s & 1))) & 7) + 1)
    qh = (_w32(q, row, o + 8 + (c >> 1)) >> (16 * (c & 1) + 8 * (s & 1))) & 0xFF
    qs = _w32(q, row, o + c)
    for g in range(2):
        lg = 2 * (s & 1) + g
        gi = ((qs >> (8 * lg)) & 0xFF) | ((qh << (8 - 4 * g)) & 0x700)
        _iq1_group(gi, dl, -_DELTA1 if (qh >> (3 + 4 * g)) & 1 else _DELTA1, vals, 8 * g)


# --- unquantized rows: virtual blocks of 128 values, 32 lanes ---------------------------------
# Rows of these types may have any length: values past the row's end decode as 0.

@_dev
def _start_f32(s, r):
    return 32 * r + s


@_dev
def _start_half(s, r):
    return 64 * r + 2 * s


@_dev
def deq_f32(q, h, row, blk, s, n, vals):
    for r in range(4):
        p = blk * 128 + 32 * r + s
        vals[r] = q[row, np.uint64(p)] if p < n else _ZERO


@_dev
def deq_f16(q, h, row, blk, s, n, vals):
    for r in range(2):
        for c in range(2):
            p = blk * 128 + 64 * r + 2 * s + c
            vals[2 * r + c] = _f16(h, row, p) if p < n else _ZERO


@_dev
def deq_bf16(q, h, row, blk, s, n, vals):
    for r in range(2):
        for c in range(2):
            p = blk * 128 + 64 * r + 2 * s + c
            vals[2 * r + c] = (np.uint32(np.int64(q[row, np.uint64(p)]) << 16).view(np.float32)
                               if p < n else _ZERO)


class Family(NamedTuple):
    """How one ggml type is sliced across lanes, and the device functions that decode it."""
    name: str
    qk: int                 # values per (virtual) block
    block_bytes: int        # bytes per block (per value for the float types)
    lanes: int              # lanes per block
    runs: int
    run_len: int
    view: str               # dtype of the integer view `q`: "u32", "u16" or "f32"
    deq: Callable
    run_start: Callable
    tail: bool = False      # rows need not be whole blocks (the float types)

    @property
    def vals(self) -> int:
        return self.runs * self.run_len


#: values per chunk of the tiled kernel; every family's slices tile it exactly
CHUNK = 128


# How a lane takes its values (runs x run_len of them, starting where run_start says), by the
# kquant.types records' cuda_family.
_SLICINGS = {"2bit": (4, 4, _start_2bit), "4bit": (2, 8, _start_4bit),
             "legacy": (2, 4, _start_legacy), "q8_0": (2, 4, _start_q8_0),
             "f32": (4, 1, _start_f32), "half": (2, 2, _start_half),
             "iq4_nl": (2, 4, _start_legacy), "iq4_xs": (2, 8, _start_iq4_xs),
             "iq3_xxs": (2, 8, _start_16), "iq3_s": (2, 8, _start_16), "grid": (2, 8, _start_16)}


def _family(r: QuantType) -> Family:
    """A type's Family: its record's slicing and geometry, its decoder deq_<name>. The float
    types (one value a block) are cut into virtual CHUNK-value blocks, and their rows may end
    inside one; a block's lanes take all its values; words are uint32 where every block starts
    4-byte aligned, else uint16 pairs (F32's are its floats)."""
    runs, run_len, run_start = _SLICINGS[r.cuda_family]
    qk = CHUNK if r.block_size == 1 else r.block_size
    view = "f32" if r.qtype == T.F32 else "u32" if r.type_size % 4 == 0 else "u16"
    deq = globals()[f"deq_{r.name.lower()}"]
    return Family(r.name, qk, r.type_size, qk // (runs * run_len), runs, run_len, view, deq,
                  run_start, tail=r.block_size == 1)


#: the family of every type whose kquant.types record names one, by type name
FAMILIES: dict[str, Family] = {r.name: _family(r) for r in TYPES.values() if r.cuda_family}

for _f in FAMILIES.values():
    assert _f.lanes * _f.vals == _f.qk and CHUNK % _f.vals == 0
    assert _f.qk % CHUNK == 0 or CHUNK % _f.qk == 0
del _f
