"""IQ3_XXS and IQ3_S: groups of 4 values as points of a 3-bit grid (256 or 512 points),
8 signs a byte, 256-value super-blocks of 8 sub-blocks of 32.

block_iq3_xxs (98 bytes):
  0       2                           66                                   98
  | d f16 | qs: 64 grid indices, 8 a sub-block | scales_and_signs: 8 x u32 LE |
  sub-block ib: u32 s = scales_and_signs[ib]; 4 x 7 sign bits (s >> 7*l) & 127 for its
  groups of 8 (the 8th sign is the parity: ksigns_iq2xs), 4-bit scale s >> 28;
  value = d * (0.5 + (s >> 28)) * 0.5 * iq3xxs_grid[qs[8*ib + g]][j] * sign.

block_iq3_s (110 bytes):
  0       2                        66              74                 106        110
  | d f16 | qs: 64 low index bytes   | qh: 8 bytes    | signs: 32 bytes    | scales: 4 |
  group g of sub-block ib: index qs[8*ib + g] | ((qh[ib] >> g) & 1) << 8 into iq3s_grid,
  8 full sign bits a byte (signs[4*ib + l] for values 8l..8l+7), 4-bit scale
  (scales[ib/2] >> 4*(ib%2)) & 0xF; value = d * (1 + 2*scale) * iq3s_grid[index][j] * sign.

Ports ggml-quants.c's quantize_iq3_xxs (quantize_row_iq3_xxs_impl(256, ...)) and
quantize_iq3_s (quantize_row_iq3_s_impl(32, ...)), with and without quant_weights (without,
the weights are x^2: ggml_quantize_chunk quantizes both types without an imatrix), and
dequantize_row_iq3_xxs / dequantize_row_iq3_s, float32 in C's order. The quantizer's tables
(kmap: a 3-bit point's grid index, or where its nearest grid points are listed; kneighbors)
are iq3xs_init_impl's, built from the grid at import by lattice.py (checksums in tests/test_iq3.py).

Two quirks of the C kept on purpose: IQ3_S skips an all-zero sub-block without advancing its
qs / signs pointers, so the next sub-block's indices and signs land in the skipped one's
bytes (qh and the scales stay by sub-block); and a super-block whose scales all come out 0
keeps d = 0 with whatever indices were written (IQ3_S) or all zero bytes (IQ3_XXS).

Where ggml aborts (GGML_ASSERT: no listed neighbour at a finite distance, or a NaN scale; in
practice rows with inf / NaN values or whose x^2 overflows), the kernels flag the row and the
codec raises ValueError rather than return bytes ggml never writes.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, get_f16, nearest_int, put_f16
from .iq3_grids import IQ3S_GRID, IQ3XXS_GRID, KGRID_256, KGRID_512
from .lattice import KSIGNS, best_neighbour, build_tables, fold_signs, level_sums, sigma2 as _sigma2, signed as _signed
from .layout import QK_K

XXS_BYTES = 98
S_BYTES = 110
_XXS_QS, _XXS_SS = 2, 66
_S_QS, _S_QH, _S_SIGNS, _S_SCALES = 2, 66, 74, 106

_KMAP_SIZE = 4096  # every code of 4 levels of 3 bits

XXS_LEVELS, XXS_GPOS, XXS_KMAP, XXS_NEIGHBOURS = build_tables(KGRID_256, 2, 4, 3, _KMAP_SIZE)
S_LEVELS, S_GPOS, S_KMAP, S_NEIGHBOURS = build_tables(KGRID_512, 3, 4, 3, _KMAP_SIZE)
_XXS_DGRID = np.array(IQ3XXS_GRID, np.uint32).view(np.uint8).reshape(256, 4).astype(np.float32)
_S_DGRID = np.array(IQ3S_GRID, np.uint32).view(np.uint8).reshape(512, 4).astype(np.float32)
#: ggml-common.h's ksigns_iq2xs: 7 sign bits and their parity as the 8th

_ZERO = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_TWO = F32(2.0)
_FIFTEEN = F32(15.0)
_FIFTH = F32(0.2)
_F31 = F32(31.0)
_QK = F32(QK_K)
_EPS_XXS = F32(1e-8)
_FUDGE_XXS = F32(1.0125)
_FUDGE_S = F32(1.033)


@njit(cache=True, error_model="numpy", inline="always")
def _round_group(id_, xval, o, L):
    """nearest_int(0.5*(id*xval - 1)) clamped to 0..7 for 4 values; the point's code u."""
    u = 0
    for i in range(4):
        l = nearest_int(_HALF * (id_ * xval[o + i] - _ONE))
        l = max(0, min(7, l))
        L[o + i] = l
        u |= l << (3 * i)
    return u


