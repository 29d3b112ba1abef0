"""Port of llama.cpp 0.3.36's CPU "tiled" MUL_MAT for K-quant weights (ggml-cpu/tiled/,
x86 AVX2 + FMA build, no AVX512-VNNI: the AVX2 micro-kernel tiled_run_microtile_avx2),
bit for bit.

When (ggml_compute_forward_mul_mat_tiled): src0 type Q2_K..Q6_K, IQ4_XS, IQ3_XXS / IQ3_S,
IQ2_XXS / IQ2_XS / IQ2_S or IQ1_S / IQ1_M, src0->extra == NULL (a plain buffer, not a
CPU_REPACK one), src1 rows n_tok >= 8 (ggml_tiled_min_batch; GGML_CPU_TILED_MM_FORCE=1 takes any batch), the master
switch GGML_CPU_TILED_MM not 0, no --use-ref; k is a multiple of 256 for K-quants.

src1 is quantized to Q8_K with the type's from_float (quantize_row_q8_K), as for vec_dot.

Per output element (weight row r, token t) the float order is (blocks b = 0..k/256-1 in
order, the tiling only splits rows/tokens, never K):
  s1 = sum over sub-blocks s of scale_s * sum_e w_e * q8_e      (exact int32; Q6_K/Q3_K
       debias their codes by 32/4 and pre-bias q8 by +128 then subtract the exact
       correction, which is the same integer; IQ4_XS: w = kvalues_iq4nl[index], scale
       ls - 32 per 32 values, the sign trick; IQ3_XXS / IQ3_S: w = +-grid level, scale
       2 ls + 1 per 32 values, and IQ3_XXS's d is fp16(d) * 0.25f, so unlike its vec_dot the
       quarter is applied per block, before the sums; IQ2: w = grid * sign, scale 2s + 1, and
       IQ1: w = 8 grid + delta, d = fp16 * 0.125 (tiled.cpp's unpacking, _decode_grid))
  s2 = sum_s min_s * bsum_s                                     (exact int32; Q2/Q4/Q5_K)
  res = d * float(s1)
  res = fma(-dmin, float(s2), res)                               (_mm256_fnmadd_ps; HAS_MIN)
  acc = fma(res, d8[t, b], acc)   with acc starting at 0.0f      (_mm256_fmadd_ps into buf)
"""
from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

from ..runtime.gemm import TILE_N, run_all
from ..runtime.kernels import fmaf
from ..codecs.lattice import KSIGNS
from ..codecs.iq3_grids import IQ3S_GRID, IQ3XXS_GRID
from .activations import quantize_rows

T = GGMLQuantizationType

# the grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): _decode_grid below
_GRID_TYPES = {T.IQ2_XXS: 66, T.IQ2_XS: 74, T.IQ2_S: 82, T.IQ1_S: 50, T.IQ1_M: 56}
TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.IQ3_XXS, T.IQ3_S) + tuple(_GRID_TYPES)
_BLOCK_BYTES = {T.Q2_K: 84, T.Q3_K: 110, T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210, T.IQ4_XS: 136,
                T.IQ3_XXS: 98, T.IQ3_S: 110, **_GRID_TYPES}
_HAS_MIN = {T.Q2_K: True, T.Q3_K: False, T.Q4_K: True, T.Q5_K: True, T.Q6_K: False,
            T.IQ4_XS: False, T.IQ3_XXS: False, T.IQ3_S: False, **{t: False for t in _GRID_TYPES}}
_KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                           113], np.int32)
# the IQ3 grids' points as 4 levels each (bytes of the little-endian words)
_GRID_XXS = np.array(IQ3XXS_GRID, np.uint32).view(np.uint8).reshape(-1, 4).astype(np.int32)
_GRID_S = np.array(IQ3S_GRID, np.uint32).view(np.uint8).reshape(-1, 4).astype(np.int32)


