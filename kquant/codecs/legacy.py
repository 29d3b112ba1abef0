"""The legacy 32-value block types llama.cpp's mixes fall back to: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Layouts (ggml-common.h), little-endian f16 scales first:
  Q4_0 (18 B): d, qs[16]          Q4_1 (20 B): d, m, qs[16]
  Q5_0 (22 B): d, qh[4], qs[16]   Q5_1 (24 B): d, m, qh[4], qs[16]
  Q8_0 (34 B): d, qs[32] (int8)
Without an imatrix these are the quantize_row_*_ref functions; with one, the
quantize_row_*_impl functions, whose weights use the variance of the whole row.
Q8_0 ignores the imatrix, as ggml does.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .bits import F32, bits_f32, f32_bits, get_f16, put_f16
from .search import make_qkx_quants, make_qx_quants, workspace

QK = 32
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 4
BLOCK_BYTES = (18, 20, 22, 24, 34)

_ZERO = F32(0.0)
_ONE = F32(1.0)
_F128 = F32(128.0)
_F15 = F32(15.0)
_F16 = F32(16.0)
_MAG_MASK = np.int32(0x7FFFFFFF)
_KEY_FLT_MAX = np.int32(0x7F7FFFFF)  # order keys of +FLT_MAX and -FLT_MAX
_KEY_NEG_FLT_MAX = np.int32(-0x7F800000)
_KEY_INF = np.int32(0x7F800000)  # order keys of +inf and -inf
_KEY_NEG_INF = np.int32(-0x7F800001)
_FLT_MAX = F32(3.4028234663852886e38)


@njit(cache=True, error_model="numpy", inline="always")
def _trunc_i8(v):
    """C's (int8_t)(float): truncate toward zero, keep the low 8 bits (as gcc on x86 does)."""
    t = np.int64(v) & 0xFF
    return t - 256 if t > 127 else t


@njit(cache=True, error_model="numpy", inline="always")
def _roundf(v):
    """C's roundf (half away from zero); exact through float64 for float32 inputs."""
    a = math.floor(abs(np.float64(v)) + 0.5)
    return -a if v < 0 else a


@njit(cache=True, error_model="numpy", inline="always")
def _store_4bit(y, qs_pos, L):
    """Value j and j+16 share a byte, low nibble first. Unmasked, as the C: a wrapped
    negative level spills its high bits (truncated to the byte)."""
    for j in range(16):
        y[qs_pos + j] = L[j] | (L[j + 16] << 4)


@njit(cache=True, error_model="numpy", inline="always")
def _store_5bit(y, qh_pos, qs_pos, L):
    """Low nibbles into qs (value j and j+16 share a byte), fifth bits into the 32-bit qh."""
    qh = 0
    for j in range(16):
        xi0 = L[j] & 0xFF
        xi1 = L[j + 16] & 0xFF
        y[qs_pos + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + 16)
    for k in range(4):
        y[qh_pos + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True, error_model="numpy", inline="always")
def _abs_max(x):
    """The signed value of largest magnitude, the first one on ties, NaNs passed over."""
    amax = _ZERO
    max_ = _ZERO
    for j in range(QK):
        if amax < abs(x[j]):
            amax = abs(x[j])
            max_ = x[j]
    return max_


@njit(cache=True, error_model="numpy", inline="always")
def _order_key(b):
    """Float bits (int32) to an int32 that sorts like the float (-0.0 just below +0.0).
    The map is its own inverse."""
    return b ^ np.int32(np.int32(b >> 31) & _MAG_MASK)


