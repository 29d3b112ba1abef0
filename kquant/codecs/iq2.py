"""IQ2_XXS, IQ2_XS and IQ2_S: groups of 8 values as points of a 2-bit grid (256, 512 or 1024
points, levels 0..2 standing for magnitudes 8, 25, 43), with signs, 256-value super-blocks.

block_iq2_xxs (66 bytes): 8 sub-blocks of 32 (4 groups of 8)
  0       2                                                                    66
  | d f16 | per sub-block ib: 4 grid index bytes, then u32 LE s                 |
  s: 4 x 7 sign bits (s >> 7*l) & 127 for group l (8th sign: parity, ksigns_iq2xs), 4-bit
  scale s >> 28; value = d * (0.5 + (s >> 28)) * 0.25 * iq2xxs_grid[index][j] * sign.

block_iq2_xs (74 bytes): 16 sub-blocks of 16 (2 groups of 8)
  0       2                                      66                    74
  | d f16 | qs: 32 x u16 LE, index | 7 signs << 9 | scales: 8 bytes      |
  group g of sub-block ib = g // 2: iq2xs_grid[qs[g] & 511], signs ksigns_iq2xs[qs[g] >> 9],
  4-bit scale (scales[ib/2] >> 4*(ib%2)) & 0xF; value = d * (0.5 + scale) * 0.25 * grid * sign.

block_iq2_s (82 bytes): 16 sub-blocks of 16 (2 groups of 8)
  0       2                     34                  66           74            82
  | d f16 | qs: 32 low index bytes | signs: 32 bytes  | qh: 8 bytes | scales: 8   |
  group g: index qs[g] | ((qh[g/4] >> 2*(g%4)) & 3) << 8 into iq2s_grid, 8 full sign bits
  signs[g], scale as IQ2_XS.

Ports ggml-quants.c's quantize_iq2_xxs / quantize_iq2_xs (quant_weights required: ggml
asserts them, the codec refuses without an imatrix) and quantize_iq2_s (with or without
quant_weights), and dequantize_row_iq2_*, float32 in C's order. The quantizer's tables
(kmap: a point's grid index, or where its nearest grid points are listed; kneighbors) are
iq2xs_init_impl's, built by lattice.py on first use (`tables`), not at import: 0.1 to 0.3 s
each, 43,692 codes against up to 1,024 points (checksums in tests/test_iq2.py).

A C quirk kept on purpose: IQ2_S keeps the indices and signs it wrote when a super-block's
scales all come out 0 (d = 0); IQ2_XXS / IQ2_XS zero them.

Where ggml aborts (GGML_ASSERT: no listed neighbour at a finite distance, a point off the
grid, or a NaN scale; in practice rows with inf / NaN values or whose x^2 overflows), the
kernels flag the row and the codec raises ValueError rather than return bytes ggml never
writes.
"""
from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit

from .bits import F32, get_f16, nearest_int, put_f16
from .iq2_grids import KGRID_256, KGRID_512, KGRID_1024
from .lattice import KSIGNS, best_neighbour, build_tables, fold_signs, level_sums, signed as _signed
from .layout import QK_K
from .search import WS_SIZE, make_qp_quants

XXS_BYTES = 66
XS_BYTES = 74
S_BYTES = 82
_S_QS, _S_SIGNS, _S_QH, _S_SCALES = 2, 34, 66, 74
_XS_SCALES = 66

_KMAP_SIZE = 43692  # iq2xs_init_impl's kmap_size: every code up to 0xAAAA (all levels 2) + 2
_KGRIDS = {"xxs": (KGRID_256, 2), "xs": (KGRID_512, 2), "s": (KGRID_1024, 1)}
#: the dequantization grids' byte magnitudes of levels 0, 1, 2
_MAGNITUDES = np.array([8, 25, 43, 0], np.float32)


def _dgrid(kgrid) -> np.ndarray:
    levels = (np.array(kgrid, np.int64)[:, None] >> (2 * np.arange(8))) & 3
    return _MAGNITUDES[levels]


DGRIDS = {k: _dgrid(g) for k, (g, _) in _KGRIDS.items()}


@cache
def tables(kind: str):
    """(levels, positions 2l+1, kmap, neighbours) of kind "xxs", "xs" or "s": iq2xs_init_impl's
    tables (nwant 2, 2, 1), built on first use."""
    kgrid, nwant = _KGRIDS[kind]
    return build_tables(kgrid, nwant, 8, 2, _KMAP_SIZE)


_ZERO = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_QUARTER = F32(0.25)
_TENTH = F32(0.1)
_TWO = F32(2.0)
_FIVE = F32(5.0)  # 2*kMaxQ - 1
_F31 = F32(31.0)
_QK = F32(QK_K)
_EPS = F32(1e-15)  # GROUP_MAX_EPS
_EPS_S = F32(1e-8)  # GROUP_MAX_EPS_IQ2_S
_FUDGE_S = F32(0.9875)


