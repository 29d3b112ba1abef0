"""A weight's product with activations exactly as llama.cpp's CPU backend (x86, AVX2 build)
computes it, bit for bit: the path ggml_compute_forward_mul_mat takes, then that path's kernel.

    weight Q4_K / Q4_0 / IQ4_NL, rows % 8 == 0 -> the repacked GEMM/GEMV (kquant.matmul.repack)
    a K-quant, IQ4_XS, IQ3_*, IQ2_* or IQ1_* over 8+ tokens -> the tiled kernel (kquant.matmul.tiled)
    2+ tokens and a type llamafile takes   -> llamafile's tinyBLAS (kquant.matmul.tinyblas)
    anything else                          -> ggml_vec_dot per (row, token) (kquant.matmul.cpu)

Every path computes each value on its own in a fixed order, so no value depends on the thread
count; repack's values depend on whether a token row is in the first n - n % 4 (GEMM) or the
rest (GEMV), as llama.cpp's do.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from . import repack, tiled, tinyblas
from .activations import quantize_rows, vec_dot_type
from .cpu import run_blocks, weight_rows


class ExactMatrix:
    """One weight matrix (uint8 rows of ggml blocks, as stored), ready for exact products;
    the repacked (or tiled kernel's decoded) form is made on the first product that needs it
    and kept."""

    def __init__(self, wb: np.ndarray, qtype: T):
        self.wb, self.k = weight_rows(wb, qtype)
        self.qtype = qtype
        self.rows = self.wb.shape[0]
        self._repacked: Any = None
        self._tiled: tiled.Prepared | None = None
        self._tinyblas: Any = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x float32 (n_tok, k) -> (n_tok, rows)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if repack.applies(self.qtype, self.rows, self.k):
            if self._repacked is None:
                self._repacked = repack.prepare(self.wb, self.qtype)
            return repack.matmul_prepared(self._repacked, x)
        if tiled.applies(self.qtype, self.rows, self.k, x.shape[0]):
            if self._tiled is None:
                self._tiled = tiled.Prepared(self.wb, self.qtype)
            return tiled.matmul_prepared(self._tiled, x)
        if tinyblas.applies(self.qtype, self.rows, self.k, x.shape[0]):
            if self._tinyblas is None:
                self._tinyblas = tinyblas.prepare(self.wb, self.qtype)
            return tinyblas.matmul_prepared(self._tinyblas, x)
        return run_blocks(self.wb, self.qtype, quantize_rows(x, vec_dot_type(self.qtype)))


def float_blocks(w: np.ndarray, qtype: T) -> np.ndarray:
    """The stored bytes of an F32/F16/BF16 matrix from its float32 values (exact: F16 and
    BF16 values are float32 values that round-trip)."""
    if qtype == T.F32:
        return np.ascontiguousarray(w, dtype=np.float32).view(np.uint8)
    if qtype == T.F16:
        return np.ascontiguousarray(w.astype(np.float16)).view(np.uint8)
    if qtype == T.BF16:
        return np.ascontiguousarray((np.ascontiguousarray(w, np.float32).view(np.uint32) >> 16)
                                    .astype(np.uint16)).view(np.uint8)
    raise ValueError(f"{qtype.name} is not a float type")



def beats_blas(qtype: T, rows: int, k: int, n_tok: int) -> bool:
    """Whether the default (not exact) runtime should take this product's exact kernel anyway,
    being faster than float32 BLAS on the dequantized weights and giving llama.cpp's values
    (2 threads, 512 tokens, this project's AMD EPYC): ggml's repacked Q4_K / Q4_0 GEMM about
    1.6x BLAS, llamafile's Q8_0 / Q5_0 / Q4_0 kernels 1.7x (1.1-1.35x on an AVX2-only CPU,
    tools/bench_tinyblas.py). Its F16 / F32 kernels are about as fast on the block products
    but not on the output matrix, and the tiled K-quant kernel is slower."""
    if n_tok < 2:
        return False
    if repack.applies(qtype, rows, k) and qtype in (T.Q4_K, T.Q4_0):   # IQ4_NL's: not measured
        return True
    return qtype in (T.Q8_0, T.Q5_0, T.Q4_0) and tinyblas.applies(qtype, rows, k, n_tok)
