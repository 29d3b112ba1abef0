"""IQ1_S and IQ1_M: groups of 8 values as points of a grid of 2048 ternary points (values
-1, 0, 1, shifted by +-delta = 0.125), 256-value super-blocks.

block_iq1_s (50 bytes):
  0       2                              34                           50
  | d f16 | qs: 32 low index bytes, 4 a   | qh: 8 x u16 LE, one a       |
  |       | sub-block of 32               | sub-block                   |
  qh of sub-block ib: bits 3l..3l+2 the index's high bits for group l, bits 12..14 the scale
  s, bit 15 the shift's sign; group l of ib: index qs[4*ib + l] | ((qh >> 3l) & 7) << 8;
  value = d * (2s + 1) * (iq1s_grid[index][j] + (bit 15 ? -delta : delta)).

block_iq1_m (56 bytes):
  0                                  32                     48                    56
  | qs: 32 low index bytes, 2 a 16-   | qh: 16 bytes, one a  | scales: 4 x u16 LE   |
  |   value sub-block                 | sub-block of 16      |                      |
  qh of sub-block ib: bits 0..2 / 4..6 the high index bits of its groups 0 / 1, bits 3 / 7
  their shifts' signs; scales u16 w: 3-bit scales of sub-blocks 4w..4w+3 at bits 3k..3k+2,
  bits 12..15 one nibble of the super-block's f16 d (w = 0 the lowest: iq1m_scale_t);
  value = d * (2s + 1) * (iq1s_grid[index][j] + (sign ? -delta : delta)).

Ports ggml-quants.c's quantize_iq1_s (quantize_row_iq1_s_impl: quant_weights required, as
ggml asserts) and quantize_iq1_m (quantize_row_iq1_m_impl, with or without quant_weights:
without, the weights are x^2, as ggml_quantize_chunk allows), and dequantize_row_iq1_s /
dequantize_row_iq1_m, float32 in C's order. A sub-block's three groups (-1, 0, 1) come from an
exhaustive search over the two boundaries of its values sorted by x: ggml sorts with glibc's
qsort, a merge sort (stable: ties keep the values' order), as _sort_index does; the order of
NaN values never matters (a NaN makes its sub-block's every score NaN, and it is skipped).
The quantizer's tables (kmap, kneighbors of iq2xs_init_impl with kgrid_1bit_2048, nwant 3)
are built by lattice.py on first use (tables(); 0.2 s), not at import.

Where ggml aborts (GGML_ASSERT: no listed neighbour at a finite distance, or a NaN scale: rows
with inf values or whose weights overflow), the kernels flag the row and the codec raises
ValueError. (ggml's whole-grid fallback after an empty neighbour search reads past the group,
xval[i] for grid index i; it is only reached where every distance is NaN or inf, and the
flagged rows are checked against ggml in tests/test_iq1.py.)
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

from .bits import F32, fp16_to_fp32, fp32_to_fp16, get_f16, nearest_int, put_f16
from .iq1_grids import KGRID_2048
from .lattice import build_tables
from .lattice import sigma2 as _sigma2  # 2 * sum(x^2) / QK_K in C's order, as both quantizers take it
from .layout import QK_K

S_BYTES = 50
M_BYTES = 56
_S_QS, _S_QH = 2, 34
_M_QH, _M_SCALES = 32, 48

_KMAP_SIZE = 43692  # iq2xs_init_impl's: every code of 8 levels of 2 bits up to 0xAAAA + 2


@functools.cache
def tables():
    """(levels (2048, 8) int32, kmap, neighbours): iq2xs_init_impl's tables for IQ1_S / IQ1_M."""
    levels, _, kmap, neighbours = build_tables(KGRID_2048, 3, 8, 2, _KMAP_SIZE)
    return levels, kmap, neighbours


#: ggml-common.h's iq1s_grid as values: the grid's levels l as l - 1
def grid_values() -> np.ndarray:
    return (tables()[0] - 1).astype(np.int8)