def applies(qtype, rows: int, k: int, n_tok: int, repacked: bool = False) -> bool:
    """True when ggml's CPU MUL_MAT takes the tiled path for these K-quant weights."""
    if os.environ.get("GGML_CPU_TILED_MM") is not None:
        try:
            if int(os.environ["GGML_CPU_TILED_MM"]) == 0:
                return False
        except ValueError:
            return False
    if repacked:
        return False
    if T(qtype) not in TYPES:
        return False
    if k % 256 != 0 or rows <= 0:
        return False
    forced = os.environ.get("GGML_CPU_TILED_MM_FORCE") == "1"
    return n_tok >= 8 or forced


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _decode(wb: np.ndarray, qtype, k: int):
    """Integer weights (rows, k) int8 (signed, debiased), scales and mins per 16 values
    (rows, k/16) int32, d and dmin (rows, k/256) float32."""
    qtype = T(qtype)
    rows = wb.shape[0]
    nb = k // 256
    bs = _BLOCK_BYTES[qtype]
    b = np.ascontiguousarray(wb).reshape(rows, nb, bs).astype(np.int32)
    raw = np.ascontiguousarray(wb).reshape(rows, nb, bs)
    e = np.arange(256)
    half, el = e >> 7, e & 127
    group, l = el >> 5, el & 31
    dmin = np.zeros((rows, nb), np.float32)
    mins = np.zeros((rows, nb, 16), np.int32)
    if qtype in _GRID_TYPES:
        w, scales, d = _decode_grid(raw, qtype)
    elif qtype in (T.IQ3_XXS, T.IQ3_S):
        sub, j = e >> 5, e & 31                                       # value e of sub-block sub
        point, bit = 8 * sub + (j >> 2), j & 7                        # its grid point, sign bit
        ib = np.arange(8)
        if qtype == T.IQ3_XXS:
            # tiled_unpack_src0(block_iq3_xxs): d * 0.25f (the grid counts quarter steps)
            d = _f16(raw[..., 0:2]) * np.float32(0.25)
            aux = (b[..., 66::4] | (b[..., 67::4] << 8) | (b[..., 68::4] << 16)
                   | (b[..., 69::4].astype(np.int64) << 24))          # (rows, nb, 8)
            ls = (aux >> 28).astype(np.int32)
            sg = KSIGNS[(aux[..., sub] >> (7 * (j >> 3))) & 127]
            level = _GRID_XXS[b[..., 2 + point], j & 3]
        else:
            d = _f16(raw[..., 0:2])
            ls = (b[..., 106 + ib // 2] >> (4 * (ib % 2))) & 0xF
            sg = b[..., 74 + 4 * sub + (j >> 3)]
            index = b[..., 2 + point] | (((b[..., 66 + sub] >> (j >> 2)) & 1) << 8)
            level = _GRID_S[index, j & 3]
        w = np.where((sg >> bit) & 1, -level, level)
        scales = np.repeat(2 * ls + 1, 2, axis=-1)                    # per 16 values
    elif qtype == T.IQ4_XS:
        d = _f16(raw[..., 0:2])
        sh = b[..., 2] | (b[..., 3] << 8)
        ib = np.arange(8)
        ls = ((b[..., 4 + ib // 2] >> (4 * (ib % 2))) & 0xF) | (((sh[..., None] >> (2 * ib)) & 3) << 4)
        scales = np.repeat(ls - 32, 2, axis=-1)                       # per 16 values
        sub, j = e >> 5, e & 31                                       # value e of sub-block sub
        byte = b[..., 8 + 16 * sub + (j & 15)]
        w = _KVALUES_IQ4NL[np.where(j < 16, byte & 0xF, byte >> 4)]
    elif qtype == T.Q6_K:
        ql, qh, sc = b[..., 0:128], b[..., 128:192], raw[..., 192:208].view(np.int8)
        d = _f16(raw[..., 208:210])
        qlb = ql[..., 64 * half + l + 32 * (group & 1)]
        nib = np.where(group < 2, qlb & 0xF, qlb >> 4)
        hi = (qh[..., 32 * half + l] >> (2 * group)) & 3
        w = (nib | (hi << 4)) - 32
        scales = sc.astype(np.int32)
    elif qtype == T.Q3_K:
        hm, qs, s12 = b[..., 0:32], b[..., 32:96], b[..., 96:108]
        d = _f16(raw[..., 108:110])
        low2 = (qs[..., half * 32 + l] >> (2 * group)) & 3
        hb = (hm[..., l] >> (half * 4 + group)) & 1
        w = (low2 | (hb << 2)) - 4
        j = np.arange(16)
        low4 = np.where(j < 8, s12[..., j % 8] & 0xF, s12[..., j % 8] >> 4)
        high2 = (s12[..., 8 + j % 4] >> (2 * (j // 4))) & 3
        scales = (low4 | (high2 << 4)) - 32
    elif qtype == T.Q2_K:
        s16, qs = b[..., 0:16], b[..., 16:80]
        d, dmin = _f16(raw[..., 80:82]), _f16(raw[..., 82:84])
        w = (qs[..., half * 32 + l] >> (2 * group)) & 3
        scales = s16 & 0xF
        mins = s16 >> 4
    else:  # Q4_K, Q5_K
        d, dmin = _f16(raw[..., 0:2]), _f16(raw[..., 2:4])
        q = b[..., 4:16]
        sc8 = np.empty((rows, nb, 8), np.int32)
        m8 = np.empty((rows, nb, 8), np.int32)
        for jj in range(8):
            if jj < 4:
                sc8[..., jj] = q[..., jj] & 63
                m8[..., jj] = q[..., jj + 4] & 63
            else:
                sc8[..., jj] = (q[..., jj + 4] & 0xF) | ((q[..., jj - 4] >> 6) << 4)
                m8[..., jj] = (q[..., jj + 4] >> 4) | ((q[..., jj] >> 6) << 4)
        scales = np.repeat(sc8, 2, axis=-1)
        mins = np.repeat(m8, 2, axis=-1)
        qs = b[..., 16:144] if qtype == T.Q4_K else b[..., 48:176]
        c, ll = e >> 6, e & 63
        byte = qs[..., 32 * c + (ll & 31)]
        w = np.where(ll < 32, byte & 0xF, byte >> 4)
        if qtype == T.Q5_K:
            qh = b[..., 16:48]
            w = w | (((qh[..., e & 31] >> (e >> 5)) & 1) << 4)
    w = np.ascontiguousarray(w.reshape(rows, k).astype(np.int8))
    scales = np.ascontiguousarray(np.asarray(scales).reshape(rows, k // 16).astype(np.int32))
    mins = np.ascontiguousarray(np.asarray(mins).reshape(rows, k // 16).astype(np.int32))
    return w, scales, mins, np.ascontiguousarray(d), np.ascontiguousarray(dmin)


def _decode_grid(raw: np.ndarray, qtype):
    """The grid i-quants as tiled.cpp's tiled_unpack_src0 unpacks them: signed values
    (rows, nb, 256), odd scales 2s + 1 per 16 values (rows, nb, 16), d = fp16 * 0.125 (rows,
    nb). IQ2: grid byte * sign; IQ1: 8 * grid + delta (the /8 folded into d)."""
    from .iq_grids import IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, KSIGNS_Q2XS

    def grid(tab, idx):
        return tab.view(np.uint8 if tab is not IQ1S_GRID else np.int8).reshape(-1, 8)[idx]

    b = raw.astype(np.int64)
    c = np.arange(8)[:, None]                   # 32-value chunk
    lg = np.arange(4)[None, :]                  # group of 8 in the chunk
    signs8 = KSIGNS_Q2XS.view(np.int8).reshape(-1, 8).astype(np.int32)
    if qtype == T.IQ1_M:
        sc = b[..., 48:56:2] | (b[..., 49:56:2] << 8)                            # (rows, nb, 4)
        u = ((sc[..., 0] >> 12) | ((sc[..., 1] >> 8) & 0xF0) | ((sc[..., 2] >> 4) & 0xF00)
             | (sc[..., 3] & 0xF000))
        d = _f16(u.astype("<u2").view(np.uint8).reshape(u.shape + (2,)))
    else:
        d = _f16(raw[..., 0:2])
    d = (d * np.float32(0.125)).astype(np.float32)
    if qtype == T.IQ2_XXS:
        aux1 = b[..., 6 + 8 * c[:, 0]] | (b[..., 7 + 8 * c[:, 0]] << 8) | (
            b[..., 8 + 8 * c[:, 0]] << 16) | (b[..., 9 + 8 * c[:, 0]] << 24)      # (rows, nb, 8)
        g = grid(IQ2XXS_GRID, b[..., 2 + 8 * c + lg])
        s = signs8[(aux1[..., None] >> (7 * lg)) & 127]
        w = g.astype(np.int32) * s
        ls = np.repeat(2 * (aux1 >> 28) + 1, 2, axis=-1)
    elif qtype in (T.IQ2_XS, T.IQ2_S):
        if qtype == T.IQ2_XS:
            q = b[..., 2 + 8 * c + 2 * lg] | (b[..., 3 + 8 * c + 2 * lg] << 8)
            g = grid(IQ2XS_GRID, q & 511)
            s = signs8[q >> 9]
            scb = b[..., 66:74]
        else:
            qh = b[..., 66:74][..., :, None]
            g = grid(IQ2S_GRID, b[..., 2 + 4 * c + lg] | ((qh << (8 - 2 * lg)) & 0x300))
            s = np.where((b[..., 34 + 4 * c + lg][..., None] >> np.arange(8)) & 1, -1, 1)
            scb = b[..., 74:82]
        w = g.astype(np.int32) * s
        ls = np.stack([2 * (scb & 15) + 1, 2 * (scb >> 4) + 1], axis=-1).reshape(scb.shape[:-1] + (16,))
    else:
        if qtype == T.IQ1_S:
            h = (b[..., 34:50:2] | (b[..., 35:50:2] << 8))[..., :, None]         # (.., 8, 1)
            idx = b[..., 2 + 4 * c + lg] | (((h >> (3 * lg)) & 7) << 8)
            delta = np.where(h & 0x8000, -1, 1)
            ls = np.repeat(2 * ((h[..., 0] >> 12) & 7) + 1, 2, axis=-1)
        else:
            h = b[..., 32 + 2 * c + (lg >> 1)]                                    # (.., 8, 4)
            idx = b[..., 4 * c + lg] | ((h << (8 - 4 * (lg & 1))) & 0x700)
            delta = np.where((h >> (3 + 4 * (lg & 1))) & 1, -1, 1)
            hw = sc[..., c[:, 0] // 2] >> (6 * (c[:, 0] % 2))                    # (.., 8)
            ls = np.stack([2 * (hw & 7) + 1, 2 * ((hw >> 3) & 7) + 1], axis=-1)
            ls = ls.reshape(hw.shape[:-1] + (16,))
        w = 8 * grid(IQ1S_GRID, idx).astype(np.int32) + delta[..., None]
    rows, nb = raw.shape[:2]
    return w.reshape(rows, nb, 256), ls, d


class Prepared:
    """One weight matrix decoded once for the tiled product: the codes times their
    sub-block scale (int16, |v| <= 127 * 32), the mins per 16 values (int16) and d, dmin."""

    def __init__(self, wb: np.ndarray, qtype):
        qtype = T(qtype)
        if qtype not in TYPES:
            raise ValueError(f"tiled kernel port covers {TYPES}, not {qtype.name}")
        self.qtype = qtype
        self.rows = wb.shape[0]
        self.k = wb.shape[1] // _BLOCK_BYTES[qtype] * 256
        if wb.shape[1] != self.k // 256 * _BLOCK_BYTES[qtype]:
            raise ValueError("weight bytes are not whole blocks")
        w, scales, mins, self.d, self.dmin = _decode(wb, qtype, self.k)
        scaled = w.astype(np.int16).reshape(self.rows, -1, 16) * scales.astype(np.int16)[..., None]
        self.scaled = np.ascontiguousarray(scaled.reshape(self.rows, self.k))
        self.mins = np.ascontiguousarray(mins.astype(np.int16))
        self.has_min = _HAS_MIN[qtype]


@njit(cache=True, nogil=True)
def _epilogue(s1, s2, d, dmin, has_min, d8, out, r0):
    """out[t, r0 + r] from the exact per-block integers s1, s2 (nb, rows, n_tok) in the
    tiled kernel's float order (see the module docstring)."""
    nb, rows, n_tok = s1.shape
    for r in range(rows):
        for t in range(n_tok):
            acc = np.float32(0.0)
            for b in range(nb):
                res = d[r0 + r, b] * np.float32(s1[b, r, t])
                if has_min:
                    res = fmaf(-dmin[r0 + r, b], np.float32(s2[b, r, t]), res)
                acc = fmaf(res, d8[t, b], acc)
            out[t, r0 + r] = acc


def matmul_prepared(prep: Prepared, x: np.ndarray) -> np.ndarray:
    """x (n_tok, k) float32 times the prepared weights: (n_tok, rows) float32.

    The integers s1 = sum_s scale_s * sum_e w_e q8_e and s2 = sum_s min_s bsum_s of every
    (block, row, token) come from float64 GEMMs: all terms and partial sums are integers
    below 2^31 (|scaled| <= 4096, |q8| <= 127, 256 terms), so float64 holds them exactly
    and the GEMM's order and threads cannot change them. The float steps then run in
    ggml's order per value, so the result is the same for any thread count."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tok, k = x.shape
    if k != prep.k:
        raise ValueError(f"activations have {k} columns, the weights {prep.k}")
    act = quantize_rows(x, T.Q8_K)
    nb = k // 256
    q8 = np.ascontiguousarray(act.qs, dtype=np.float64).reshape(n_tok, nb, 256)
    bsums = np.ascontiguousarray(act.sums, dtype=np.float64).reshape(n_tok, nb, 16)
    d8 = np.ascontiguousarray(act.d, dtype=np.float32)
    out = np.empty((n_tok, prep.rows), np.float32)

    def tile(r0: int) -> None:
        r1 = min(prep.rows, r0 + TILE_N)
        w = prep.scaled[r0:r1].astype(np.float64).reshape(r1 - r0, nb, 256)
        s1 = np.matmul(w.transpose(1, 0, 2), q8.transpose(1, 2, 0))      # (nb, rows, n_tok)
        if prep.has_min:
            m = prep.mins[r0:r1].astype(np.float64).reshape(r1 - r0, nb, 16)
            s2 = np.matmul(m.transpose(1, 0, 2), bsums.transpose(1, 2, 0))
        else:
            s2 = s1
        _epilogue(s1, s2, prep.d, prep.dmin, prep.has_min, d8, out, r0)

    run_all(tile, range(0, prep.rows, TILE_N))
    return out


def matmul(wb: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    """x (n_tok, k) float32 times weights wb (rows, row_bytes) of ggml `qtype` blocks, as
    ggml's tiled CPU kernel computes it: (n_tok, rows) float32."""
    return matmul_prepared(Prepared(wb, qtype), x)
