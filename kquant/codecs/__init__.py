"""Registry of the ggml types kquant encodes and decodes, by `gguf.GGMLQuantizationType`.

Each codec turns float32 rows (nrows, n_per_row) into the bytes of ggml's blocks and back.
The Numba kernels live in one module per family; a codec here only allocates and dispatches.
"""
from __future__ import annotations

import contextlib
from types import ModuleType

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import floats, legacy, q2_k, q3_k, q4_k, q5_k, q6_k, q8_k

_NO_WEIGHTS = np.zeros(0, np.float32)


@contextlib.contextmanager
def vectorizing():
    """Compile with LLVM's SLP vectorizer, which Numba leaves off by default.

    The scale searches (search.py) keep one trial per SIMD lane in fully unrolled loops that
    only SLP turns into AVX2 code (about 10x on those loops). Kernels compile lazily on their
    first call, so every kernel call goes through here; cached kernels are unaffected.
    SLP never reorders floating-point sums without fast-math, so results are unchanged.
    """
    before = numba.config.SLP_VECTORIZE
    numba.config.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        numba.config.SLP_VECTORIZE = before


class Codec:
    """One ggml type: its block geometry and row-wise quantize/dequantize."""

    #: whether an importance matrix changes the result (ggml ignores it for the others)
    uses_imatrix = True

    def __init__(self, qtype: GGMLQuantizationType):
        self.qtype = qtype
        self.name = qtype.name
        self.block_size, self.type_size = GGML_QUANT_SIZES[qtype]

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        out = np.empty((x.shape[0], self.row_bytes(x.shape[1])), np.uint8)
        with vectorizing():
            self._quantize(x, imatrix, out)
        return out

    def dequantize_rows(self, q: np.ndarray, n_per_row: int) -> np.ndarray:
        out = np.empty((q.shape[0], n_per_row), np.float32)
        with vectorizing():
            self._dequantize(q, out)
        return out

    def __repr__(self) -> str:
        return f"<Codec {self.name}: {self.block_size} values in {self.type_size} bytes>"


class BlockCodec(Codec):
    """K-quants: a module with quantize_rows(x, qw, use_qw, out) and dequantize_rows(q, out)."""

    def __init__(self, qtype: GGMLQuantizationType, module: ModuleType, uses_imatrix: bool = True):
        super().__init__(qtype)
        self.module = module
        self.uses_imatrix = uses_imatrix

    def _quantize(self, x, imatrix, out):
        use_qw = imatrix is not None and self.uses_imatrix
        self.module.quantize_rows(x, imatrix if use_qw else _NO_WEIGHTS, use_qw, out)

    def _dequantize(self, q, out):
        self.module.dequantize_rows(q, out)


class LegacyCodec(Codec):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one kernel pair for the family, selected by `kind`."""

    def __init__(self, qtype: GGMLQuantizationType, kind: int):
        super().__init__(qtype)
        self.kind = kind
        self.uses_imatrix = kind != legacy.Q8_0

    def _quantize(self, x, imatrix, out):
        use_qw = imatrix is not None and self.uses_imatrix
        legacy.quantize_rows(self.kind, x, imatrix if use_qw else _NO_WEIGHTS, use_qw, out)

    def _dequantize(self, q, out):
        if self.kind == legacy.Q8_0:
            legacy.dequantize_q8_0_rows(q, out)
        else:
            legacy.dequantize_rows(self.kind, q, out)


class HalfCodec(Codec):
    """F16 and BF16: 2-byte floats rounded to nearest even."""

    uses_imatrix = False

    def __init__(self, qtype: GGMLQuantizationType, kind: int):
        super().__init__(qtype)
        self.kind = kind

    def _quantize(self, x, imatrix, out):
        floats.quantize_rows(self.kind, x, out.view(np.uint16))

    def _dequantize(self, q, out):
        floats.dequantize_rows(self.kind, q.view(np.uint16), out)


class F32Codec(Codec):
    uses_imatrix = False

    def _quantize(self, x, imatrix, out):
        out.view(np.float32)[...] = x

    def _dequantize(self, q, out):
        out[...] = q.view(np.float32)


T = GGMLQuantizationType
CODECS: dict[GGMLQuantizationType, Codec] = {
    c.qtype: c
    for c in (
        F32Codec(T.F32),
        HalfCodec(T.F16, floats.F16),
        HalfCodec(T.BF16, floats.BF16),
        LegacyCodec(T.Q4_0, legacy.Q4_0),
        LegacyCodec(T.Q4_1, legacy.Q4_1),
        LegacyCodec(T.Q5_0, legacy.Q5_0),
        LegacyCodec(T.Q5_1, legacy.Q5_1),
        LegacyCodec(T.Q8_0, legacy.Q8_0),
        BlockCodec(T.Q2_K, q2_k),
        BlockCodec(T.Q3_K, q3_k),
        BlockCodec(T.Q4_K, q4_k),
        BlockCodec(T.Q5_K, q5_k),
        BlockCodec(T.Q6_K, q6_k),
        BlockCodec(T.Q8_K, q8_k, uses_imatrix=False),
    )
}


def get_codec(qtype: GGMLQuantizationType | str | int) -> Codec:
    """The codec of a type given as a GGMLQuantizationType, its name ("q4_k") or its id."""
    try:
        if isinstance(qtype, str):
            qtype = GGMLQuantizationType[qtype.strip().upper()]
        else:
            qtype = GGMLQuantizationType(qtype)
        return CODECS[qtype]
    except (KeyError, ValueError):
        known = ", ".join(c.name for c in CODECS.values())
        raise ValueError(f"unsupported ggml type {qtype!r}; kquant handles {known}") from None
