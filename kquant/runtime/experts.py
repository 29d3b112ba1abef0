"""Mixture-of-experts routing as llama.cpp's build_moe_ffn computes it (src/llama-graph.cpp),
softmax gating, on the CPU's float order:

    logits  = h @ ffn_gate_inp.T                       (N, n_expert)
    probs   = soft_max(logits)                         max, exp(x - max) summed in double, times 1/sum
    sel     = argsort(probs, descending)[:, :k]        (N, k) expert ids, best first
    w       = probs[sel]                               (norm_w: w / max(sum(w), 2^-14); w_scale)
    out     = sum over slots j in order of  down_e(swiglu(gate_e(h), up_e(h))) * w[:, j]

The products themselves are the Transformer's (kquant.runtime.forward), per expert over the
tokens routed to it.  `ExpertInput` is what an observer (the imatrix collector) sees for a
stacked expert tensor: the rows multiplied with it and which expert each token's slot chose,
as llama-imatrix reads ggml_mul_mat_id's src1 and ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from .kernels import expf

F32 = np.float32
# ggml_clamp's floor for the top-k weights' sum: the smallest normal float16
_MIN_WEIGHT_SUM = F32(6.103515625e-5)


@dataclass(frozen=True)
class ExpertInput:
    """The input of a stacked expert tensor's product (ggml_mul_mat_id): `x` (N, cols), the
    same row for every slot of a token (gate/up), or (N, k, cols), one row per slot (down);
    `ids` (N, k) the expert of each token's slot, host int64; `n_expert` the experts stacked
    (ggml's n_as: an entry's rows, routed to or not)."""

    x: Any
    ids: np.ndarray
    n_expert: int


@njit(parallel=True, cache=True)
def router_softmax(logits):
    """ggml_soft_max over each row of (N, n_expert) float32: exp(x - max) with ggml's expf,
    summed in float64, times the float32 1/sum."""
    rows, n = logits.shape
    out = np.empty((rows, n), np.float32)
    for r in prange(rows):
        m = F32(-np.inf)
        for j in range(n):
            m = max(m, logits[r, j])
        total = 0.0
        for j in range(n):
            v = expf(logits[r, j] - m)
            out[r, j] = v
            total += v
        inv = F32(1.0 / total)
        for j in range(n):
            out[r, j] *= inv
    return out


def route(probs: np.ndarray, k: int, norm: bool, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The k experts of each row of `probs` (host float32), best first as ggml_argsort_top_k
    orders them, and their weights: renormalized to sum 1 (`norm`, build_moe_ffn's norm_w,
    the sum in float64 as ggml_sum_rows, clamped), then times `scale` where it is not 0 or 1."""
    sel = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, sel, axis=1)
    if norm:
        total = np.maximum(w.sum(axis=1, dtype=np.float64).astype(F32), _MIN_WEIGHT_SUM)
        w = w / total[:, None]
    if scale not in (0.0, 1.0):
        w = w * F32(scale)
    return sel.astype(np.int64), np.ascontiguousarray(w, dtype=F32)


def expert_rows(ids: np.ndarray, n_expert: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per expert, the (token, slot) pairs routed to it, tokens in order."""
    tok, slot = np.nonzero(ids.reshape(len(ids), -1) >= 0)
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")  # by expert; within one, by token then slot
    bounds = np.searchsorted(flat[order], np.arange(n_expert + 1))
    return [(tok[order[a:b]], slot[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


@njit(cache=True)
def accumulate_expert_sumsq(sums, counts, x, ids):
    """llama-imatrix's ggml_mul_mat_id branch: for each slot, then each token in order, the
    squares of the slot's input row added to its expert's sums (float32, in that order) and
    the expert's count incremented. sums (n_expert, cols), counts (n_expert,), x (N, S, cols)
    with S = 1 (one row shared by the slots) or k, ids (N, k)."""
    n_tok, k = ids.shape
    cols = x.shape[2]
    n_rows = x.shape[1]
    for idx in range(k):
        i11 = idx % n_rows
        for row in range(n_tok):
            ex = ids[row, idx]
            counts[ex] += 1
            for j in range(cols):
                v = x[row, i11, j]
                sums[ex, j] += v * v
