"""Activation vectors in the type ggml's dot products want (the weight type's vec_dot_type).

ggml's CPU matmul converts each activation row with `type_traits_cpu[vec_dot_type].from_float`
before taking dot products; on x86 with AVX2 (llama-cpp-python's build) those are:

- Q8_K (for Q2_K..Q6_K): `quantize_row_q8_K`, which is `quantize_row_q8_K_ref` on x86:
  d = 1 / (-127 / max), q = min(127, nearest_int(-127 / max * x)), bsums = sums of 16.
  kquant's Q8_K codec is that function bit for bit; it is reused here.
- Q8_0 (for Q4_0, Q5_0, Q8_0) and Q8_1 (for Q4_1, Q5_1): the AVX2 `quantize_row_q8_0` /
  `quantize_row_q8_1` of ggml-cpu/arch/x86/quants.c, which differ from the `_ref` ones
  (and from kquant.quantize(x, "Q8_0"), a model-file format that follows `_ref`):
    d  = amax / 127, stored as fp16          (same)
    id = 127 / amax      (`_ref`: 1 / d, which can differ in the last bit)
    q  = round-half-to-even(x * id)  (`_mm256_round_ps`; `_ref`: roundf, half away from 0)
    s  = fp16(d * sum(q)) with d the float32 before fp16 rounding (Q8_1; `_ref` the same)
- F16: `ggml_cpu_fp32_to_fp16` (F16C, round to nearest even; kquant's conversion gives the
  same bits but for NaN payloads), BF16: `ggml_cpu_fp32_to_bf16` (ggml_compute_fp32_to_bf16,
  round to nearest even), F32: a copy.
All are checked byte for byte against ggml's from_float in tests/test_matmul_cpu.py.

`quantize_activations` returns an `Activations`: ggml's bytes (`data`, what ggml's vec_dot
reads) and the same numbers split into flat arrays (what kquant's kernels read).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

from ..codecs import q8_k
from ..codecs.bits import bits_f32, fp32_to_bf16, fp32_to_fp16, round_nearest
from .prims import F32, I32, f16_to_f32, load_u32

T = GGMLQuantizationType


def block_geometry(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(values, bytes) of one block. gguf-py's table still has Q8_1's old 40-byte block
    (float32 d and s); ggml's block_q8_1 is 36 bytes (fp16 d and s)."""
    if qtype == T.Q8_1:
        return 32, 36
    return GGML_QUANT_SIZES[qtype]


_ZERO = F32(0.0)
_F127 = F32(127.0)


