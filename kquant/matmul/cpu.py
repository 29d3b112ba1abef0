"""CPU products of ggml weight blocks with activation vectors, the way ggml's CPU backend
takes them: each activation row quantized to the weight type's vec_dot_type, then integer
dot products per block scaled by the blocks' scales (kquant.matmul.kquants, .legacy, .iq4, .iq3), or
float dot products for F32/F16/BF16 (.floats). For many tokens, tiles of weight rows are
dequantized to float32 and multiplied with numpy's BLAS instead (`dot` picks).

How the kernels vectorise. Every kernel is a Numba `@njit(parallel=True, cache=True)` loop
over weight rows (`prange`); inside, one row against each token. The float kernels are plain
loops that LLVM's loop vectorizer turns into 8-lane FMA code. The quantized ones are written
with kquant.matmul.simd's 256-bit vector values, a port of ggml's AVX2 code. Measured first
on this project's 2-vCPU AMD EPYC (AVX2, no AVX-512; one thread, 4096 x 4096, weights in
L3), scalar Numba loops shaped for the auto-vectorizers reached
  Q8_0 0.85x ggml (32-value reductions -> vpmovsxbw + vpmaddwd + a horizontal sum a block),
  Q4_0 0.44-0.70x, Q5_0 0.26x, Q4_K 0.03-0.28x (over 8 formulations: per-sub-block
  reductions, one reduction with per-value scales, lane-wise partial sums stored to arrays,
  the loop vectorizer on or off, SLP on or off),
because LLVM either reduces each 16/32-value sub-block horizontally or vectorises the loop
over blocks instead; with the vector values the kernels run at 0.96-1.4x ggml's vec_dot on
one or two threads (tools/bench_matvec.py). `python -m kquant.matmul.asm` shows the
instructions.

Two pitfalls found on the way (kquant.matmul.prims): Numba types int32 * int32 as int64,
which turns 16-bit integer vector code into 64-bit lanes unless every product is wrapped in
np.int32; and a scalar fp16 -> float32 `fpext` creates a false dependency on the float
accumulator that serialises the block loop.

Numba's cache (cache=True) checks only the file that defines a kernel: after editing
simd.py or prims.py, clear it (`find kquant -name '*.nb[ic]' -delete`).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ..codecs import vectorizing
from ..codecs.api import dequantize, numba_threads
from ..types import TYPES, weight_types
from .activations import Activations, qtype_of, quantize_rows, vec_dot_type

T = GGMLQuantizationType

# Views of kquant.types: the weight types, their activation types and their block kernels
WEIGHT_TYPES = weight_types()
VEC_DOT_TYPE = {t: TYPES[t].vec_dot for t in WEIGHT_TYPES}
_KERNELS = {t: TYPES[t].matmul_kernel for t in WEIGHT_TYPES}

# BLAS_MIN_TOKENS (each record's blas_min_tokens in kquant.types): tokens from which `dot`
# dequantizes weight tiles and calls BLAS instead of the block kernels. Measured with
# `python tools/bench_matvec.py --crossover --threads 1` (4096 x 4096, one Numba and one
# OpenBLAS thread, this project's 2-vCPU AMD EPYC; ms per call, activation quantization
# included, block kernels / BLAS):
#   type    1 tok        16 tok       64 tok       128 tok       256 tok
#   Q4_K    1.5 / 12.3   13.9 / 31.3  40.1 / 47.0   81.2 / 70.1  185.9 / 123.4
#   Q6_K    7.0 / 46.7   24.3 / 75.5  52.4 / 80.7  101.7 / 119.6 174.8 / 150.7
#   Q4_0    4.8 / 28.4   25.4 / 48.5  62.2 / 66.1  128.1 / 89.6  251.0 / 142.1
#   Q8_0    2.0 / 12.9   16.2 / 31.1  61.4 / 53.1  114.8 / 78.9  233.6 / 131.0
#   F16     8.5 / 37.4   29.0 / 62.1  74.2 / 87.1  137.8 / 116.2 243.1 / 168.9
#   F32     4.4 / 3.3    22.9 / 16.9  94.6 / 34.2  173.0 / 59.4  359.0 / 105.2
# The block kernels cost about the same per token at any batch (they are compute-bound: a
# matvec from L3 runs at the speed a batch does from L1), the BLAS path pays ~10-40 ms of
# dequantization once and then ~0.4 ms a token: the K-quants cross at 128 (Q6_K 256), the
# 32-value types and BF16 at 64 (Q4_0 128), F16 at 128; F32 needs no dequantization and
# goes to BLAS from 2 tokens. The same table on 2 threads (`--threads 2`, Numba and
# OpenBLAS) puts the crossings at the same places give or take one column (Q4_K 256, Q4_0 64,
# Q8_0 128, F32 1).
# (The shared machine makes single cells noisy; the thresholds follow the rows' trend.)
BLAS_MIN_TOKENS = {t: TYPES[t].blas_min_tokens for t in WEIGHT_TYPES}

#: float32 values per dequantized weight tile on the BLAS path (64 MiB: a 4096 x 4096 matrix
#: in one tile). Large on purpose: every switch between Numba's thread pool (dequantizing) and
#: OpenBLAS's (whose threads spin a while after each call) costs, on 2 cores 4x the work
#: itself with 1 MiB tiles (124 ms against 28 ms for 16 MiB, 4096 x 4096 Q4_K, 8 tokens).
BLAS_TILE_VALUES = 1 << 24


def weight_rows(w: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, int]:
    """Weights as llama.cpp stores them -> (uint8 (rows, row_bytes), values per row).

    Blocks are read as bytes whatever the array's dtype (float16/float32 arrays for F16/F32,
    uint16 for BF16 are the natural ones)."""
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError("weights must be a 2-D numpy array (rows, row_bytes or values)")
    wb = np.ascontiguousarray(w).view(np.uint8)
    block, size = TYPES[qtype].block_size, TYPES[qtype].type_size
    if wb.shape[1] == 0 or wb.shape[1] % size:
        raise ValueError(f"{qtype.name}: a row of {wb.shape[1]} bytes is not a whole number of "
                         f"{size}-byte blocks")
    return wb, wb.shape[1] // size * block


def quantize_activations(x: np.ndarray, weight_type, n_threads: int | None = None) -> Activations:
    """float32 activations (n_tok, k) or (k,) -> Activations in weight_type's vec_dot_type,
    as ggml's CPU from_float computes them (kquant.matmul.activations has the details)."""
    t = vec_dot_type(weight_type)
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ValueError(f"activations must be float32, got {x.dtype}")
    if x.ndim not in (1, 2):
        raise ValueError("activations must be (k,) or (n_tok, k)")
    x = np.ascontiguousarray(np.atleast_2d(x))
    with numba_threads(n_threads), vectorizing():
        return quantize_rows(x, t)