@njit(cache=True, error_model="numpy", inline="always")
def _round_group(id_, xval, o, L):
    """nearest_int(0.5*(id*xval - 1)) clamped to 0..2 for 8 values; the point's code u."""
    u = 0
    for i in range(8):
        l = max(0, min(2, nearest_int(_HALF * (id_ * xval[o + i] - _ONE))))
        L[o + i] = l
        u |= l << (2 * i)
    return u


@njit(cache=True, error_model="numpy", inline="always")
def _place(id_, xval, o, L, kmap, nb, gpos, levels, waux, scale, failed):
    """A group rounded to its nearest code, moved to the best listed grid point when off the
    grid; whether it was on the grid."""
    u = _round_group(id_, xval, o, L)
    if kmap[u] >= 0:
        return True
    best_neighbour(nb, -kmap[u] - 1, gpos, levels, xval, waux, o, scale, L, failed, 8)
    return False


@njit(cache=True, error_model="numpy", inline="always")
def _grid_index(kmap, L, o, failed):
    """The final check of quantize_row_iq2_*_impl: the group's levels must be a grid point
    ("Oops: found point not on grid" aborts); C's u is a uint16."""
    u = 0
    for i in range(8):
        u |= np.int64(L[o + i]) << (2 * i)
    u &= 0xFFFF
    if u >= kmap.size or kmap[u] < 0:
        failed[0] = 1
        return 0
    return kmap[u]


@njit(cache=True, error_model="numpy", inline="always")
def _weights_and_signs(xb, qwb, use_qw, sigma2, n, parity, s):
    """weight, waux, xval (|x|, with the least important value of a group of 8 negated when
    `parity` needs an even number of flips) and the groups' sign bytes."""
    weight, waux, xval = s[0], s[1], s[2]
    signs = s[7]
    if use_qw:
        for i in range(n):
            weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:  # IQ2_S only
        for i in range(n):
            weight[i] = _QUARTER * sigma2 + xb[i] * xb[i]
    for i in range(n):
        waux[i] = np.sqrt(weight[i])
    return fold_signs(xb, weight, xval, signs, n // 8, parity)


@njit(cache=True, error_model="numpy", inline="always")
def _xxs_sub_block(xb, qwb, sigma2, t, s):
    """One 32-value sub-block of quantize_row_iq2_xxs_impl: its scale, or -1 where C skips it
    (all near zero, or make_qp_quants' scale not positive); levels in L, signs set."""
    levels, gpos, kmap, nb = t
    weight, waux, xval, L, Laux, Lqp, ws, signs, failed = s
    mx = _weights_and_signs(xb, qwb, True, sigma2, 32, True, s)
    if mx < _EPS:
        return F32(-1.0)
    scale = make_qp_quants(32, 4, xval, Lqp, weight, ws)
    for i in range(32):  # int8 L as the uint8 array make_qp_quants wrote
        L[i] = Lqp[i] if Lqp[i] < 128 else Lqp[i] - 256
    eff_max = scale * F32(3.0)
    if eff_max <= _ZERO:
        return F32(-1.0)
    best = _ZERO
    for is_ in range(-6, 7):
        id_ = (_FIVE + F32(is_) * _TENTH) / eff_max
        this_scale = _ONE / id_
        for k in range(4):
            _place(id_, xval, 8 * k, Laux, kmap, nb, gpos, levels, waux, this_scale, failed)
        sumqx, sumq2 = level_sums(32, weight, xval, Laux)
        if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(32):
                L[i] = Laux[i]
    if scale > _ZERO:
        id_ = _ONE / scale
        for k in range(4):  # every group again at the chosen scale
            _place(id_, xval, 8 * k, L, kmap, nb, gpos, levels, waux, scale, failed)
        sumqx, sumq2 = level_sums(32, weight, xval, L)
        if sumq2 > _ZERO:
            scale = sumqx / sumq2
    return _positive(scale, 4, True, signs, failed)


@njit(cache=True, error_model="numpy", inline="always")
def _positive(scale, ngroups, parity, signs, failed):
    """A negative scale made positive by flipping every sign (C: "should never happen");
    a NaN one is ggml's GGML_ASSERT(scale >= 0)."""
    if scale < _ZERO:
        scale = -scale
        for k in range(ngroups):
            signs[k] = (~signs[k]) & (127 if parity else 255)
    if not scale >= _ZERO:
        failed[0] = 1
        scale = _ZERO
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def _x16_sub_block(xb, qwb, use_qw, sigma2, parity, eps, t, s):
    """One 16-value sub-block of quantize_row_iq2_xs_impl (parity) or quantize_row_iq2_s_impl:
    its scale, or -1 where C skips it; levels in L, signs set."""
    levels, gpos, kmap, nb = t
    weight, waux, xval, L, Laux, on, ws, signs, failed = s
    mx = _weights_and_signs(xb, qwb, use_qw, sigma2, 16, parity, s)
    for i in range(16):
        L[i] = 0
    if mx < eps:
        return F32(-1.0)
    best = _ZERO
    scale = mx / _FIVE
    on[0] = on[1] = True
    for is_ in range(-9, 10):
        id_ = (_FIVE + F32(is_) * _TENTH) / mx
        this_scale = _ONE / id_
        on0 = _place(id_, xval, 0, Laux, kmap, nb, gpos, levels, waux, this_scale, failed)
        on1 = _place(id_, xval, 8, Laux, kmap, nb, gpos, levels, waux, this_scale, failed)
        sumqx, sumq2 = level_sums(16, weight, xval, Laux)
        if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(16):
                L[i] = Laux[i]
            on[0] = on0
            on[1] = on1
    if not (on[0] and on[1]) and scale > _ZERO:
        id_ = _ONE / scale
        for k in range(2):  # only the groups that were off the grid
            if not on[k]:
                _place(id_, xval, 8 * k, L, kmap, nb, gpos, levels, waux, scale, failed)
        sumqx, sumq2 = level_sums(16, weight, xval, L)
        if sumq2 > _ZERO:
            scale = sumqx / sumq2
    return _positive(scale, 2, parity, signs, failed)


@njit(cache=True, error_model="numpy", inline="always")
def _scratch(n):
    return (np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32),
            np.zeros(n, np.int64), np.empty(n, np.int64), np.empty(n, np.uint8),
            np.empty(WS_SIZE, np.float32), np.empty(4, np.int64), np.zeros(1, np.int64))