@njit(cache=True, error_model="numpy", inline="always")
def _min_max(x):
    """C's scan `if (v < min) min = v; if (v > max) max = v;` from +-FLT_MAX.

    Done on order keys, which vectorize where float min/max chains do not. Keys rank -0.0
    below +0.0 while C keeps whichever zero came first, so a zero result takes the sign of
    the first zero in the block; a NaN (which C passes over) sends the block to the scan.
    """
    lo = _KEY_FLT_MAX
    hi = _KEY_NEG_FLT_MAX
    for j in range(QK):
        k = _order_key(np.int32(f32_bits(x[j])))
        lo = k if k < lo else lo
        hi = k if k > hi else hi
    if lo < _KEY_NEG_INF or hi > _KEY_INF:  # a NaN's key lies beyond the infinities'
        return _min_max_scan(x)
    min_ = bits_f32(_order_key(lo))
    max_ = bits_f32(_order_key(hi))
    if min_ == _ZERO or max_ == _ZERO:
        for j in range(QK):
            if x[j] == _ZERO:
                if min_ == _ZERO:
                    min_ = x[j]
                if max_ == _ZERO:
                    max_ = x[j]
                break
    return min_, max_


@njit(cache=True, error_model="numpy")
def _min_max_scan(x):
    min_ = _FLT_MAX
    max_ = -_FLT_MAX
    for j in range(QK):
        if x[j] < min_:
            min_ = x[j]
        if x[j] > max_:
            max_ = x[j]
    return min_, max_


@njit(cache=True, error_model="numpy", inline="always")
def _pack_5bit_fast(x, sub, id_, off, hi, y, qh_pos, Lf):
    """Q5_0/Q5_1 levels `MIN(hi, (int8_t)((x - sub)*id + off))` and their packing, in float
    lanes: for v in [0, 128) the cast is floor. Returns False if some v falls outside (inf,
    NaN, scales at the edge of float range); the caller then redoes the block with
    _levels_exact. `x - 0` is x exactly, so sub = 0 serves Q5_0."""
    ok = True
    for j in range(QK):
        v = (x[j] - sub) * id_ + off
        ok &= (v >= _ZERO) & (v < _F128)
        Lf[j] = min(np.floor(v), hi)
    if not ok:
        return False
    qh = 0
    for j in range(16):
        h0 = Lf[j] >= _F16  # the fifth bit (levels are < 32 here)
        h1 = Lf[j + 16] >= _F16
        lo0 = Lf[j] - _F16 if h0 else Lf[j]
        lo1 = Lf[j + 16] - _F16 if h1 else Lf[j + 16]
        y[qh_pos + 4 + j] = np.int32(lo0 + _F16 * lo1)
        qh |= (np.int64(h0) << j) | (np.int64(h1) << (j + 16))
    for k in range(4):
        y[qh_pos + k] = (qh >> (8 * k)) & 0xFF
    return True


@njit(cache=True, error_model="numpy", inline="always")
def _pack_4bit_fast(x, sub, id_, off, y, qs_pos):
    """Q4_0/Q4_1 levels and their nibble packing in one float pass (lo + 16*hi is exact);
    False when a block needs _levels_exact."""
    ok = True
    for j in range(16):
        v0 = (x[j] - sub) * id_ + off
        v1 = (x[j + 16] - sub) * id_ + off
        ok &= (v0 >= _ZERO) & (v0 < _F128) & (v1 >= _ZERO) & (v1 < _F128)
        q = min(np.floor(v0), _F15) + _F16 * min(np.floor(v1), _F15)
        y[qs_pos + j] = np.int32(q)
    return ok


@njit(cache=True, error_model="numpy")
def _levels_exact(kind, x, sub, id_, off, hi, L):
    """The C casts literally: int8_t (Q4_0, Q4_1, Q5_0) or uint8_t (Q5_1), wrapping."""
    for j in range(QK):
        v = (x[j] - sub) * id_ + off
        if kind == Q5_1:
            L[j] = np.int64(v) & 0xFF
        else:
            L[j] = min(np.int64(hi), _trunc_i8(v))


@njit(cache=True, error_model="numpy", inline="always")
def _q8_0_ref_block(x, y):
    """quantize_row_q8_0_ref for one block."""
    amax = _ZERO
    for j in range(QK):
        ax = abs(x[j])
        amax = amax if amax > ax else ax
    d = amax / F32(127.0)
    id_ = _ONE / d if d != _ZERO else _ZERO
    put_f16(y, 0, d)
    for j in range(QK):
        y[2 + j] = np.int64(_roundf(x[j] * id_)) & 0xFF