_ZERO = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_F15 = F32(15.0)
_DELTA = F32(0.125)
_FLT_MAX = F32(np.finfo(np.float32).max)
_EPS_S = F32(1e-12)
_EPS_M = F32(1e-7)
_FUDGE_S = F32(1.125)
_FUDGE_M = F32(1.1125)
# x_p / x_m: the three values -1, 0, 1 shifted by +delta / -delta
_XP = np.array([-1 + 0.125, 0.125, 1 + 0.125], np.float32)
_XM = np.array([-1 - 0.125, -0.125, 1 - 0.125], np.float32)
_XP0, _XP1, _XP2 = F32(-0.875), F32(0.125), F32(1.125)
_XM0, _XM1, _XM2 = F32(-1.125), F32(-0.125), F32(0.875)
# x_p[0]^2 - x_p[1]^2 etc. (exact in float32, as C folds them)
_CP1, _CP2, _CM1, _CM2 = F32(0.75), F32(-1.25), F32(1.25), F32(-0.75)
_M_MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.int64)


@njit(cache=True, error_model="numpy", inline="always")
def _sort_index(xb, n, idx):
    """idx = 0..n-1 ordered by xb, ties in index order: glibc's qsort (a merge sort) with
    iq1_sort_helper."""
    for j in range(n):
        idx[j] = j
    for j in range(1, n):
        k = idx[j]
        v = xb[k]
        p = j - 1
        while p >= 0 and xb[idx[p]] > v:
            idx[p + 1] = idx[p]
            p -= 1
        idx[p + 1] = k


@njit(cache=True, error_model="numpy", inline="always")
def _block_max(xb, n):
    """fabsf max with C's MAX(a, b) = a > b ? a : b (a NaN max gives way to the next value)."""
    mx = abs(xb[0])
    for i in range(1, n):
        a = abs(xb[i])
        mx = mx if mx > a else a
    return mx


@njit(cache=True, error_model="numpy", inline="always")
def _best_neighbour(nb, start, levels, xb, weight, o, scale, xx, failed):
    """iq1_find_best_neighbour2: the listed grid point nearest (weighted) to xb[o:o+8] at this
    scale with the values xx. Where C finds none (every distance NaN or inf), failed[0] = 1."""
    n = nb[start]
    best = _FLT_MAX
    gi = -1
    for j in range(start + 1, start + 1 + n):
        g = nb[j]
        d2 = _ZERO
        for i in range(8):
            diff = scale * xx[levels[g, i]] - xb[o + i]
            d2 += weight[o + i] * diff * diff
        if d2 < best:
            best = d2
            gi = g
    if gi < 0:
        failed[0] = 1
        gi = nb[start + 1]
    return gi


@njit(cache=True, error_model="numpy", inline="always")
def _grid_index(L, o, xb, weight, scale, xx, levels, kmap, nb, failed):
    """The group L[o:o+8]'s grid index: itself when on the grid, else its best neighbour."""
    u = 0
    for j in range(8):
        u |= L[o + j] << (2 * j)
    gi = kmap[u]
    if gi >= 0:
        return np.int64(gi), True
    return np.int64(_best_neighbour(nb, -gi - 1, levels, xb, weight, o, scale, xx, failed)), False


@njit(cache=True, error_model="numpy", inline="always")
def _refit(xb, weight, index, k0, k1, levels, xx, sumqx, sumq2):
    """sumqx, sumq2 of groups k0..k1-1 at their grid points (values xx)."""
    for k in range(k0, k1):
        g = index[k]
        for j in range(8):
            w = weight[8 * k + j]
            q = xx[levels[g, j]]
            sumqx += w * q * xb[8 * k + j]
            sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True, error_model="numpy", inline="always")
def _assign(idx, n, i1, i2, flip, L):
    """L of the values sorted below i1 = 0, up to i2 = 1, above = 2 (mirrored when flip)."""
    for j in range(n):
        lv = 0 if j < i1 else (1 if j < i2 else 2)
        L[idx[j]] = 2 - lv if flip else lv


