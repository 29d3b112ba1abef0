"""llama.cpp's repacked Q4_K / Q4_0 / IQ4_NL CPU matmul (libggml-cpu through ctypes), to check and time
kquant.matmul.repack against (tests/test_matmul_repack.py, tools/bench_repack.py; like the rest of
kquant.reference, for tests and benchmarks only).

`GGMLRepack` reaches the pieces two ways: the exported kernels (ggml_quantize_mat_*_4x8,
ggml_gemm_* / ggml_gemv_*_8x8), and the backend path: ggml's whole MUL_MAT on the CPU backend with
the weight in the CPU_REPACK buffer (ggml_backend_cpu_repack_buffer_type, a C++ symbol looked up
by its mangled name), what llama-perplexity runs (`MulMat`). Raises FileNotFoundError without
the library.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from . import find_library, load_library

_vp = ctypes.c_void_p


class GGMLRepack:
    """llama.cpp's repacked Q4_K / Q4_0 / IQ4_NL matmul pieces (FileNotFoundError without the library)."""

    _KERNELS = {T.Q4_K: ("ggml_quantize_mat_q8_K_4x8", "ggml_gemm_q4_K_8x8_q8_K",
                         "ggml_gemv_q4_K_8x8_q8_K"),
                T.Q4_0: ("ggml_quantize_mat_q8_0_4x8", "ggml_gemm_q4_0_8x8_q8_0",
                         "ggml_gemv_q4_0_8x8_q8_0"),
                T.IQ4_NL: ("ggml_quantize_mat_q8_0_4x8", "ggml_gemm_iq4_nl_8x8_q8_0",
                           "ggml_gemv_iq4_nl_8x8_q8_0")}

    def __init__(self):
        self.base = b = load_library("base")
        self.cpu = c = load_library("cpu", find_library("cpu", beside=Path(b._name)))
        c.ggml_cpu_init.restype = None
        c.ggml_cpu_init()
        for name in ("ggml_quantize_mat_q8_K_4x8", "ggml_quantize_mat_q8_0_4x8"):
            getattr(c, name).argtypes = [_vp, _vp, ctypes.c_int64]
            getattr(c, name).restype = None
        for q in self._KERNELS.values():
            for name in q[1:]:
                getattr(c, name).argtypes = [ctypes.c_int, _vp, ctypes.c_size_t, _vp, _vp,
                                             ctypes.c_int, ctypes.c_int]
                getattr(c, name).restype = None

        class InitParams(ctypes.Structure):
            _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", _vp),
                        ("no_alloc", ctypes.c_bool)]
        self._params = InitParams
        for name, res, args in [
                ("ggml_init", _vp, [InitParams]), ("ggml_free", None, [_vp]),
                ("ggml_new_tensor_2d", _vp, [_vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
                ("ggml_mul_mat", _vp, [_vp, _vp, _vp]), ("ggml_new_graph", _vp, [_vp]),
                ("ggml_build_forward_expand", None, [_vp, _vp]),
                ("ggml_nbytes", ctypes.c_size_t, [_vp]),
                ("ggml_tensor_overhead", ctypes.c_size_t, []),
                ("ggml_graph_overhead", ctypes.c_size_t, []),
                ("ggml_backend_alloc_ctx_tensors_from_buft", _vp, [_vp, _vp]),
                ("ggml_backend_buffer_free", None, [_vp]),
                ("ggml_backend_tensor_set", None, [_vp, _vp, ctypes.c_size_t, ctypes.c_size_t]),
                ("ggml_backend_tensor_get", None, [_vp, _vp, ctypes.c_size_t, ctypes.c_size_t]),
                ("ggml_backend_graph_compute", ctypes.c_int, [_vp, _vp]),
                ("ggml_backend_free", None, [_vp]),
                ("ggml_backend_buft_name", ctypes.c_char_p, [_vp])]:
            f = getattr(b, name)
            f.restype, f.argtypes = res, args
        c.ggml_backend_cpu_init.restype = _vp
        c.ggml_backend_cpu_set_n_threads.argtypes = [_vp, ctypes.c_int]
        c.ggml_backend_cpu_set_n_threads.restype = None
        c.ggml_backend_cpu_buffer_type.restype = _vp
        repack = getattr(c, "_Z35ggml_backend_cpu_repack_buffer_typev")
        repack.restype = _vp
        self.repack_buft = repack()
        self.cpu_buft = c.ggml_backend_cpu_buffer_type()
        assert b.ggml_backend_buft_name(self.repack_buft) == b"CPU_REPACK"

    # ---- the exported kernels ----------------------------------------------------------------

    def quantize_mat(self, x4: np.ndarray, qtype) -> np.ndarray:
        """ggml_quantize_mat_q8_K_4x8 (Q4_K) / _q8_0_4x8 (Q4_0, IQ4_NL) of 4 rows: the bytes."""
        x4 = np.ascontiguousarray(x4, dtype=np.float32)
        assert x4.shape[0] == 4
        k = x4.shape[1]
        size = k // 256 * 1168 if qtype == T.Q4_K else k // 32 * 136
        out = np.zeros(size, np.uint8)
        getattr(self.cpu, self._KERNELS[qtype][0])(x4.ctypes.data, out.ctypes.data, k)
        return out

    def gemm(self, packed: np.ndarray, qtype, k: int, act: np.ndarray, nr: int) -> np.ndarray:
        """ggml_gemm_*_8x8 of nr (a multiple of 4) activation rows (quantize_mat bytes) with
        the repacked weight (uint8 (rows / 8, ...)): float32 (nr, rows)."""
        packed = np.ascontiguousarray(packed)
        act = np.ascontiguousarray(act)
        nc = packed.shape[0] * 8
        out = np.zeros((nr, nc), np.float32)
        getattr(self.cpu, self._KERNELS[qtype][1])(k, out.ctypes.data, nc, packed.ctypes.data,
                                                    act.ctypes.data, nr, nc)
        return out

    def gemv(self, packed: np.ndarray, qtype, k: int, act_row: np.ndarray) -> np.ndarray:
        """ggml_gemv_*_8x8 of one activation row (from_float bytes): float32 (rows,)."""
        packed = np.ascontiguousarray(packed)
        act_row = np.ascontiguousarray(act_row)
        nc = packed.shape[0] * 8
        out = np.zeros(nc, np.float32)
        getattr(self.cpu, self._KERNELS[qtype][2])(k, out.ctypes.data, nc, packed.ctypes.data,
                                                    act_row.ctypes.data, 1, nc)
        return out

    # ---- the whole MUL_MAT on the CPU backend, weight in CPU_REPACK ---------------------------

    def session(self, wb: np.ndarray, qtype, n_tok: int, threads: int = 1) -> "MulMat":
        return MulMat(self, wb, qtype, n_tok, threads)

    def mul_mat(self, wb: np.ndarray, qtype, x: np.ndarray, threads: int = 1) -> np.ndarray:
        with self.session(wb, qtype, x.shape[0], threads) as mm:
            return mm(x)


class MulMat:
    """One ggml graph y = mul_mat(W, x) with W (uploaded once: ggml repacks it) in the
    CPU_REPACK buffer, x and y in a CPU buffer; call it with x to run the graph."""

    def __init__(self, g: GGMLRepack, wb: np.ndarray, qtype, n_tok: int, threads: int):
        self.g, b = g, g.base
        wb = np.ascontiguousarray(wb)
        rows = wb.shape[0]
        k = wb.shape[1] // (144 if qtype == T.Q4_K else 18) * (256 if qtype == T.Q4_K else 32)
        self.n_tok, self.k, self.rows = n_tok, k, rows
        meta = 8 * b.ggml_tensor_overhead() + b.ggml_graph_overhead()
        self.ctx_w = b.ggml_init(g._params(meta, None, True))
        self.ctx = b.ggml_init(g._params(meta, None, True))
        self.w = b.ggml_new_tensor_2d(self.ctx_w, int(qtype), k, rows)
        self.buf_w = b.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx_w, g.repack_buft)
        b.ggml_backend_tensor_set(self.w, wb.ctypes.data, 0, wb.nbytes)
        self.x = b.ggml_new_tensor_2d(self.ctx, 0, k, n_tok)
        self.y = b.ggml_mul_mat(self.ctx, self.w, self.x)
        self.graph = b.ggml_new_graph(self.ctx)
        b.ggml_build_forward_expand(self.graph, self.y)
        self.buf = b.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx, g.cpu_buft)
        self.backend = g.cpu.ggml_backend_cpu_init()
        g.cpu.ggml_backend_cpu_set_n_threads(self.backend, threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        b = self.g.base
        x = np.ascontiguousarray(x, dtype=np.float32)
        assert x.shape == (self.n_tok, self.k)
        b.ggml_backend_tensor_set(self.x, x.ctypes.data, 0, x.nbytes)
        assert b.ggml_backend_graph_compute(self.backend, self.graph) == 0
        out = np.empty((self.n_tok, self.rows), np.float32)
        b.ggml_backend_tensor_get(self.y, out.ctypes.data, 0, out.nbytes)
        return out

    def close(self):
        b = self.g.base
        b.ggml_backend_free(self.backend)
        b.ggml_backend_buffer_free(self.buf)
        b.ggml_backend_buffer_free(self.buf_w)
        b.ggml_free(self.ctx)
        b.ggml_free(self.ctx_w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
