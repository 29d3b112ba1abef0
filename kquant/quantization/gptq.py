"""GPTQ into ggml's types: Optimal Brain Quantization with a layer Hessian (Frantar et al., 2022).

A weight matrix W (rows, k) multiplies inputs x of k values; over calibration tokens its layer
Hessian is H = sum x x^T (k, k). Replacing W by Q changes the layer's outputs by a squared error
of tr((W - Q) H (W - Q)^T). GPTQ quantizes the input columns in order and moves each step's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian, so later
columns make up for earlier ones.

ggml's types fix a block of columns at once (256 for the K-quants, 32 for the legacy types) with
one scale search over the block. So the sweep goes a block column at a time:
1. quantize the block column of the error-corrected W with kquant's own codec, which is
   llama.cpp's imatrix-weighted search bit for bit (the block fit stays llama.cpp's);
2. move the block's error E (rows, B) onto the later columns R in one BLAS update, the block
   form of the OBS update: with U the upper Cholesky factor of H^-1 (H^-1 = U^T U),
   W_R -= E U_bb^-1 U_bR.
Within a block, once the codec has fixed its scales (and mins), the values are rounded column
by column onto that block's grid of levels, each column's error moved onto the block's later
columns first (GPTQ's inner loop, a Numba kernel over rows); the levels are then written into
the codec's block (`set_levels_rows` of each type's module), and the block's total error goes on
to the later blocks through BLAS. The bytes are standard ggml blocks that any llama.cpp reads.

The result is kept row by row, where it lowers the Hessian-weighted error against plain
quantization of the same matrix (`GptqResult.chosen`), measured on calibration tokens the sweep
did not see where there are enough (`Heldout`); llama.cpp's bytes stay in the other rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from ..codecs import LegacyCodec, get_codec, iq4, legacy, q2_k, q3_k, q4_k, q5_k, q6_k, vectorizing
from ..codecs.threads import for_row_slices
from ..types import QType

#: the K-quants' level writers and their number of levels (the legacy types' are in legacy.py)
_K_LEVELS = {T.Q2_K: (q2_k, 4), T.Q3_K: (q3_k, 8), T.Q4_K: (q4_k, 16), T.Q5_K: (q5_k, 32),
             T.Q6_K: (q6_k, 64)}

#: IQ4_NL / IQ4_XS: 4-bit indices into kvalues_iq4nl under the block's scales, where the indices
#: of each 32-value group start in the block and how far apart the groups are (iq4.py)
_IQ4_LEVELS = {T.IQ4_NL: (2, 16), T.IQ4_XS: (8, 16)}
_IQ4_VALUES = np.array(iq4.KVALUES_IQ4NL, np.float64)

#: GPTQ's dampening: this fraction of H's mean diagonal is added to the diagonal, so the
#: inverse exists where the calibration text leaves directions unseen. GPTQ's paper uses 0.01;
#: on SmolLM2 (calibrated on a novel, measured on wikitext) 0.1 gave a lower KLD: a Hessian
#: from one text overfits it, and the dampening pulls the sweep towards plain rounding
DAMP = 0.1

#: how many times the first token of each calibration chunk counts in the Hessians. That token
#: (BOS) is the attention sink: every later position reads its keys and values, so an error in
#: its activations reaches the whole chunk, while the Hessian counts it once among 512. On
#: SmolLM2 Q4_K_M (off-grid copy) mean KLD against llama.cpp's file: weight 1 1.03x, 16 0.85x,
#: 64 0.82x, 256 0.83x (README, "Closer to the original")
SINK_WEIGHT = 64.0

#: how far the sequential sweep aims at the float model's outputs rather than at the matrix's own
#: outputs on its (already error-carrying) inputs; 0 is plain GPTQ (see `corrected_target`).
#: On SmolLM2 off-grid Q3_K_M, mean KLD (kquant-perplexity; llama.cpp's file 0.117483): 0 gives
#: 0.102815, 0.25 0.092656, 1 0.100583 (the full pull fits the calibration text too closely)
ASYM = 0.25

#: the sequential sweep keeps every HOLDOUT-th calibration chunk out of its Hessians and judges
#: each row, GPTQ's against plain quantization's, on those tokens (0: on the sweep's own
#: Hessian, which favours GPTQ: the sweep fits that Hessian's noise as well as its signal).
#: On SmolLM2 as published, Q5_K_M (mean KLD by kquant-perplexity; llama.cpp's file 0.006797),
#: whole matrices judged on their own Hessians gave about 1.03x llama.cpp's KLD, rows judged on
#: held-out chunks 0.006258 (0.92x)
HOLDOUT = 4


@dataclass(frozen=True)
class GptqSettings:
    """How the sweep runs: the dampening (fraction of H's mean diagonal added to it) and the
    column order inside each block."""

    damp: float = DAMP
    act_order: bool = True
    sink_weight: float = SINK_WEIGHT  # sequential sweep only: the first token's weight in H
    asym: float = ASYM  # sequential sweep only: the pull towards the float model's outputs
    holdout: int = HOLDOUT  # sequential sweep only: every n-th chunk judges the rows (0: none)


@dataclass
class GptqResult:
    """GPTQ's bytes and plain quantization's for one matrix, with each row's error; the file
    takes each row from whichever errs less (`chosen`). ggml's blocks never span rows, so
    rows from either can be mixed."""

    data: np.ndarray  # uint8 (rows, row bytes): ggml blocks of the type, by GPTQ
    plain_data: np.ndarray  # plain (imatrix-weighted) quantization of W: llama.cpp's bytes
    q: np.ndarray  # what data decodes to (rows, k) float32
    plain: np.ndarray  # what plain_data decodes to
    error_rows: np.ndarray  # float64 (rows,): each GPTQ row's error (tr(dW H dW^T) by rows)
    plain_error_rows: np.ndarray  # the same for plain quantization's rows

    @property
    def chosen(self) -> np.ndarray:
        """The rows where GPTQ's bytes go into the file."""
        return self.error_rows < self.plain_error_rows

    @property
    def error(self) -> float:
        """The error of the chosen rows."""
        return float(np.minimum(self.error_rows, self.plain_error_rows).sum())

    @property
    def plain_error(self) -> float:
        return float(self.plain_error_rows.sum())

    @property
    def improved(self) -> bool:
        return bool(self.chosen.any())

    @property
    def bytes(self) -> np.ndarray:
        """The file's bytes: GPTQ's rows where chosen, plain quantization's elsewhere."""
        return np.where(self.chosen[:, None], self.data, self.plain_data)

    def judge(self, heldout: Heldout, w: np.ndarray) -> None:
        """Measure both candidates' rows on held-out tokens instead of on the Hessian they
        were fitted to (which favours GPTQ: its sweep fits that Hessian's noise too)."""
        self.error_rows, self.plain_error_rows = heldout.row_errors(w, self.q, self.plain)


def row_errors(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> np.ndarray:
    """(w - q) h (w - q)^T's diagonal: each row's squared output change over the tokens whose
    Hessian is h."""
    d = (w.astype(np.float64) - q.astype(np.float64))
    return np.einsum("ij,ij->i", d @ h, d)


def hessian_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """tr((w - q) h (w - q)^T): the summed squared change of the layer's outputs over the
    calibration tokens whose Hessian is h."""
    return float(row_errors(w, q, h).sum())


@dataclass
class Heldout:
    """Gram matrices of calibration tokens kept out of the sweep's Hessian, to judge its result
    on: X_q the inputs the matrix sees (the quantized blocks' outputs), X_m those whose outputs
    it should give (X_q itself, or pulled towards the float model's as the sweep aims). A
    candidate Q's row r errs by ||X_m w_r - X_q q_r||^2 = w_r mm w_r - 2 w_r mq q_r + q_r qq q_r."""

    qq: np.ndarray  # X_q^T X_q (k, k) float64
    mq: np.ndarray  # X_m^T X_q
    mm: np.ndarray  # X_m^T X_m

    def row_errors(self, w: np.ndarray, *candidates: np.ndarray) -> list[np.ndarray]:
        """Each candidate's row errors (float64 (rows,)) for the float matrix w."""
        w64 = w.astype(np.float64)
        base = np.einsum("ij,ij->i", w64 @ self.mm, w64)
        wm = w64 @ self.mq
        out = []
        for q in candidates:
            q64 = q.astype(np.float64)
            e = base - 2 * np.einsum("ij,ij->i", wm, q64) + np.einsum("ij,ij->i", q64 @ self.qq, q64)
            out.append(np.maximum(e, 0.0))  # cancellation can take an exact fit a hair below 0
        return out


def damped(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """h + damp * mean(diag h) * I, in float64, columns no token reached (zero diagonal) given
    a unit diagonal first: the Hessian the sweep inverts."""
    h = np.array(h, dtype=np.float64)
    dead = np.flatnonzero(np.diagonal(h) <= 0)
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diagonal(h)))
    h[np.diag_indices_from(h)] += damp * mean
    return h


def corrected_target(w: np.ndarray, h: np.ndarray, cross: np.ndarray, alpha: float,
                     damp: float = DAMP) -> np.ndarray:
    """The float matrix that GPTQ should aim at when its inputs carry upstream errors.

    With X_q the inputs the quantized blocks before produce (rows are tokens) and X_f the float
    model's, the layer should give X_f W^T, not X_q W^T. The least-squares matrix for that on
    the inputs it will see is W* = W X_f^T X_q (X_q^T X_q)^-1 = W + W D^T X_q H^-1 with
    D = X_f - X_q, H = X_q^T X_q; and ||X_f W^T - X_q Q^T||^2 = tr((W* - Q) H (W* - Q)^T) +
    a constant, so GPTQ on W* with H minimises the error against the float model (the
    asymmetric calibration of GPTAQ, Li et al., 2025). `cross` is D^T X_q, H is dampened as
    in the sweep, and alpha scales the correction (0: W itself)."""
    if alpha == 0:
        return w
    hd = damped(h, damp)
    lower = np.linalg.cholesky(hd)
    wc = w.astype(np.float64) @ cross  # (rows, k)
    y = np.linalg.solve(lower, wc.T)
    return (w + alpha * np.linalg.solve(lower.T, y).T).astype(np.float32)


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U, upper triangular with U^T U = damped(h)^-1."""
    h = damped(h, damp)
    lower = np.linalg.cholesky(h)
    inv_lower = np.linalg.solve(lower, np.eye(len(h)))
    h_inv = inv_lower.T @ inv_lower
    # h_inv = L L^T with L lower, so U = L^T: U^T U = h_inv
    return np.linalg.cholesky(h_inv).T.copy()


def quantize_block_column(w: np.ndarray, original: np.ndarray, qtype: QType,
                          imatrix: np.ndarray | None, c0: int) -> np.ndarray:
    """The bytes (rows, type size) of the block column starting at column c0 of w, as the codec
    quantizes rows: K-quant fits read only their block; legacy ones also the row's sigma2,
    taken from the `original` rows, as plain quantization takes it (so that without
    error to move, GPTQ's bytes are plain quantization's)."""
    codec = get_codec(qtype)
    B = codec.block_size
    use_qw = imatrix is not None and codec.uses_imatrix
    if isinstance(codec, LegacyCodec):
        out = np.empty((w.shape[0], codec.type_size), np.uint8)
        qw = np.ascontiguousarray(imatrix, np.float32) if use_qw else np.zeros(0, np.float32)
        w = np.ascontiguousarray(w)
        with vectorizing():
            for_row_slices(len(w), lambda a, b: legacy.quantize_block_column(
                codec.kind, w[a:b], original[a:b], qw, use_qw, c0 // B, out[a:b]))
        return out
    qw = imatrix[c0:c0 + B] if use_qw else None
    return codec.quantize_rows(np.ascontiguousarray(w[:, c0:c0 + B]), qw)


def level_values(qtype: QType) -> np.ndarray:
    """The values v(L) of the type's stored levels, increasing, float64: its grid is
    scale * v(L) + offset. L itself for the linear types; the IQ4 table for IQ4_NL / IQ4_XS."""
    codec = get_codec(qtype)
    if codec.qtype in _IQ4_LEVELS:
        return _IQ4_VALUES
    if isinstance(codec, LegacyCodec):
        return np.arange(legacy.n_levels(codec.kind), dtype=np.float64)
    return np.arange(_K_LEVELS[codec.qtype][1], dtype=np.float64)


def set_levels(data: np.ndarray, levels: np.ndarray, qtype: QType) -> np.ndarray:
    """A copy of one block column's bytes (rows, type size) with these stored levels (rows,
    block size), the scales as they were."""
    codec = get_codec(qtype)
    out = data.copy()
    levels = np.ascontiguousarray(levels, np.int32)
    if isinstance(codec, LegacyCodec):
        def work(a, b):
            legacy.set_levels_rows(codec.kind, out[a:b], levels[a:b])
    elif codec.qtype in _IQ4_LEVELS:
        def work(a, b):
            iq4.set_levels_rows(out[a:b], levels[a:b], *_IQ4_LEVELS[codec.qtype])
    else:
        def work(a, b):
            _K_LEVELS[codec.qtype][0].set_levels_rows(out[a:b], levels[a:b])
    for_row_slices(len(out), work)
    return out


def block_levels(data: np.ndarray, qtype: QType) -> np.ndarray:
    """The stored levels (rows, block size) of one block column where the sweep keeps them (a
    value whose scale is 0: any level decodes alike, so the codec's choice stays): the IQ4
    indices; the other types' sweeps write level 0 there."""
    codec = get_codec(qtype)
    levels = np.zeros((len(data), codec.block_size), np.int32)
    if codec.qtype in _IQ4_LEVELS:
        for_row_slices(len(data), lambda a, b: iq4.levels_rows(data[a:b], levels[a:b],
                                                              *_IQ4_LEVELS[codec.qtype]))
    return levels


def block_grid(data: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """scale and offset (rows, block size) of one block column's grids, value = scale * v(L) +
    offset (v: level_values), read by decoding the block with every level 0 and then 1 (so no
    type needs its scale arithmetic written twice; float64 differences, used only to pick
    levels)."""
    codec = get_codec(qtype)
    B = codec.block_size
    v = level_values(qtype)
    zero = codec.dequantize_rows(set_levels(data, np.zeros((len(data), B), np.int32), qtype), B)
    one = codec.dequantize_rows(set_levels(data, np.ones((len(data), B), np.int32), qtype), B)
    scale = (one.astype(np.float64) - zero) / (v[1] - v[0])
    return scale, zero - scale * v[0]


@njit(cache=True, inline="always")
def _nearest_level(t, values, linear):
    """The level whose value is nearest t: rint on a linear grid (values 0..n-1), else the
    count of midpoints at or below t (the upper level on a tie, as best_index_int8)."""
    n = values.size
    if linear:
        return min(n - 1, max(0, int(np.rint(t))))
    level = 0
    for m in range(1, n):
        if t >= 0.5 * (values[m - 1] + values[m]):
            level = m
    return level


@njit(cache=True, parallel=True)
def round_columns(w, scale, offset, values, linear, u, levels, err):
    """GPTQ's inner loop on one block column, in place: per row, column j's value goes to its
    nearest level of the grid scale * values[L] + offset, and its error, scaled by 1 / U[j, j],
    moves onto the columns after j through row j of U. levels holds on entry the levels to keep
    where the scale is 0 and gets the stored levels, err the scaled errors that the caller
    moves on to the later blocks."""
    rows, B = w.shape
    for r in prange(rows):
        for j in range(B):
            s = scale[r, j]  # may be negative (Q3_K's, Q6_K's, IQ4's signed scales) or 0
            level = levels[r, j]
            if s != 0:
                level = _nearest_level((w[r, j] - offset[r, j]) / s, values, linear)
            levels[r, j] = level
            e = (w[r, j] - (s * values[level] + offset[r, j])) / u[j, j]
            err[r, j] = e
            for t in range(j + 1, B):
                w[r, t] -= e * u[j, t]


def column_order(h: np.ndarray, block: int) -> np.ndarray:
    """GPTQ's "act-order" inside ggml's blocks: each block's columns by decreasing Hessian
    diagonal (the most active inputs rounded first, while the most columns are left to take
    their error). Blocks keep their place: each is one scale fit, made before its columns round."""
    d = np.diagonal(h)
    return np.concatenate([c0 + np.argsort(-d[c0:c0 + block], kind="stable")
                           for c0 in range(0, len(d), block)])


def gptq_quantize(w: np.ndarray, h: np.ndarray, qtype: QType, imatrix: np.ndarray | None = None,
                  settings: GptqSettings = GptqSettings(), plain_of: np.ndarray | None = None
                  ) -> GptqResult:
    """W (rows, k) float32 quantized to qtype by GPTQ with Hessian h (k, k); `imatrix` weights
    the codec's block fits (llama.cpp's), as in plain quantization. The sweep runs in the
    column order `column_order` gives (with settings.act_order) or in storage order. The
    alternative is plain quantization of `plain_of` (default W: the matrix the file would have
    without GPTQ); both errors are measured against W."""
    codec = get_codec(qtype)
    rows, k = w.shape
    B = codec.block_size
    if k % B:
        raise ValueError(f"{codec.name} needs rows that are a multiple of {B} values; got {k}")
    if h.shape != (k, k):
        raise ValueError(f"a Hessian of shape {h.shape} does not fit rows of {k} values")
    perm = column_order(h, B) if settings.act_order else np.arange(k)
    u = inverse_cholesky(h[np.ix_(perm, perm)], settings.damp)
    w32 = np.ascontiguousarray(w, np.float32)
    cur = w.astype(np.float64)[:, perm]  # the error-corrected weights, in sweep order
    data = np.empty((rows, k // B * codec.type_size), np.uint8)
    q = np.empty((rows, k), np.float32)
    for c0 in range(0, k, B):
        c1 = c0 + B
        local = perm[c0:c1] - c0  # sweep position j holds the block's column local[j]
        back = np.argsort(local)  # and the block's column i sits at sweep position back[i]
        now = cur.astype(np.float32)
        now[:, c0:c1] = now[:, c0:c1][:, back]
        block = quantize_block_column(now, w32, qtype, imatrix, c0)
        scale, offset = block_grid(block, qtype)
        levels = np.ascontiguousarray(block_levels(block, qtype)[:, local])
        scaled = np.empty((rows, B), np.float64)
        values = level_values(qtype)
        round_columns(cur[:, c0:c1], np.ascontiguousarray(scale[:, local]),
                      np.ascontiguousarray(offset[:, local]), values,
                      bool(np.array_equal(values, np.arange(values.size))), u[c0:c1, c0:c1],
                      levels, scaled)
        block = set_levels(block, levels[:, back], qtype)
        data[:, c0 // B * codec.type_size:c1 // B * codec.type_size] = block
        q[:, c0:c1] = codec.dequantize_rows(block, B)
        cur[:, c0:c1] = q[:, c0:c1][:, local]
        if c1 < k:
            cur[:, c1:] -= scaled @ u[c0:c1, c1:]
    plain_data = codec.quantize_rows(w32 if plain_of is None else np.ascontiguousarray(plain_of, np.float32),
                                     imatrix)
    plain = codec.dequantize_rows(plain_data, k)
    return GptqResult(data, plain_data, q, plain, row_errors(w, q, h), row_errors(w, plain, h))