@njit(cache=True, error_model="numpy", inline="always")
def _checked(scale, failed):
    """The sub-block's final scale; a NaN one (ggml's GGML_ASSERT(scale >= 0) aborts) flags
    the row."""
    if not scale >= _ZERO:
        failed[0] = 1
        return _ZERO
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def _s_scores(sumx, sumw, i1, buf):
    """sumqx^2, sumq2, sumqx with x_p (rows 0-2) and x_m (rows 3-5) of the splits (i1, i1+t):
    the same float operations as C's, elementwise, so that LLVM vectorizes them."""
    ax = sumx[i1] - sumx[0]
    aw = sumw[i1] - sumw[0]
    tx = sumx[32]
    tw = sumw[32]
    for t in range(33 - i1):
        i2 = i1 + t
        bx = sumx[i2] - sumx[i1]
        bw = sumw[i2] - sumw[i1]
        cx = tx - sumx[i2]
        cw = tw - sumw[i2]
        qx = ax * _XP0 + bx * _XP1 + cx * _XP2
        buf[0, t] = qx * qx
        buf[1, t] = aw * _XP0 * _XP0 + bw * _XP1 * _XP1 + cw * _XP2 * _XP2
        buf[2, t] = qx
        qx = ax * _XM0 + bx * _XM1 + cx * _XM2
        buf[3, t] = qx * qx
        buf[4, t] = aw * _XM0 * _XM0 + bw * _XM1 * _XM1 + cw * _XM2 * _XM2
        buf[5, t] = qx


@njit(cache=True, error_model="numpy", inline="always")
def _scan(buf, i1, m, nk, best, scale, b1, b2, bk):
    """C's comparisons over the scored splits (i1, i1+t), t < m, each with shifts k < nk, in
    C's order: (best score, scale, i1, i2, k) updated."""
    for t in range(m):
        for k in range(nk):
            sumq2 = buf[3 * k + 1, t]
            if sumq2 > _ZERO and buf[3 * k, t] > best * sumq2:
                scale = buf[3 * k + 2, t] / sumq2
                best = scale * buf[3 * k + 2, t]
                b1 = i1
                b2 = i1 + t
                bk = k
    return best, scale, b1, b2, bk


@njit(cache=True, error_model="numpy", inline="always")
def _s_search(sumx, sumw, buf):
    """The boundaries (i1, i2) and shift of the best split of a sorted IQ1_S sub-block: the
    scores of a row of splits at once, then C's comparisons in C's order."""
    best, scale, b1, b2, k = -_FLT_MAX, _ZERO, -1, -1, -1
    for i1 in range(33):
        _s_scores(sumx, sumw, i1, buf)
        best, scale, b1, b2, k = _scan(buf, i1, 33 - i1, 2, best, scale, b1, b2, k)
    return scale, b1, b2, 0 if k < 0 else 1 - 2 * k


@njit(cache=True, error_model="numpy", inline="always")
def _s_sub_block(xb, qwb, sigma2, s, levels, kmap, nb):
    """One 32-value sub-block of quantize_row_iq1_s_impl: (scale, shift), with its 4 grid
    indices in index; shift 0 where C skips it (scale 0, shift 1, nothing written)."""
    weight, idx, sumx, sumw, L, index, failed = s[:7]
    for i in range(32):
        weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
    mx = _block_max(xb, 32)
    if mx < _EPS_S:
        return _ZERO, 0
    _sort_index(xb, 32, idx)
    sumx[0] = _ZERO
    sumw[0] = _ZERO
    for j in range(32):
        i = idx[j]
        sumx[j + 1] = sumx[j] + weight[i] * xb[i]
        sumw[j + 1] = sumw[j] + weight[i]
    scale, b1, b2, shift = _s_search(sumx, sumw, s[9])
    if b1 < 0:
        return _ZERO, 0
    flip = scale < _ZERO
    _assign(idx, 32, b1, b2, flip, L)
    if flip:
        scale = -scale
        shift = -shift
    xx = _XP if shift == 1 else _XM
    all_on = True
    for k in range(4):
        index[k], on = _grid_index(L, 8 * k, xb, weight, scale, xx, levels, kmap, nb, failed)
        all_on &= on
    if not all_on:
        sumqx, sumq2 = _refit(xb, weight, index, 0, 4, levels, xx, _ZERO, _ZERO)
        if sumqx > _ZERO and sumq2 > _ZERO:
            scale = sumqx / sumq2
    return _checked(scale, failed), shift


@njit(cache=True, error_model="numpy", inline="always")
def _scratch():
    return (np.empty(32, np.float32), np.empty(32, np.int64), np.empty(33, np.float32),
            np.empty(33, np.float32), np.empty(32, np.int64), np.empty(4, np.int64),
            np.zeros(1, np.int64), np.empty((2, 17), np.float32), np.empty((2, 17), np.float32),
            np.empty((12, 33), np.float32))