@dataclass
class Activations:
    """n_tok activation rows of length k in ggml type `qtype` (Q8_K, Q8_0, Q8_1, F16, BF16
    or F32).

    data: uint8 (n_tok, row_bytes), ggml's blocks. For the 8-bit types also
      qs: int8 (n_tok, k), the quants;  d: float32 (n_tok, k / block), the scales (fp16
      scales widened exactly);
      sums: int16, Q8_K's bsums (n_tok, k / 16);
      s: float32 (n_tok, k / 32), Q8_1's s = fp16(d * sum(qs)).
    For F16 / BF16: values, uint16 (n_tok, k); for F32: values, float32 (n_tok, k).
    """

    qtype: GGMLQuantizationType
    data: np.ndarray
    qs: np.ndarray | None = None
    d: np.ndarray | None = None
    sums: np.ndarray | None = None
    s: np.ndarray | None = None
    values: np.ndarray | None = None

    @property
    def n_tok(self) -> int:
        return self.data.shape[0]

    @property
    def k(self) -> int:
        block, size = block_geometry(self.qtype)
        return self.data.shape[1] // size * block

    def dequantize(self) -> np.ndarray:
        """The float32 values these blocks stand for (ggml's dequantize of the activation)."""
        if self.qtype == T.F32:
            return self.values.copy()
        if self.qtype in (T.F16, T.BF16):
            from ..codecs.api import dequantize
            return dequantize(self.values.view(np.uint8), self.qtype)
        block = 256 if self.qtype == T.Q8_K else 32
        n, k = self.qs.shape
        q = self.qs.reshape(n, k // block, block).astype(np.float32)
        return (q * self.d[:, :, None]).reshape(n, k)

    @classmethod
    def from_bytes(cls, data: np.ndarray, qtype) -> "Activations":
        """Wrap ggml's own activation blocks (e.g. from ggml's from_float): uint8 (n_tok,
        row_bytes)."""
        qtype = T(int(qtype)) if not isinstance(qtype, T) else qtype
        data = np.ascontiguousarray(np.atleast_2d(data)).view(np.uint8)
        n = data.shape[0]
        if qtype == T.F32:
            return cls(qtype, data, values=data.view(np.float32))
        if qtype in (T.F16, T.BF16):
            return cls(qtype, data, values=data.view(np.uint16))
        block, size = block_geometry(qtype)
        b = data.reshape(n, -1, size)
        nb = b.shape[1]
        if qtype == T.Q8_K:
            d = np.ascontiguousarray(b[:, :, 0:4]).view(np.float32).reshape(n, nb)
            qs = np.ascontiguousarray(b[:, :, 4:260]).view(np.int8).reshape(n, nb * 256)
            sums = np.ascontiguousarray(b[:, :, 260:292]).view(np.int16).reshape(n, nb * 16)
            return cls(qtype, data, qs=qs, d=d, sums=sums)
        d = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16).reshape(n, nb).astype(np.float32)
        off = 2 if qtype == T.Q8_0 else 4
        qs = np.ascontiguousarray(b[:, :, off:off + 32]).view(np.int8).reshape(n, nb * 32)
        s = None
        if qtype == T.Q8_1:
            s = np.ascontiguousarray(b[:, :, 2:4]).view(np.float16).reshape(n, nb)
            s = s.astype(np.float32)
        return cls(qtype, data, qs=qs, d=d, s=s)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_q8_x86(x, with_s, data, qs, d, s):
    """ggml's AVX2 quantize_row_q8_0 (with_s False, 34-byte blocks) / quantize_row_q8_1
    (with_s True, 36-byte blocks: d, s, qs)."""
    n_tok, k = x.shape
    nb = k // 32
    bs = 36 if with_s else 34
    qo = 4 if with_s else 2
    for t in prange(n_tok):
        xt = x[t]
        yt = data[t]
        for b in range(nb):
            amax = _ZERO
            for j in range(32):
                amax = max(amax, abs(xt[32 * b + j]))
            dv = amax / _F127
            idv = _F127 / amax if amax != _ZERO else _ZERO
            dh = fp32_to_fp16(dv)
            o = b * bs
            yt[o] = dh & 0xFF
            yt[o + 1] = dh >> 8
            d[t, b] = f16_to_f32(dh)
            tot = I32(0)
            for j in range(32):
                v = I32(round_nearest(xt[32 * b + j] * idv))
                qs[t, 32 * b + j] = v
                yt[o + qo + j] = v & 0xFF
                tot = I32(tot + v)
            if with_s:
                sh = fp32_to_fp16(dv * F32(tot))
                yt[o + 2] = sh & 0xFF
                yt[o + 3] = sh >> 8
                s[t, b] = f16_to_f32(sh)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_q8_k(x, data, qs, d, sums):
    """quantize_row_q8_K (= _ref on x86): kquant's Q8_K codec, then the fields unpacked."""
    n_tok, k = x.shape
    nb = k // 256
    for t in prange(n_tok):
        for b in range(nb):
            blk = data[t, b * 292:(b + 1) * 292]
            q8_k.quantize_block(x[t, b * 256:(b + 1) * 256], blk)
            d[t, b] = bits_f32(load_u32(blk, 0))
            for j in range(256):
                qs[t, 256 * b + j] = np.int8(blk[4 + j])
            for j in range(16):
                sums[t, 16 * b + j] = np.int16(np.uint16(blk[260 + 2 * j])
                                               | np.uint16(np.uint16(blk[261 + 2 * j]) << 8))


@njit(cache=True, error_model="numpy", parallel=True)
def _to_half(x, bf16, out):
    n_tok, k = x.shape
    for t in prange(n_tok):
        if bf16:
            for j in range(k):
                out[t, j] = fp32_to_bf16(x[t, j])
        else:
            for j in range(k):
                out[t, j] = fp32_to_fp16(x[t, j])


def quantize_rows(x: np.ndarray, qtype: GGMLQuantizationType) -> Activations:
    """float32 (n_tok, k) -> Activations of type qtype (one of the vec_dot types)."""
    n, k = x.shape
    block, size = block_geometry(qtype)
    if k % block:
        raise ValueError(f"{qtype.name} activations need rows that are a multiple of {block} "
                         f"values; got {k}")
    if qtype == T.F32:
        values = x.copy()
        return Activations(qtype, values.view(np.uint8), values=values)
    if qtype in (T.F16, T.BF16):
        values = np.empty((n, k), np.uint16)
        _to_half(x, qtype == T.BF16, values)
        return Activations(qtype, values.view(np.uint8), values=values)
    nb = k // block
    data = np.empty((n, nb * size), np.uint8)
    qs = np.empty((n, k), np.int8)
    d = np.empty((n, nb), np.float32)
    if qtype == T.Q8_K:
        sums = np.empty((n, k // 16), np.int16)
        _quantize_q8_k(x, data, qs, d, sums)
        return Activations(qtype, data, qs=qs, d=d, sums=sums)
    with_s = qtype == T.Q8_1
    s = np.empty((n, nb if with_s else 0), np.float32)
    _quantize_q8_x86(x, with_s, data, qs, d, s)
    return Activations(qtype, data, qs=qs, d=d, s=s if with_s else None)
