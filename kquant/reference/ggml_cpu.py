"""ggml's own CPU dot products (libggml-cpu through ctypes), to check and time kquant's against.

`ggml_get_type_traits_cpu(type)` gives, per weight type, ggml-cpu.h's

    struct ggml_type_traits_cpu {
        ggml_from_float_t from_float;    // float32 row -> this type (activation quantizer)
        ggml_vec_dot_t    vec_dot;       // (n, &s, bs, x, bx, y, by, nrc)
        enum ggml_type    vec_dot_type;  // the activation type vec_dot wants
        int64_t           nrows;         // rows per call (1 on x86)
    };

libggml-cpu.so comes with llama-cpp-python, next to libggml-base.so (kquant.reference.libggml finds
that one; KQUANT_LIBGGML_CPU names another build). Like kquant.reference.libggml this is for tests
and benchmarks only. `vec_dot_rows` calls ggml's vec_dot from a Numba `prange` loop over the
weight rows, so ggml and kquant are timed on the same rows, threads and harness.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from . import load_library
from ..matmul.activations import block_geometry

T = GGMLQuantizationType


class _Traits(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


# Pointers passed as size_t: the same registers on x86-64 / aarch64 calling conventions, and
# Numba can pass plain integers (array.ctypes.data) where it cannot pass void pointers.
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
                            ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                            ctypes.c_size_t, ctypes.c_int)
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int64)


class GGMLCPU:
    """ggml-cpu's type traits: activation quantizers and vec_dot kernels."""

    def __init__(self, path: Path | str | None = None):
        lib = self.lib = load_library("cpu", path)
        self.path = Path(lib._name)
        lib.ggml_cpu_init.restype = None
        lib.ggml_cpu_init()
        lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits_cpu.argtypes = (ctypes.c_int,)
        self._vec_dot = {}
        self._from_float = {}

    def has(self, feature: str) -> bool:
        """ggml_cpu_has_<feature>(), e.g. "avx2", "f16c", "avx512"."""
        fn = getattr(self.lib, "ggml_cpu_has_" + feature)
        fn.restype = ctypes.c_int
        return bool(fn())

    def traits(self, qtype: GGMLQuantizationType) -> _Traits:
        return self.lib.ggml_get_type_traits_cpu(int(qtype)).contents

    def vec_dot_type(self, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
        return T(self.traits(qtype).vec_dot_type)

    def from_float(self, x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        """ggml's from_float of `qtype` (the CPU activation quantizer) on each row of x:
        uint8 (n_tok, row_bytes)."""
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        if qtype not in self._from_float:
            self._from_float[qtype] = _FROM_FLOAT(self.traits(qtype).from_float)
        fn = self._from_float[qtype]
        block, size = block_geometry(qtype)
        out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
        for t in range(x.shape[0]):
            fn(x[t].ctypes.data, out[t].ctypes.data, x.shape[1])
        return out

    def vec_dot_fn(self, qtype: GGMLQuantizationType):
        if qtype not in self._vec_dot:
            self._vec_dot[qtype] = _VEC_DOT(self.traits(qtype).vec_dot)
        return self._vec_dot[qtype]

    def vec_dot_rows(self, w: np.ndarray, qtype: GGMLQuantizationType, act: np.ndarray,
                     out: np.ndarray | None = None) -> np.ndarray:
        """ggml's vec_dot of every weight row (uint8 (rows, row_bytes)) with every activation
        row (ggml bytes, (n_tok, act_bytes)): float32 (n_tok, rows), rows in parallel on
        Numba's threads."""
        w = np.ascontiguousarray(w).view(np.uint8)
        act = np.ascontiguousarray(np.atleast_2d(act)).view(np.uint8)
        block, size = block_geometry(qtype)
        n = w.shape[1] // size * block
        if out is None:
            out = np.empty((act.shape[0], w.shape[0]), np.float32)
        _rows(self.vec_dot_fn(qtype), w, act, n, out)
        return out


@njit(parallel=True)
def _rows(fn, w, act, n, out):
    for r in prange(w.shape[0]):
        for t in range(act.shape[0]):
            fn(n, out.ctypes.data + 4 * (t * out.shape[1] + r), 0,
               w.ctypes.data + r * w.shape[1], 0, act.ctypes.data + t * act.shape[1], 0, 1)


_GGML: GGMLCPU | None = None


def ggml_cpu() -> GGMLCPU:
    """A shared GGMLCPU (FileNotFoundError where libggml-cpu is missing)."""
    global _GGML
    if _GGML is None:
        _GGML = GGMLCPU()
    return _GGML