@njit(cache=True, error_model="numpy", inline="always")
def _s_block(x, qw, y, s, scales, shifts, levels, kmap, nb):
    index = s[5]
    for i in range(S_BYTES):
        y[i] = 0
    sigma2 = _sigma2(x)
    max_scale = _ZERO
    for ib in range(8):
        scale, shift = _s_sub_block(x[32 * ib:32 * ib + 32], qw[32 * ib:32 * ib + 32], sigma2,
                                    s, levels, kmap, nb)
        scales[ib] = scale
        shifts[ib] = 1 if shift == 0 else shift
        if shift == 0:
            continue
        h = 0
        for k in range(4):
            y[_S_QS + 4 * ib + k] = index[k] & 255
            h |= (index[k] >> 8) << (3 * k)
        y[_S_QH + 2 * ib] = h & 255
        y[_S_QH + 2 * ib + 1] = h >> 8
        max_scale = max_scale if max_scale > scale else scale
    if not max_scale != _ZERO:
        return
    d = max_scale / _F15
    put_f16(y, 0, d * _FUDGE_S)
    id_ = _ONE / d
    for ib in range(8):
        l = max(0, min(7, nearest_int(_HALF * (id_ * scales[ib] - _ONE))))
        if shifts[ib] == -1:
            l |= 8
        y[_S_QH + 2 * ib + 1] |= l << 4


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_s_rows(x, qw, out, failed, levels, kmap, nb):
    """quantize_iq1_s: rows in order (threads.py runs slices of them side by side), super-blocks in order; failed[r] = 1 where ggml
    would abort on row r. The tables are tables()'s."""
    nrows, n = x.shape
    for r in range(nrows):
        s = _scratch()
        scales = np.empty(8, np.float32)
        shifts = np.empty(8, np.int64)
        for i in range(n // QK_K):
            _s_block(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K],
                     out[r, i * S_BYTES:(i + 1) * S_BYTES], s, scales, shifts, levels, kmap, nb)
        failed[r] = s[6][0]


@njit(cache=True, error_model="numpy", inline="always")
def _m_weights(xb, qwb, use_qw, sigma2, weight):
    if use_qw:
        for i in range(16):
            weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        for i in range(16):
            weight[i] = xb[i] * xb[i]


@njit(cache=True, error_model="numpy", inline="always")
def _m_scores(px, pw, i1, buf):
    """sumqx^2, sumq2, sumqx of the four shift pairs k (rows 3k..3k+2) of the splits
    (i1, i1+t): C's float operations elementwise, so that LLVM vectorizes them."""
    tx0, tx1, tw0, tw1 = px[0, 16], px[1, 16], pw[0, 16], pw[1, 16]
    for t in range(17 - i1):
        i2 = i1 + t
        sx0 = px[0, i1] + px[0, i2]
        sx1 = px[1, i1] + px[1, i2]
        qxp0 = tx0 * _XP2 - sx0
        qxm0 = tx0 * _XM2 - sx0
        qxp1 = tx1 * _XP2 - sx1
        qxm1 = tx1 * _XM2 - sx1
        q2p0 = tw0 * _XP2 * _XP2 + pw[0, i1] * _CP1 + pw[0, i2] * _CP2
        q2m0 = tw0 * _XM2 * _XM2 + pw[0, i1] * _CM1 + pw[0, i2] * _CM2
        q2p1 = tw1 * _XP2 * _XP2 + pw[1, i1] * _CP1 + pw[1, i2] * _CP2
        q2m1 = tw1 * _XM2 * _XM2 + pw[1, i1] * _CM1 + pw[1, i2] * _CM2
        _m_put(buf, 0, t, qxp0 + qxp1, q2p0 + q2p1)
        _m_put(buf, 1, t, qxp0 + qxm1, q2p0 + q2m1)
        _m_put(buf, 2, t, qxm0 + qxp1, q2m0 + q2p1)
        _m_put(buf, 3, t, qxm0 + qxm1, q2m0 + q2m1)


@njit(cache=True, error_model="numpy", inline="always")
def _m_put(buf, k, t, sumqx, sumq2):
    buf[3 * k, t] = sumqx * sumqx
    buf[3 * k + 1, t] = sumq2
    buf[3 * k + 2, t] = sumqx


