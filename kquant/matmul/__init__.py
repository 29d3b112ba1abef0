"""Matrix products straight from ggml's quantized blocks, as llama.cpp's CPU backend takes
them (ggml's vec_dot): activations quantized to the weight type's vec_dot_type (Q8_K for
the K-quants, Q8_0 / Q8_1 for the 32-value types, the float type itself for F16/BF16/F32),
then integer dot products per block scaled by the block scales.

    act = quantize_activations(x, "Q4_K")      # Activations in Q8_K, as ggml's from_float
    y = matvec(w, "Q4_K", act)                 # (rows,)  w: uint8 (rows, row_bytes)
    Y = matmul(w, "Q4_K", X)                   # (n_tok, rows), X float32 (n_tok, k)
    Y = dot(w, "Q4_K", X)                      # picks the block kernels or dequantize + BLAS

The Numba CPU kernels live in kquant.matmul.cpu (with .kquants, .legacy, .floats, the
vector helpers in .simd and the activation quantizers in .activations); kquant.reference.ggml_cpu
binds ggml's own CPU kernels for comparison, `python -m kquant.matmul.asm` shows the
instructions LLVM chose. The GPU kernels are kquant.matmul.cuda, imported on their own.
"""
from __future__ import annotations

from .activations import Activations
from .cpu import (BLAS_MIN_TOKENS, VEC_DOT_TYPE, WEIGHT_TYPES, dot, matmul, matvec,
                  quantize_activations, vec_dot_type)

__all__ = ["Activations", "BLAS_MIN_TOKENS", "VEC_DOT_TYPE", "WEIGHT_TYPES", "dot", "matmul",
           "matvec", "quantize_activations", "vec_dot_type"]