def _activations(w_type, X, k, n_threads) -> Activations:
    if isinstance(X, Activations):
        act = X
        if act.qtype != VEC_DOT_TYPE[w_type]:
            raise ValueError(f"{w_type.name} weights need {VEC_DOT_TYPE[w_type].name} "
                             f"activations, got {act.qtype.name}")
    else:
        act = quantize_activations(X, w_type, n_threads)
    if act.k != k:
        raise ValueError(f"activations of {act.k} values against rows of {k}")
    return act


def run_blocks(wb: np.ndarray, qtype: GGMLQuantizationType, act: Activations,
               out: np.ndarray | None = None) -> np.ndarray:
    """The block kernel of qtype over all rows and tokens: float32 (n_tok, rows). No checks
    (callers have them); the caller sets the Numba thread count."""
    if out is None:
        out = np.empty((act.n_tok, wb.shape[0]), np.float32)
    with vectorizing():
        _KERNELS[qtype](*_kernel_args(wb, qtype, act, out))
    return out


def _kernel_args(wb: np.ndarray, qtype: GGMLQuantizationType, act: Activations,
                 out: np.ndarray) -> tuple:
    """What qtype's block kernel takes: the weights (the float types' as their values) and the
    activation fields its vec_dot type has (the 8-bit kernels take a third array, unused for
    Q8_0, so all share one signature)."""
    if act.values is not None:
        return wb.view(np.float32 if qtype == T.F32 else np.uint16), act.values, out
    third = act.sums if act.qtype == T.Q8_K else act.s if act.qtype == T.Q8_1 else act.d
    return wb, act.qs, act.d, third, out