@njit(cache=True, error_model="numpy", inline="always")
def _m_search(px, pw, buf):
    """The boundaries (i1, i2) and the halves' shifts k of the best split of a sorted IQ1_M
    sub-block (k: 0 ++, 1 +-, 2 -+, 3 --), sums by half as the C keeps them: the scores of a
    row of splits at once, then C's comparisons in C's order."""
    best, scale, b1, b2, bk = -_FLT_MAX, _ZERO, -1, -1, -1
    for i1 in range(17):
        _m_scores(px, pw, i1, buf)
        best, scale, b1, b2, bk = _scan(buf, i1, 17 - i1, 4, best, scale, b1, b2, bk)
    return scale, b1, b2, bk


@njit(cache=True, error_model="numpy", inline="always")
def _m_values(k, g):
    """x_p or x_m for group g (0 / 1) of a sub-block with shifts k."""
    if g == 0:
        return _XP if k < 2 else _XM
    return _XP if k % 2 == 0 else _XM


@njit(cache=True, error_model="numpy", inline="always")
def _m_sub_block(xb, qwb, use_qw, sigma2, s, levels, kmap, nb):
    """One 16-value sub-block of quantize_row_iq1_m_impl: (scale, k), its 2 grid indices in
    index; k = -1 where C skips it (scale 0, shifts 0, nothing written)."""
    weight, idx, _, _, L, index, failed, px, pw, buf = s
    _m_weights(xb, qwb, use_qw, sigma2, weight)
    mx = _block_max(xb, 16)
    if mx < _EPS_M:
        return _ZERO, -1
    _sort_index(xb, 16, idx)
    px[0, 0] = px[1, 0] = pw[0, 0] = pw[1, 0] = _ZERO
    for j in range(16):
        i = idx[j]
        h = 0 if i < 8 else 1
        px[h, j + 1] = px[h, j] + weight[i] * xb[i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = pw[h, j] + weight[i]
        pw[1 - h, j + 1] = pw[1 - h, j]
    scale, b1, b2, bk = _m_search(px, pw, buf)
    if b1 < 0:
        return _ZERO, -1
    flip = scale < _ZERO
    _assign(idx, 16, b1, b2, flip, L)
    if flip:
        scale = -scale
        bk = 3 - bk
    all_on = True
    for k in range(2):
        index[k], on = _grid_index(L, 8 * k, xb, weight, scale, _m_values(bk, k), levels, kmap,
                                   nb, failed)
        all_on &= on
    if not all_on:
        sumqx, sumq2 = _refit(xb, weight, index, 0, 1, levels, _m_values(bk, 0), _ZERO, _ZERO)
        sumqx, sumq2 = _refit(xb, weight, index, 1, 2, levels, _m_values(bk, 1), sumqx, sumq2)
        if sumqx > _ZERO and sumq2 > _ZERO:
            scale = sumqx / sumq2
    return _checked(scale, failed), bk


@njit(cache=True, error_model="numpy", inline="always")
def _m_final_d(x, qw, use_qw, y, sigma2, weight, scales, shifts, max_scale, levels):
    """The super-block's scale: the 3-bit scales written, then d refit to the quantized
    values (quantize_row_iq1_m_impl's last loop); returns d."""
    d = max_scale / _F15
    id_ = _ONE / d
    sumqx = _ZERO
    sumq2 = _ZERO
    for ib in range(16):
        l = max(0, min(7, nearest_int(_HALF * (id_ * scales[ib] - _ONE))))
        p = _M_SCALES + 2 * (ib // 4)
        v = l << (3 * (ib % 4))
        y[p] |= v & 255
        y[p + 1] |= v >> 8
        y[_M_QH + ib] |= _M_MASKS[shifts[ib]]
        xb = x[16 * ib:16 * ib + 16]
        _m_weights(xb, qw[16 * ib:16 * ib + 16], use_qw, sigma2, weight)
        ls = F32(2 * l + 1)
        qh = np.int64(y[_M_QH + ib])
        for k in range(2):
            xx = _m_values(shifts[ib], k)
            g = np.int64(y[2 * ib + k]) + ((qh << (8 - 4 * k)) & 0x700)
            for j in range(8):
                w = weight[8 * k + j]
                q = xx[levels[g, j]] * ls
                sumqx += w * q * xb[8 * k + j]
                sumq2 += w * q * q
    if sumq2 > _ZERO:
        d = sumqx / sumq2
    return d


@njit(cache=True, error_model="numpy", inline="always")
def _m_block(x, qw, use_qw, y, s, scales, shifts, levels, kmap, nb):
    index = s[5]
    for i in range(M_BYTES):
        y[i] = 0
    sigma2 = _sigma2(x)
    max_scale = _ZERO
    for ib in range(16):
        scale, k = _m_sub_block(x[16 * ib:16 * ib + 16], qw[16 * ib:16 * ib + 16], use_qw,
                                sigma2, s, levels, kmap, nb)
        scales[ib] = scale
        shifts[ib] = max(k, 0)
        if k < 0:
            continue
        y[2 * ib] = index[0] & 255
        y[2 * ib + 1] = index[1] & 255
        y[_M_QH + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
        max_scale = max_scale if max_scale > scale else scale
    if not max_scale != _ZERO:
        return
    d = _m_final_d(x, qw, use_qw, y, sigma2, s[0], scales, shifts, max_scale, levels)
    # iq1m_scale_t: the f16's nibble w in the top nibble of scale word w
    h = np.int64(fp32_to_fp16(d * _FUDGE_M))
    for w in range(4):
        y[_M_SCALES + 2 * w + 1] |= ((h >> (4 * w)) & 0xF) << 4


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_m_rows(x, qw, use_qw, out, failed, levels, kmap, nb):
    """quantize_iq1_m: rows in order (threads.py runs slices of them side by side), super-blocks in order (failed as for IQ1_S)."""
    nrows, n = x.shape
    for r in range(nrows):
        s = _scratch()
        scales = np.empty(16, np.float32)
        shifts = np.empty(16, np.int64)
        for i in range(n // QK_K):
            _m_block(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K], use_qw,
                     out[r, i * M_BYTES:(i + 1) * M_BYTES], s, scales, shifts, levels, kmap, nb)
        failed[r] = s[6][0]


@njit(cache=True, error_model="numpy", inline="always")
def _shifted(dl, g, delta):
    return dl * (F32(g) + delta)


@njit(cache=True, error_model="numpy", inline="always")
def _u16(b, p):
    return np.int64(b[p]) | (np.int64(b[p + 1]) << 8)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_s_rows(q, out, grid):
    """dequantize_row_iq1_s (grid: grid_values())."""
    nrows, n = out.shape
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ibl in range(n // QK_K):
            o = ibl * S_BYTES
            d = get_f16(qr, o)
            for ib in range(8):
                qh = _u16(qr, o + _S_QH + 2 * ib)
                dl = d * F32(2 * ((qh >> 12) & 7) + 1)
                delta = -_DELTA if qh & 0x8000 else _DELTA
                for l in range(4):
                    g = np.int64(qr[o + _S_QS + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                    v = ibl * QK_K + 32 * ib + 8 * l
                    for j in range(8):
                        y[v + j] = _shifted(dl, grid[g, j], delta)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_m_rows(q, out, grid):
    """dequantize_row_iq1_m (grid: grid_values())."""
    nrows, n = out.shape
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ibl in range(n // QK_K):
            o = ibl * M_BYTES
            sc = (_u16(qr, o + _M_SCALES), _u16(qr, o + _M_SCALES + 2), _u16(qr, o + _M_SCALES + 4),
                  _u16(qr, o + _M_SCALES + 6))
            h = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000)
            d = fp16_to_fp32(np.uint16(h))
            for ib in range(8):
                for half in range(2):
                    dl = d * F32(2 * ((sc[ib // 2] >> (6 * (ib % 2) + 3 * half)) & 7) + 1)
                    qh = np.int64(qr[o + _M_QH + 2 * ib + half])
                    for k in range(2):
                        g = np.int64(qr[o + 4 * ib + 2 * half + k]) | ((qh << (8 - 4 * k)) & 0x700)
                        delta = -_DELTA if qh & (0x08 << (4 * k)) else _DELTA
                        v = ibl * QK_K + 32 * ib + 16 * half + 8 * k
                        for j in range(8):
                            y[v + j] = _shifted(dl, grid[g, j], delta)
