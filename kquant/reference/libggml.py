"""ctypes bindings to llama.cpp's libggml-base and libllama: ggml's quantizers, single ops on
its CPU backend, and llama_model_quantize (the libraries found by kquant.reference)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import find_library, load_library

_c_float_p = ctypes.POINTER(ctypes.c_float)


class GGML:
    """The few ggml entry points kquant mirrors: ggml_quantize_chunk, quantize_row_q8_K_ref
    and the dequantize_row_* functions."""

    def __init__(self, path: Path | str | None = None):
        lib = self.lib = load_library("base", path)
        self.path = Path(lib._name)
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = (ctypes.c_int, _c_float_p, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            _c_float_p)
        lib.quantize_row_q8_K_ref.restype = None
        lib.quantize_row_q8_K_ref.argtypes = (_c_float_p, ctypes.c_void_p, ctypes.c_int64)
        for name in ("ggml_fp16_to_fp32_row", "ggml_bf16_to_fp32_row"):
            getattr(lib, name).argtypes = (ctypes.c_void_p, _c_float_p, ctypes.c_int64)

    def quantize(self, x: np.ndarray, qtype: GGMLQuantizationType,
                 imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk over all rows of x (for Q8_K: quantize_row_q8_K_ref)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n_per_row = x.shape[-1]
        nrows = x.size // n_per_row
        block, size = GGML_QUANT_SIZES[qtype]
        row_bytes = n_per_row // block * size
        out = np.zeros(x.shape[:-1] + (row_bytes,), np.uint8)
        src = x.ctypes.data_as(_c_float_p)
        if qtype == GGMLQuantizationType.Q8_K:
            self.lib.quantize_row_q8_K_ref(src, out.ctypes.data, x.size)
            return out
        qw = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            qw = imatrix.ctypes.data_as(_c_float_p)
        written = self.lib.ggml_quantize_chunk(int(qtype), src, out.ctypes.data, 0, nrows,
                                               n_per_row, qw)
        assert written == out.size, (written, out.size)
        return out

    def dequantize(self, data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        data = np.ascontiguousarray(data).view(np.uint8)
        block, size = GGML_QUANT_SIZES[qtype]
        n_per_row = data.shape[-1] // size * block
        out = np.empty(data.shape[:-1] + (n_per_row,), np.float32)
        dst = out.ctypes.data_as(_c_float_p)
        if qtype == GGMLQuantizationType.F32:
            out[...] = data.view(np.float32)
        elif qtype == GGMLQuantizationType.F16:
            self.lib.ggml_fp16_to_fp32_row(data.ctypes.data, dst, out.size)
        elif qtype == GGMLQuantizationType.BF16:
            self.lib.ggml_bf16_to_fp32_row(data.ctypes.data, dst, out.size)
        else:
            fn = getattr(self.lib, "dequantize_row_" + qtype.name.lower().replace("_k", "_K"))
            fn.restype = None
            fn.argtypes = (ctypes.c_void_p, _c_float_p, ctypes.c_int64)
            fn(data.ctypes.data, dst, out.size)
        return out


def llama_quantize(inp: str | Path, out: str | Path, ftype: int, *, n_threads: int = 0,
                   imatrix: dict[str, np.ndarray] | None = None,
                   kv_overrides: list[tuple[str, str, object]] = (),
                   pure: bool = False, leave_output_tensor: bool = False,
                   output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                   allow_requantize: bool = False, keep_split: bool = False,
                   only_copy: bool = False,
                   tensor_types: list[tuple[str, int]] = ()) -> None:
    """llama.cpp's own llama_model_quantize (through llama-cpp-python), for comparisons.

    `kv_overrides` are (key, "int"|"float"|"bool"|"str", value), set in order after the
    input's metadata as llama-quantize sets its --override-kv and imatrix keys.
    """
    import llama_cpp as lc

    lc.llama_backend_init()
    p = lc.llama_model_quantize_default_params()
    p.nthread = n_threads
    p.ftype = int(ftype)
    p.pure = pure
    p.quantize_output_tensor = not leave_output_tensor
    p.allow_requantize = allow_requantize
    p.keep_split = keep_split
    p.only_copy = only_copy
    if output_tensor_type is not None:
        p.output_tensor_type = int(output_tensor_type)
    if token_embedding_type is not None:
        p.token_embedding_type = int(token_embedding_type)
    keep = []  # ctypes buffers must outlive the call
    if imatrix:
        arr = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, w) in enumerate(imatrix.items()):
            w = np.ascontiguousarray(w, dtype=np.float32)
            keep.append(w)
            arr[i].name = name.encode()
            arr[i].data = w.ctypes.data_as(_c_float_p)
            arr[i].size = w.size
        p.imatrix = arr
        keep.append(arr)
    if kv_overrides:
        tags = {"int": 0, "float": 1, "bool": 2, "str": 3}  # LLAMA_KV_OVERRIDE_TYPE_*
        kvs = (lc.llama_model_kv_override * (len(kv_overrides) + 1))()
        for i, (key, tag, value) in enumerate(kv_overrides):
            kvs[i].key = key.encode()
            kvs[i].tag = tags[tag]
            if tag == "int":
                kvs[i].value.val_i64 = int(value)
            elif tag == "float":
                kvs[i].value.val_f64 = float(value)
            elif tag == "bool":
                kvs[i].value.val_bool = bool(value)
            else:
                kvs[i].value.val_str = str(value).encode()[:127]
        p.kv_overrides = kvs
        keep.append(kvs)
    if tensor_types:  # (regex, ggml type) pairs, as llama-quantize's --tensor-type passes them
        tts = (lc.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            tts[i].pattern = pattern.encode()
            tts[i].type = int(qtype)
        p.tt_overrides = tts
        keep.append(tts)
    rc = lc.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


class GGMLCompute:
    """ggml's CPU backend (libggml-cpu beside libggml-base) running single ops on numpy arrays:
    the oracle for the runtime's products, attention and RoPE."""

    I32, F16 = 26, 1

    def __init__(self, path: Path | str | None = None):
        vp = ctypes.c_void_p
        self.base = b = load_library("base", path)
        self.cpu = c = load_library("cpu", find_library("cpu", beside=Path(b._name)))

        class InitParams(ctypes.Structure):
            _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", vp), ("no_alloc", ctypes.c_bool)]
        self._params = InitParams
        for name, res, args in [
                ("ggml_init", vp, [InitParams]), ("ggml_free", None, [vp]),
                ("ggml_new_tensor_1d", vp, [vp, ctypes.c_int, ctypes.c_int64]),
                ("ggml_new_tensor_2d", vp, [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
                ("ggml_new_tensor_3d", vp, [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
                ("ggml_mul_mat", vp, [vp, vp, vp]), ("ggml_new_graph", vp, [vp]),
                ("ggml_build_forward_expand", None, [vp, vp]), ("ggml_get_data", vp, [vp]),
                ("ggml_nbytes", ctypes.c_size_t, [vp]),
                ("ggml_flash_attn_ext", vp, [vp, vp, vp, vp, vp] + [ctypes.c_float] * 3),
                ("ggml_rope_ext", vp, [vp, vp, vp, vp] + [ctypes.c_int] * 3 + [ctypes.c_float] * 6)]:
            f = getattr(b, name)
            f.restype, f.argtypes = res, args
        c.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
        if hasattr(c, "ggml_cpu_init"):
            c.ggml_cpu_init()

    def _run(self, build, inputs: list[tuple[int, tuple[int, ...], np.ndarray]], out_shape, threads=2):
        """`inputs`: (ggml type, ggml ne, data); `build(ctx, tensors)` returns the result tensor."""
        b = self.base
        size = sum(a.nbytes for _, _, a in inputs) * 2 + int(np.prod(out_shape)) * 8 + (64 << 20)
        ctx = b.ggml_init(self._params(size, None, False))
        try:
            ts = []
            for gtype, ne, data in inputs:
                t = getattr(b, f"ggml_new_tensor_{len(ne)}d")(ctx, gtype, *ne)
                data = np.ascontiguousarray(data)
                ctypes.memmove(b.ggml_get_data(t), data.ctypes.data, data.nbytes)
                ts.append(t)
            res = build(ctx, ts)
            graph = b.ggml_new_graph(ctx)
            b.ggml_build_forward_expand(graph, res)
            self.cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
            out = np.empty(out_shape, np.float32)
            ctypes.memmove(out.ctypes.data, b.ggml_get_data(res), out.nbytes)
            return out
        finally:
            b.ggml_free(ctx)

    def mul_mat(self, w: np.ndarray, wtype: GGMLQuantizationType, k: int, x: np.ndarray,
                threads: int = 2) -> np.ndarray:
        """x (n, k) float32 times W (rows, k) stored as ggml blocks of `wtype`: (n, rows)."""
        rows, n = w.shape[0], x.shape[0]
        return self._run(lambda ctx, t: self.base.ggml_mul_mat(ctx, t[0], t[1]),
                         [(int(wtype), (k, rows), w), (0, (k, n), x.astype(np.float32))], (n, rows),
                         threads)

    def flash_attn(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, *,
                   n0: int = 0, n_kv: int | None = None, n_threads: int = 2) -> np.ndarray:
        """Causal attention of q (T, n_head, d) float32 at positions n0 .. n0 + T - 1 over F16
        k, v (n0 + T, n_head_kv, d), the cells of positions 0 .. n0 + T - 1, as llama.cpp calls
        ggml_flash_attn_ext: a KV view of n_kv cells (default: the cells padded to 256, as
        llama_kv_cache::get_n_kv pads them), the cells past the last position masked out, the
        graph computed on n_threads threads (which picks ggml's split-KV chunks for a single
        query over n_kv >= 512 cells); (T, n_head, d)."""
        T, hq, d = q.shape
        n_cells, hkv = k.shape[0], k.shape[1]
        if n_cells != n0 + T or v.shape[0] != n_cells:
            raise ValueError(f"k and v need the n0 + T = {n0 + T} cells, not {n_cells}")
        if n_kv is None:
            n_kv = max(256, -(-n_cells // 256) * 256)
        if n_kv < n_cells:
            raise ValueError(f"n_kv {n_kv} < {n_cells} cells")
        t_pad = -(-T // 64) * 64
        kk = np.zeros((hkv, n_kv, d), np.float16)
        vv = np.zeros((hkv, n_kv, d), np.float16)
        kk[:, :n_cells], vv[:, :n_cells] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        mask = np.full((t_pad, n_kv), -np.inf, np.float32)
        for t in range(T):
            mask[t, :n0 + t + 1] = 0
        return self._run(
            lambda ctx, t: self.base.ggml_flash_attn_ext(ctx, *t, scale, 0.0, 0.0),
            [(0, (d, T, hq), q.transpose(1, 0, 2)), (self.F16, (d, n_kv, hkv), kk),
             (self.F16, (d, n_kv, hkv), vv), (self.F16, (n_kv, t_pad), mask.astype(np.float16))],
            (T, hq, d), threads=n_threads)

    def rope(self, x: np.ndarray, n_rot: int, neox: bool, base: float) -> np.ndarray:
        """ggml_rope_ext of x (T, heads, d) at positions 0..T-1 (no scaling)."""
        T, h, d = x.shape
        return self._run(
            lambda ctx, t: self.base.ggml_rope_ext(ctx, t[0], t[1], None, n_rot, 2 if neox else 0, 0,
                                                   base, 1.0, 0.0, 1.0, 32.0, 1.0),
            [(0, (d, h, T), x), (self.I32, (T,), np.arange(T, dtype=np.int32))], (T, h, d))