@njit(cache=True, error_model="numpy", inline="always")
def _ref_scale(kind, x, y):
    """The scale d (and offset `sub`) of quantize_row_q{4,5}_{0,1}_ref for one block, stored
    into the block; returns (sub, d)."""
    if kind == Q4_0 or kind == Q5_0:
        d = _abs_max(x) / F32(-8 if kind == Q4_0 else -16)
        put_f16(y, 0, d)
        return _ZERO, d
    sub, max_ = _min_max(x)
    d = (max_ - sub) / F32(15 if kind == Q4_1 else 31)
    put_f16(y, 0, d)
    put_f16(y, 2, sub)
    return sub, d


@njit(cache=True, error_model="numpy", inline="always")
def _ref_levels(kind, x, y, sub, id_, L, Lf):
    """The levels of quantize_row_q{4,5}_{0,1}_ref for one block, packed into it."""
    if kind == Q4_0 or kind == Q5_0:
        nmax = 8 if kind == Q4_0 else 16
        off = F32(nmax) + F32(0.5)
        hi = F32(2 * nmax - 1)
    else:
        off = F32(0.5)
        hi = F32(15.0) if kind == Q4_1 else F32(255.0)  # Q5_1's C does not clamp
    if kind == Q4_0 or kind == Q4_1:
        qs = 2 if kind == Q4_0 else 4
        if not _pack_4bit_fast(x, sub, id_, off, y, qs):
            _levels_exact(kind, x, sub, id_, off, hi, L)
            _store_4bit(y, qs, L)
        return
    qh = 2 if kind == Q5_0 else 4
    if not _pack_5bit_fast(x, sub, id_, off, hi, y, qh, Lf):
        _levels_exact(kind, x, sub, id_, off, hi, L)
        _store_5bit(y, qh, qh + 4, L)


@njit(cache=True, error_model="numpy")
def _imatrix_block(kind, x, qw, sigma2, y, L, Lu, weight, ws):
    """quantize_row_{q4_0,q4_1,q5_0,q5_1}_impl for one block (sigma2 is the row's)."""
    for j in range(QK):
        weight[j] = qw[j] * np.sqrt(sigma2 + x[j] * x[j])
    if kind == Q4_0 or kind == Q5_0:
        nmax = 8 if kind == Q4_0 else 16
        d = make_qx_quants(QK, nmax, x, L, weight, True, ws)
        put_f16(y, 0, d)
        if kind == Q4_0:
            _store_4bit(y, 2, L)
        else:
            _store_5bit(y, 2, 6, L)
        return
    nmax = 15 if kind == Q4_1 else 31
    d, the_min = make_qkx_quants(QK, nmax, x, weight, Lu, F32(-0.9), F32(0.05), 36, False, ws)
    put_f16(y, 0, d)
    put_f16(y, 2, -the_min)
    if kind == Q4_1:
        _store_4bit(y, 4, Lu)
    else:
        _store_5bit(y, 4, 8, Lu)


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_rows(kind, x, qw, use_qw, out):
    nrows, n = x.shape
    bs = BLOCK_BYTES[kind]
    for r in range(nrows):
        L = np.empty(QK, np.int8)
        Li = np.empty(QK, np.int32)
        Lf = np.empty(QK, np.float32)  # noqa: N806
        Lu = np.empty(QK, np.uint8)
        ws = workspace()
        weight = np.empty(QK, np.float32)
        nb = n // QK
        # `kind` is tested first and alone: a constant, so Q8_0's kernel (which ignores the
        # imatrix, as ggml does) drops the imatrix fit and the other types drop Q8_0's block
        if kind == Q8_0:
            for ib in range(nb):
                _q8_0_ref_block(x[r, ib * QK:(ib + 1) * QK], out[r, ib * bs:(ib + 1) * bs])
        elif use_qw:
            sum_x2 = _ZERO
            for j in range(n):
                sum_x2 += x[r, j] * x[r, j]
            sigma2 = sum_x2 / F32(n)
            for ib in range(nb):
                _imatrix_block(kind, x[r, ib * QK:(ib + 1) * QK], qw[ib * QK:(ib + 1) * QK],
                               sigma2, out[r, ib * bs:(ib + 1) * bs], L, Lu, weight, ws)
        else:
            for ib in range(nb):
                xb = x[r, ib * QK:(ib + 1) * QK]
                yb = out[r, ib * bs:(ib + 1) * bs]
                sub, d = _ref_scale(kind, xb, yb)
                _ref_levels(kind, xb, yb, sub, _ONE / d if d != _ZERO else _ZERO, Li, Lf)