def run_blas(wb: np.ndarray, qtype: GGMLQuantizationType, act: Activations,
             n_threads: int | None = None) -> np.ndarray:
    """dequantize(activation) @ dequantize(weights).T in float32, weights dequantized a tile
    of rows at a time (BLAS_TILE_VALUES floats) and multiplied with numpy's BLAS."""
    k = act.k
    xd = act.dequantize()
    out = np.empty((act.n_tok, wb.shape[0]), np.float32)
    if qtype == T.F32:
        np.matmul(xd, wb.view(np.float32).T, out=out)
        return out
    tile = max(1, BLAS_TILE_VALUES // k)
    for r0 in range(0, wb.shape[0], tile):
        r1 = min(wb.shape[0], r0 + tile)
        wf = dequantize(wb[r0:r1], qtype, n_threads=n_threads)
        np.matmul(xd, wf.T, out=out[:, r0:r1])
    return out


def matmul(w: np.ndarray, weight_type, X, n_threads: int | None = None) -> np.ndarray:
    """Y = X @ W.T (n_tok, rows) with the block kernels: X float32 (n_tok, k) (quantized here
    to the vec_dot_type) or Activations."""
    qtype = qtype_of(weight_type)
    wb, k = weight_rows(w, qtype)
    act = _activations(qtype, X, k, n_threads)
    with numba_threads(n_threads):
        return run_blocks(wb, qtype, act)


def matvec(w: np.ndarray, weight_type, xq, n_threads: int | None = None) -> np.ndarray:
    """y = W @ x (rows,) for one activation vector: float32 (k,) or a one-token Activations."""
    if isinstance(xq, Activations):
        if xq.n_tok != 1:
            raise ValueError(f"matvec takes one activation vector, got {xq.n_tok}")
    else:
        xq = np.asarray(xq)
        if xq.ndim != 1:
            raise ValueError("matvec takes one activation vector (k,)")
    return matmul(w, weight_type, xq, n_threads)[0]


def dot(w: np.ndarray, weight_type, X, n_threads: int | None = None) -> np.ndarray:
    """X @ W.T the fastest measured way: the block kernels for few tokens, dequantized tiles
    and BLAS from BLAS_MIN_TOKENS[weight_type] tokens on. X: float32 (k,) -> (rows,), or
    (n_tok, k) / Activations -> (n_tok, rows)."""
    qtype = qtype_of(weight_type)
    wb, k = weight_rows(w, qtype)
    single = not isinstance(X, Activations) and np.ndim(X) == 1
    act = _activations(qtype, X, k, n_threads)
    with numba_threads(n_threads):
        if act.n_tok >= BLAS_MIN_TOKENS[qtype]:
            y = run_blas(wb, qtype, act, n_threads)
        else:
            y = run_blocks(wb, qtype, act)
    return y[0] if single else y


def kernel(qtype):
    """The Numba kernel of a weight type (for kquant.matmul.asm)."""
    return _KERNELS[qtype_of(qtype)]


def kernel_args(qtype, rng: np.random.Generator | None = None) -> tuple:
    """Arguments qtype's kernel compiles for (a small random matrix), for kquant.matmul.asm."""
    from ..codecs.api import quantize

    qtype = qtype_of(qtype)
    rng = rng or np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    wb = weight_rows(quantize(x, qtype), qtype)[0]
    act = quantize_activations(x[:1], qtype)
    return _kernel_args(wb, qtype, act, np.empty((1, 4), np.float32))