@njit(cache=True, error_model="numpy", inline="always")
def _sub_block(xb, qwb, use_qw, sigma2, xxs, levels, gpos, kmap, nb, s):
    """One 32-value sub-block of quantize_row_iq3_*_impl: its scale (or -1 when C skips it),
    with L (levels), signs (4 bytes) set in the scratch."""
    weight, waux, xval, L, Laux, on, on_aux, signs, failed = s
    if use_qw:
        for i in range(32):
            weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        for i in range(32):
            weight[i] = xb[i] * xb[i]
    for i in range(32):
        waux[i] = np.sqrt(weight[i])
    mx = fold_signs(xb, weight, xval, signs, 4, xxs)
    for i in range(32):
        L[i] = 0
    if xxs:
        if mx < _EPS_XXS:
            return F32(-1.0)
    elif not mx != _ZERO:
        return F32(-1.0)
    best = _ZERO
    scale = mx / _FIFTEEN
    for k in range(8):
        on[k] = xxs
    ntry = 15 if xxs else 9
    for is_ in range(-ntry, ntry + 1):
        id_ = (_FIFTEEN + F32(is_) * _FIFTH) / mx
        this_scale = _ONE / id_
        for k in range(8):
            u = _round_group(id_, xval, 4 * k, Laux)
            on_aux[k] = True
            if kmap[u] < 0:
                on_aux[k] = False
                best_neighbour(nb, -kmap[u] - 1, gpos, levels, xval, waux, 4 * k, this_scale,
                               Laux, failed, 4)
        sumqx, sumq2 = level_sums(32, weight, xval, Laux)
        if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(32):
                L[i] = Laux[i]
            for k in range(8):
                on[k] = on_aux[k]
    n_not_ongrid = 0
    for k in range(8):
        if not on[k]:
            n_not_ongrid += 1
    if n_not_ongrid > 0 and scale > _ZERO:
        id_ = _ONE / scale
        for k in range(8):
            if xxs and on[k]:
                continue
            u = _round_group(id_, xval, 4 * k, L)
            gi = kmap[u]
            if gi < 0:
                best_neighbour(nb, -gi - 1, gpos, levels, xval, waux, 4 * k, scale, L, failed, 4)
        sumqx, sumq2 = level_sums(32, weight, xval, L)
        if sumq2 > _ZERO:
            scale = sumqx / sumq2
    if scale < _ZERO:
        scale = -scale
        for k in range(4):
            signs[k] = (~signs[k]) & (127 if xxs else 255)
    if not scale >= _ZERO:  # NaN: ggml's GGML_ASSERT(scale >= 0) aborts
        failed[0] = 1
        scale = _ZERO
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def _code(L, o):
    u = 0
    for i in range(4):
        u |= np.int64(L[o + i]) << (3 * i)
    return u


@njit(cache=True, error_model="numpy", inline="always")
def _scratch():
    return (np.empty(32, np.float32), np.empty(32, np.float32), np.empty(32, np.float32),
            np.empty(32, np.int64), np.empty(32, np.int64), np.empty(8, np.bool_),
            np.empty(8, np.bool_), np.empty(4, np.int64), np.zeros(1, np.int64))


@njit(cache=True, error_model="numpy", inline="always")
def _xxs_block(x, qw, use_qw, y, s, scales):
    L = s[3]
    signs = s[7]
    for i in range(XXS_BYTES):
        y[i] = 0
    sigma2 = _sigma2(x)
    max_scale = _ZERO
    for ib in range(8):
        scale = _sub_block(x[32 * ib:32 * ib + 32], qw[32 * ib:32 * ib + 32], use_qw, sigma2,
                           True, XXS_LEVELS, XXS_GPOS, XXS_KMAP, XXS_NEIGHBOURS, s)
        if scale < _ZERO:
            scales[ib] = _ZERO
            continue
        for k in range(8):
            y[_XXS_QS + 8 * ib + k] = XXS_KMAP[_code(L, 4 * k)]
        ss = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
        for b in range(4):
            y[_XXS_SS + 4 * ib + b] = (ss >> (8 * b)) & 0xFF
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if not max_scale != _ZERO:
        for i in range(XXS_BYTES):
            y[i] = 0
        return
    d = max_scale / _F31
    put_f16(y, 0, d * _FUDGE_XXS)
    id_ = _ONE / d
    for ib in range(8):
        l = nearest_int(_HALF * (id_ * scales[ib] - _ONE))
        l = max(0, min(15, l))
        y[_XXS_SS + 4 * ib + 3] |= l << 4