# One kernel a type: the constant `kind` prunes the other types' fits (Numba drops branches
# on constants after inlining), so a first Q8_0 job compiles Q8_0's code alone.
@njit(cache=True, error_model="numpy", nogil=True)
def quantize_q4_0_rows(x, qw, use_qw, out):
    _quantize_rows(Q4_0, x, qw, use_qw, out)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_q4_1_rows(x, qw, use_qw, out):
    _quantize_rows(Q4_1, x, qw, use_qw, out)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_q5_0_rows(x, qw, use_qw, out):
    _quantize_rows(Q5_0, x, qw, use_qw, out)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_q5_1_rows(x, qw, use_qw, out):
    _quantize_rows(Q5_1, x, qw, use_qw, out)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_q8_0_rows(x, qw, use_qw, out):
    _quantize_rows(Q8_0, x, qw, use_qw, out)


#: quantize_<type>_rows(x, qw, use_qw, out) by kind
QUANTIZE_ROWS = (quantize_q4_0_rows, quantize_q4_1_rows, quantize_q5_0_rows, quantize_q5_1_rows,
                 quantize_q8_0_rows)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_block_column(kind, x, row, qw, use_qw, ib, out):
    """Block ib of every row of x, as quantize_rows would write it, except that with an
    imatrix the weights read sigma2 of `row` (nrows, n) instead of x's whole row: GPTQ
    (kquant.quantization.gptq) fixes one block column at a time while the rest of the row
    still moves, and gives the original rows here. out: (nrows, block bytes)."""
    nrows, n = x.shape
    for r in range(nrows):
        L = np.empty(QK, np.int8)
        Li = np.empty(QK, np.int32)
        Lf = np.empty(QK, np.float32)  # noqa: N806
        Lu = np.empty(QK, np.uint8)
        ws = workspace()
        weight = np.empty(QK, np.float32)
        xb = x[r, ib * QK:(ib + 1) * QK]
        if use_qw and kind != Q8_0:
            sum_x2 = _ZERO
            for j in range(n):
                sum_x2 += row[r, j] * row[r, j]
            _imatrix_block(kind, xb, qw[ib * QK:(ib + 1) * QK], sum_x2 / F32(n), out[r], L, Lu,
                           weight, ws)
        elif kind == Q8_0:
            _q8_0_ref_block(xb, out[r])
        else:
            sub, d = _ref_scale(kind, xb, out[r])
            _ref_levels(kind, xb, out[r], sub, _ONE / d if d != _ZERO else _ZERO, Li, Lf)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_rows(kind, q, out):
    """dequantize_row_{q4_0,q4_1,q5_0,q5_1} (Q8_0 has its own kernel below)."""
    nrows, n = out.shape
    bs = BLOCK_BYTES[kind]
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ib in range(n // QK):
            o = ib * bs  # the block's first byte; its values start at ib * QK
            v = ib * QK
            d = get_f16(qr, o)
            if kind == Q4_0:
                for j in range(16):
                    y[v + j] = F32(np.int32(qr[o + 2 + j] & 0x0F) - 8) * d
                    y[v + j + 16] = F32(np.int32(qr[o + 2 + j] >> 4) - 8) * d
            elif kind == Q4_1:
                m = get_f16(qr, o + 2)
                for j in range(16):
                    y[v + j] = F32(qr[o + 4 + j] & 0x0F) * d + m
                    y[v + j + 16] = F32(qr[o + 4 + j] >> 4) * d + m
            else:
                qh_pos = o + (2 if kind == Q5_0 else 4)
                qs_pos = qh_pos + 4
                qh = (np.int64(qr[qh_pos]) | (np.int64(qr[qh_pos + 1]) << 8)
                      | (np.int64(qr[qh_pos + 2]) << 16) | (np.int64(qr[qh_pos + 3]) << 24))
                m = get_f16(qr, o + 2) if kind == Q5_1 else _ZERO
                for j in range(16):
                    x0 = (qr[qs_pos + j] & 0x0F) | (((qh >> j) << 4) & 0x10)
                    x1 = (qr[qs_pos + j] >> 4) | ((qh >> (j + 12)) & 0x10)
                    if kind == Q5_0:
                        y[v + j] = F32(np.int32(x0) - 16) * d
                        y[v + j + 16] = F32(np.int32(x1) - 16) * d
                    else:
                        y[v + j] = F32(x0) * d + m
                        y[v + j + 16] = F32(x1) * d + m


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_q8_0_rows(q, out):
    """dequantize_row_q8_0. Its loop runs to a length LLVM cannot see is 32: a constant
    32-trip loop gets fully unrolled and left scalar (SLP cannot rule out q and out
    overlapping), while a loop of unknown length goes to the loop vectorizer, which checks
    the overlap at run time (2.5x here)."""
    nrows, n = out.shape
    qk = n // (q.shape[1] // BLOCK_BYTES[Q8_0]) if q.shape[1] else QK
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ib in range(n // qk):
            o = ib * BLOCK_BYTES[Q8_0]
            d = get_f16(qr, o)
            for j in range(qk):
                y[ib * qk + j] = F32(np.int8(qr[o + 2 + j])) * d


# --- level grids, for GPTQ: re-round values onto a block's fixed scales ----------------------

N_LEVELS = (16, 16, 32, 32, 256)  # stored levels per type; Q8_0 stores L = q + 128


def n_levels(kind):
    """How many stored levels L (0 <= L < n) a block of legacy type `kind` has."""
    return N_LEVELS[kind]


@njit(cache=True, error_model="numpy", nogil=True)
def grid_rows(kind, data, scale, offset):
    """For one block column data (rows, block bytes): the value ggml decodes for element i
    of row r at stored level L is float32(scale[r, i] * L + offset[r, i]) (scale, offset:
    float32 (rows, 32)). L*d and the offsets -8d, -16d, -128d are exact in float32 (d is an
    f16), so this is ggml's value: bit for bit for Q4_1/Q5_1 (the same multiply and add),
    and == for Q4_0/Q5_0/Q8_0, where only a zero's sign can differ ((L-8)*d is -0.0 for
    d < 0, 8d - 8d is +0.0)."""
    for r in range(data.shape[0]):
        d = get_f16(data[r], 0)
        if kind == Q4_1 or kind == Q5_1:
            off = get_f16(data[r], 2)
        elif kind == Q8_0:
            off = F32(-128.0) * d
        else:
            off = F32(-8.0 if kind == Q4_0 else -16.0) * d
        for i in range(QK):
            scale[r, i] = d
            offset[r, i] = off


@njit(cache=True, error_model="numpy", nogil=True)
def set_levels_rows(kind, data, levels):
    """Write stored levels (rows, 32), masked to the type's width, into the block column
    data (rows, block bytes) in place, as quantize_rows packs them; d and m stay as they are.
    Q8_0 stores int8(L - 128)."""
    mask = N_LEVELS[kind] - 1
    for r in range(data.shape[0]):
        y = data[r]
        L = np.empty(QK, np.int64)
        for j in range(QK):
            L[j] = np.int64(levels[r, j]) & mask
        if kind == Q8_0:
            for j in range(QK):
                y[2 + j] = (L[j] - 128) & 0xFF
        elif kind == Q4_0 or kind == Q4_1:
            _store_4bit(y, 2 if kind == Q4_0 else 4, L)
        else:
            qh = 2 if kind == Q5_0 else 4
            _store_5bit(y, qh, qh + 4, L)