@njit(cache=True, error_model="numpy", inline="always")
def _scratch16():
    s = _scratch(16)
    return (s[0], s[1], s[2], s[3], s[4], np.empty(2, np.bool_), s[6], s[7], s[8])


@njit(cache=True, error_model="numpy", inline="always")
def _sigma2(x, factor):
    s = _ZERO
    for i in range(QK_K):
        s += x[i] * x[i]
    return factor * s / _QK


@njit(cache=True, error_model="numpy", inline="always")
def _put_scales(y, o, scales, max_scale, nsub):
    """d = max_scale / 31; the sub-block scales as 4-bit l: scale ~ d * (2l + 1) / 2."""
    id_ = _ONE / (max_scale / _F31)
    for ib in range(nsub):
        l = max(0, min(15, nearest_int(_HALF * (id_ * scales[ib] - _ONE))))
        if nsub == 8:  # IQ2_XXS: the top 4 bits of the sub-block's u32
            y[o + 8 * ib + 7] |= l << 4
        elif ib % 2 == 0:
            y[o + ib // 2] = l
        else:
            y[o + ib // 2] |= l << 4


@njit(cache=True, error_model="numpy", inline="always")
def _xxs_block(x, qw, y, t, s, scales):
    L, signs, failed = s[3], s[7], s[8]
    kmap = t[2]
    for i in range(XXS_BYTES):
        y[i] = 0
    sigma2 = _sigma2(x, _ONE)
    max_scale = _ZERO
    for ib in range(8):
        scale = _xxs_sub_block(x[32 * ib:32 * ib + 32], qw[32 * ib:32 * ib + 32], sigma2, t, s)
        if scale < _ZERO:
            scales[ib] = _ZERO
            continue
        o = 2 + 8 * ib
        ss = 0
        for k in range(4):
            y[o + k] = _grid_index(kmap, L, 8 * k, failed)
            ss |= signs[k] << (7 * k)
        for b in range(4):
            y[o + 4 + b] = (ss >> (8 * b)) & 0xFF
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if not max_scale != _ZERO:
        for i in range(XXS_BYTES):
            y[i] = 0
        return
    put_f16(y, 0, max_scale / _F31)
    _put_scales(y, 2, scales, max_scale, 8)


@njit(cache=True, error_model="numpy", inline="always")
def _x16_block(x, qw, use_qw, is_s, y, t, s, scales):
    L, signs, failed = s[3], s[7], s[8]
    kmap = t[2]
    size = S_BYTES if is_s else XS_BYTES
    for i in range(size):
        y[i] = 0
    sigma2 = _sigma2(x, _TWO if is_s else _ONE)
    max_scale = _ZERO
    for ib in range(16):
        scale = _x16_sub_block(x[16 * ib:16 * ib + 16], qw[16 * ib:16 * ib + 16], use_qw,
                               sigma2, not is_s, _EPS_S if is_s else _EPS, t, s)
        if scale < _ZERO:
            scales[ib] = _ZERO
            continue
        for k in range(2):
            g = 2 * ib + k
            gi = _grid_index(kmap, L, 8 * k, failed)
            if is_s:
                y[_S_QS + g] = gi & 255
                y[_S_QH + g // 4] |= (gi >> 8) << (2 * (g % 4))
                y[_S_SIGNS + g] = signs[k]
            else:
                v = gi | (signs[k] << 9)
                y[2 + 2 * g] = v & 0xFF
                y[3 + 2 * g] = v >> 8
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if not max_scale != _ZERO:
        if not is_s:
            for i in range(size):
                y[i] = 0
        return
    put_f16(y, 0, max_scale / _F31 * _FUDGE_S if is_s else max_scale / _F31)
    _put_scales(y, _S_SCALES if is_s else _XS_SCALES, scales, max_scale, 16)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_xxs_rows(x, qw, out, failed, levels, gpos, kmap, nb):
    """quantize_iq2_xxs (quant_weights required): rows in order (threads.py runs slices of them side by side), super-blocks in order;
    failed[r] = 1 where ggml would abort on row r. The tables are tables("xxs")."""
    nrows, n = x.shape
    t = (levels, gpos, kmap, nb)
    for r in range(nrows):
        s = _scratch(32)
        scales = np.empty(8, np.float32)
        for i in range(n // QK_K):
            _xxs_block(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K],
                       out[r, i * XXS_BYTES:(i + 1) * XXS_BYTES], t, s, scales)
        failed[r] = s[8][0]


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_x16_rows(x, qw, use_qw, is_s, out, failed, levels, gpos, kmap, nb):
    """quantize_iq2_xs (quant_weights required) or, with is_s, quantize_iq2_s: as
    quantize_xxs_rows, with tables("xs") or tables("s")."""
    nrows, n = x.shape
    size = S_BYTES if is_s else XS_BYTES
    t = (levels, gpos, kmap, nb)
    for r in range(nrows):
        s = _scratch16()
        scales = np.empty(16, np.float32)
        for i in range(n // QK_K):
            _x16_block(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K], use_qw,
                       is_s, out[r, i * size:(i + 1) * size], t, s, scales)
        failed[r] = s[8][0]


@njit(cache=True, error_model="numpy", inline="always")
def _group(y, v, db, dgrid, g, sg):
    """8 values of grid point g at scale db, sign bits sg."""
    for j in range(8):
        y[v + j] = _signed(db * dgrid[g, j], sg, j)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_xxs_rows(q, out, dgrid):
    """dequantize_row_iq2_xxs."""
    nrows, n = out.shape
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ibl in range(n // QK_K):
            o = ibl * XXS_BYTES
            d = get_f16(qr, o)
            for ib in range(8):
                p = o + 2 + 8 * ib
                aux = (np.int64(qr[p + 4]) | (np.int64(qr[p + 5]) << 8)
                       | (np.int64(qr[p + 6]) << 16) | (np.int64(qr[p + 7]) << 24))
                db = d * (_HALF + F32(aux >> 28)) * _QUARTER
                for l in range(4):
                    _group(y, ibl * QK_K + 32 * ib + 8 * l, db, dgrid, qr[p + l],
                           KSIGNS[(aux >> (7 * l)) & 127])


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_x16_rows(q, out, is_s, dgrid):
    """dequantize_row_iq2_xs, or with is_s dequantize_row_iq2_s."""
    nrows, n = out.shape
    size = S_BYTES if is_s else XS_BYTES
    so = _S_SCALES if is_s else _XS_SCALES
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ibl in range(n // QK_K):
            o = ibl * size
            d = get_f16(qr, o)
            for ib in range(8):
                sc = np.int64(qr[o + so + ib])
                db0 = d * (_HALF + F32(sc & 0xF)) * _QUARTER
                db1 = d * (_HALF + F32(sc >> 4)) * _QUARTER
                for l in range(4):
                    g = 4 * ib + l
                    if is_s:
                        qh = np.int64(qr[o + _S_QH + ib])
                        gi = np.int64(qr[o + _S_QS + g]) | ((qh << (8 - 2 * l)) & 0x300)
                        sg = np.int64(qr[o + _S_SIGNS + g])
                    else:
                        v = np.int64(qr[o + 2 + 2 * g]) | (np.int64(qr[o + 3 + 2 * g]) << 8)
                        gi = v & 511
                        sg = KSIGNS[v >> 9]
                    _group(y, ibl * QK_K + 32 * ib + 8 * l, db0 if l < 2 else db1, dgrid, gi, sg)