@njit(cache=True, error_model="numpy", inline="always")
def _s_block(x, qw, use_qw, y, s, scales):
    L = s[3]
    signs = s[7]
    for i in range(S_BYTES):
        y[i] = 0
    sigma2 = _sigma2(x)
    max_scale = _ZERO
    qs = _S_QS
    sp = _S_SIGNS
    for ib in range(8):
        scale = _sub_block(x[32 * ib:32 * ib + 32], qw[32 * ib:32 * ib + 32], use_qw, sigma2,
                           False, S_LEVELS, S_GPOS, S_KMAP, S_NEIGHBOURS, s)
        if scale < _ZERO:
            scales[ib] = _ZERO
            continue
        for k in range(8):
            gi = S_KMAP[_code(L, 4 * k)]
            y[qs + k] = gi & 255
            y[_S_QH + ib] |= (gi >> 8) << k
        qs += 8
        for k in range(4):
            y[sp + k] = signs[k]
        sp += 4
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if not max_scale != _ZERO:
        return
    d = max_scale / _F31
    put_f16(y, 0, d * _FUDGE_S)
    id_ = _ONE / d
    for ib in range(0, 8, 2):
        l1 = max(0, min(15, nearest_int(_HALF * (id_ * scales[ib] - _ONE))))
        l2 = max(0, min(15, nearest_int(_HALF * (id_ * scales[ib + 1] - _ONE))))
        y[_S_SCALES + ib // 2] = l1 | (l2 << 4)


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_xxs_rows(x, qw, use_qw, out, failed):
    """quantize_iq3_xxs: rows in order (threads.py runs slices of them side by side), super-blocks in order; failed[r] = 1 where ggml
    would abort on row r."""
    nrows, n = x.shape
    for r in range(nrows):
        s = _scratch()
        scales = np.empty(8, np.float32)
        for i in range(n // QK_K):
            _xxs_block(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K], use_qw,
                       out[r, i * XXS_BYTES:(i + 1) * XXS_BYTES], s, scales)
        failed[r] = s[8][0]


@njit(cache=True, error_model="numpy", nogil=True)
def quantize_s_rows(x, qw, use_qw, out, failed):
    """quantize_iq3_s: rows in order (threads.py runs slices of them side by side), super-blocks in order (failed as for IQ3_XXS)."""
    nrows, n = x.shape
    for r in range(nrows):
        s = _scratch()
        scales = np.empty(8, np.float32)
        for i in range(n // QK_K):
            _s_block(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K], use_qw,
                     out[r, i * S_BYTES:(i + 1) * S_BYTES], s, scales)
        failed[r] = s[8][0]


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_xxs_rows(q, out):
    """dequantize_row_iq3_xxs."""
    nrows, n = out.shape
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ibl in range(n // QK_K):
            o = ibl * XXS_BYTES
            d = get_f16(qr, o)
            for ib in range(8):
                p = o + _XXS_SS + 4 * ib
                aux = (np.int64(qr[p]) | (np.int64(qr[p + 1]) << 8) | (np.int64(qr[p + 2]) << 16)
                       | (np.int64(qr[p + 3]) << 24))
                db = d * (_HALF + F32(aux >> 28)) * _HALF
                for l in range(4):
                    sg = KSIGNS[(aux >> (7 * l)) & 127]
                    g1 = qr[o + _XXS_QS + 8 * ib + 2 * l]
                    g2 = qr[o + _XXS_QS + 8 * ib + 2 * l + 1]
                    v = ibl * QK_K + 32 * ib + 8 * l
                    for j in range(4):
                        a = db * _XXS_DGRID[g1, j]
                        b = db * _XXS_DGRID[g2, j]
                        y[v + j] = _signed(a, sg, j)
                        y[v + j + 4] = _signed(b, sg, j + 4)


@njit(cache=True, error_model="numpy", nogil=True)
def dequantize_s_rows(q, out):
    """dequantize_row_iq3_s."""
    nrows, n = out.shape
    for r in range(nrows):
        qr = q[r]
        y = out[r]
        for ibl in range(n // QK_K):
            o = ibl * S_BYTES
            d = get_f16(qr, o)
            for ib in range(8):
                sc = (np.int64(qr[o + _S_SCALES + ib // 2]) >> (4 * (ib % 2))) & 0xF
                db = d * F32(1 + 2 * sc)
                qh = np.int64(qr[o + _S_QH + ib])
                for l in range(4):
                    sg = qr[o + _S_SIGNS + 4 * ib + l]
                    g1 = np.int64(qr[o + _S_QS + 8 * ib + 2 * l]) | (((qh >> (2 * l)) & 1) << 8)
                    g2 = np.int64(qr[o + _S_QS + 8 * ib + 2 * l + 1]) | (((qh >> (2 * l + 1)) & 1) << 8)
                    v = ibl * QK_K + 32 * ib + 8 * l
                    for j in range(4):
                        a = db * _S_DGRID[g1, j]
                        b = db * _S_DGRID[g2, j]
                        y[v + j] = _signed(a, sg, j)
                        y[v + j + 4] = _signed(b, sg, j + 4)
