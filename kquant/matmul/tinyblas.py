"""llamafile's tinyBLAS (ggml-cpu/llamafile/sgemm.cpp), the path llama.cpp's CPU backend
takes for matrix products over 2 or more tokens, ported bit for bit for an x86 AVX2 + FMA +
F16C build without AVX-512 (llama-cpp-python's AVX2 build).

    if applies(qtype, rows, k, n_tok):
        y = matmul(wb, qtype, x)     # (n_tok, rows) float32, ggml's bits

When llamafile_sgemm takes the product (`applies`)
---------------------------------------------------
ggml_compute_forward_mul_mat calls llamafile_sgemm twice (ggml-cpu.c):
1. before converting the activations, with src1 as it is (float32 here): Atype = the weight
   type, Btype = F32. On AVX2 only F32 weights accept Btype F32.
2. after converting src1 to the weight type's vec_dot_type (only when they differ, i.e. for
   every type but F32): Btype = F16 for F16, BF16 for BF16, Q8_0 for Q8_0 / Q4_0 / Q5_0.
llamafile_sgemm refuses n < 2 (n = tokens) and then, with k passed as ne00 / block size:
- F32 / F16 / BF16 (`tinyBLAS<8, __m256, __m256, T, T, float>`, BF16 under `__AVX2__`, F16
  under `__F16C__`): `tinyBLAS::matmul` returns false unless k % 8 == 0 and rows % 4 == 0
  (its three tilings are rows % 16 with rows / 16 >= nth, rows % 8, rows % 4);
- Q8_0 / Q4_0 / Q5_0 / IQ4_NL (`tinyBLAS_Q0_AVX`): always (any rows, any number of blocks);
  IQ4_NL's weights go there only when the CPU_REPACK buffer does not take them (rows % 8 != 0,
  kquant.matmul.repack).
The weight type's other conditions come from ggml itself (k a multiple of the block size).
Other kquant types (Q4_1, Q5_1, the K-quants, IQ4_XS) never go through tinyBLAS on this build.

What decides the float order
----------------------------
Both kernels keep one 8-lane float accumulator per output element (Cv[j][i]) and walk k from
start to end; the RM x RN register tiles that mnpack / gemm4xN / gemmMx4 pick, the thread
split and the job order only decide which elements are computed together, never the order
within one. So every element is:
- floats: acc = 0; for l in 0, 8, ..., k - 8: acc = fma(w[l:l+8], x[l:l+8], acc)
  (`madd` is `_mm256_fmadd_ps`: one rounding), F16 widened by vcvtph2ps, BF16 by a shift;
- Q0 types: acc = 0; for each 32-value block b:
  acc = fma(broadcast(fp32(w.d) * fp32(x.d)), float(sumi), acc), where the scale product is
  one float32 multiply (scalar in `gemm`, 4-wide `_mm_mul_ps` in gemm4xN / gemmMx4: the
  same) and sumi the 8 int32 lanes of `updot(sign(w, w), sign(x, w))` = vpmaddubsw then
  vpmaddwd with ones: lane i = the exact sum of values 4i..4i+3's products (Q4_0 / Q5_0
  decoded to signed bytes q - 8 / q - 16, IQ4_NL to kvalues_iq4nl[q] by vpshufb, as
  tinyBLAS's `load` does);
then `hsum`: (hi128 + lo128), then (l0 + l2) + (l1 + l3) of that (movehl / movehdup).
The activations are ggml's from_float bytes (kquant.matmul.activations): F16 / BF16 rounding,
the AVX2 quantize_row_q8_0.

The port
--------
One parallel loop (prange) per call, so one fork and join; a value does not depend on its job,
so nothing depends on the thread count either. Floats: jobs = (chunk of TOKEN_CHUNK tokens,
group of 4 weight rows), chunk-major; 4 rows x 3 tokens a tile (12 accumulators, tinyBLAS<8>'s
RM = 4, RN = 3; 4 x 2 and 4 x 1 for the last tokens).

Q0 types, below PREDECODE_TOKENS tokens: tinyBLAS's own tiles over the GGUF blocks (4 rows x
2 tokens, 8 accumulators, as gemm4xN<2>; single elements for the last rows and token), each
block decoded as it is used (the fewest bytes to read: best for a few tokens). From
PREDECODE_TOKENS tokens: "the prepared form" (below), where one vector holds lane i of
tinyBLAS's accumulators of 8 weight rows (lane j: row j) for one token. Its integers come from
int16 pairs (two vpmaddwd against broadcast activation pairs, vpaddd) or, where the CPU has
VNNI (USE_VNNI), from one vpdpbusd of the rows' 4 signed bytes against the token's 4 bytes
+ 128, started at -128 x the bytes' sum: in both, the exact int32 of tinyBLAS's lane, so
each value still gets tinyBLAS's convert, scale product (d_w * d_x, one float32 multiply,
here for 8 rows at once) and fma, block after block, then hsum's additions in hsum's order
(hsum8). Per 32 products: one fma, one convert and 3 (int16) or 1 (VNNI) integer operations,
against tinyBLAS's 5 and a scalar multiply and broadcast. Tiles: 8 rows x 2 tokens x 8 lanes
(VNNI) or 8 x 3 x 8 (int16) where there are 32 vector registers (AVX-512VL), else 8 x 2 x 4
in two passes over the blocks; jobs = (block of groups of 8 rows, chunk of tokens), block-
major; a chunk's activations (Q0_CHUNK_BYTES) stay in L1 while the block's groups pass over
them. `matmul` decodes each block in the job that multiplies it (FUSED_BLOCK_BYTES a job);
`prepare` decodes the whole matrix once (2 bytes a weight) for `matmul_prepared`, which
callers that multiply a matrix more than once should keep. The activations are quantized
straight into what the kernels read (_quantize_q8_0_x16 / _u8: the numbers of
kquant.matmul.activations' AVX2 quantize_row_q8_0). None of these choices changes a bit
(tests/test_matmul_tinyblas.py varies some of them).

The vector operations are LLVM IR intrinsics below (vpsignb, vpmaddubsw, vpmaddwd, vpdpbusd,
llvm.fma.v8f32, vcvtph2ps), in kquant.matmul.simd's style but kept in this file so that
Numba's cache (which tracks the defining file) stays right; LLVM compiles them for the host
(on AVX512-VNNI it fuses vpmaddwd + vpaddd into vpdpwssd).
Speed (2 threads of an AVX-512 / VNNI EPYC (Zen 4), 512 tokens x 576 x 1536 rows, Q8_0 /
Q5_0 / Q4_0 alike): tinyBLAS's own tiles 6.3 ms (72 GMAC/s); `matmul` 3.0 ms,
`matmul_prepared` 2.8 ms (VNNI); 3.9 / 3.7 ms with the int16 form. Compiled for AVX2 only
(NUMBA_CPU_FEATURES, 16 registers): 4.8 / 4.6 ms. tools/bench_tinyblas.py compares with ggml.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import config as numba_config
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.core.datamodel import models
from numba.extending import intrinsic, register_model

from ..codecs import vectorizing
from ..codecs.bits import HAS_F16C, fp32_to_fp16, round_nearest
from .activations import qtype_of, quantize_rows, vec_dot_type
from .prims import f16_to_f32, load_f16

T = GGMLQuantizationType

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
Q0_TYPES = (T.Q8_0, T.Q4_0, T.Q5_0, T.IQ4_NL)
#: the weight types llamafile_sgemm handles on an AVX2 + FMA + F16C build
TYPES = FLOAT_TYPES + Q0_TYPES
_BLOCK = {T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2),
          T.Q8_0: (32, 34), T.Q4_0: (32, 18), T.Q5_0: (32, 22), T.IQ4_NL: (32, 18)}

#: tokens per chunk: all row groups pass over one chunk's activations before the next
TOKEN_CHUNK = 64
#: Q0 types' prepared kernels: the bytes of a chunk of activations (which stay in L1 while
#: a block of groups passes over them), and the bytes of prepared weights a job takes at most
#: when it decodes them itself (`matmul`; they stay in L2)
Q0_CHUNK_BYTES = 16 << 10
FUSED_BLOCK_BYTES = 96 << 10
#: Q0 types: from this many tokens the weights are decoded once (`matmul`: each group of 8
#: rows by the job that multiplies it; `prepare`: the whole matrix, kept) and multiplied in
#: the prepared form; below, tinyBLAS's own tiles decode the GGUF blocks as they go (fewer
#: bytes to read: the better for a few tokens)
PREDECODE_TOKENS = {T.Q8_0: 6, T.Q4_0: 6, T.Q5_0: 6, T.IQ4_NL: 6}


def _qtype(qtype) -> T | None:
    try:
        t = qtype_of(qtype)
    except ValueError:
        return None
    return t if t in TYPES else None


def applies(qtype, rows: int, k: int, n_tok: int) -> bool:
    """Whether ggml's mul_mat of a contiguous (rows, k) weight of `qtype` by contiguous float32
    activations (n_tok, k) is taken by llamafile_sgemm on the AVX2 build (see the module
    docstring): n_tok >= 2 and, for F32 / F16 / BF16, k % 8 == 0 and rows % 4 == 0; for
    Q8_0 / Q4_0 / Q5_0 / IQ4_NL, k a whole number of blocks. False for every other type."""
    t = _qtype(qtype)
    if t is None or n_tok < 2 or rows < 1 or k < 1:
        return False
    if t in FLOAT_TYPES:
        return k % 8 == 0 and rows % 4 == 0
    return k % 32 == 0


def _check_weights(wb: np.ndarray, qtype) -> tuple[T, np.ndarray, int]:
    t = _qtype(qtype)
    if t is None:
        raise ValueError(f"tinyBLAS does not handle {qtype!r} on AVX2; it takes "
                         + ", ".join(t.name for t in TYPES))
    wb = np.asarray(wb)
    if wb.ndim != 2:
        raise ValueError("weights must be (rows, row_bytes)")
    wb = np.ascontiguousarray(wb).view(np.uint8)
    block, size = _BLOCK[t]
    if wb.shape[1] % size:
        raise ValueError(f"{t.name}: a row of {wb.shape[1]} bytes is not whole blocks")
    return t, wb, wb.shape[1] // size * block


def _check_x(t: T, rows: int, k: int, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError("activations must be (n_tok, k)")
    if x.dtype != np.float32:
        raise ValueError(f"activations must be float32, got {x.dtype}")
    if x.shape[1] != k:
        raise ValueError(f"activations of {x.shape[1]} values against rows of {k}")
    if not applies(t, rows, k, x.shape[0]):
        raise ValueError(f"llamafile_sgemm does not take {t.name} ({rows} x {k}) by "
                         f"{x.shape[0]} tokens; ggml uses its vec_dot path there")
    return np.ascontiguousarray(x)


def matmul(wb: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    """x @ W.T as ggml's mul_mat computes it through tinyBLAS: wb uint8 (rows, row_bytes),
    the weight rows as stored in GGUF (F32 / F16 / BF16 as raw bytes too; other dtypes are
    read as bytes), x float32 (n_tok, k). Returns float32 (n_tok, rows). Raises ValueError
    where `applies` is false (ggml would take another path, with another order).
    Q0 types from PREDECODE_TOKENS tokens: `matmul_prepared(prepare(wb, qtype), x)`."""
    t, wb, k = _check_weights(wb, qtype)
    x = _check_x(t, wb.shape[0], k, x)
    if t in Q0_TYPES and x.shape[0] >= PREDECODE_TOKENS[t]:
        return _run_fused(wb, t, k, x)
    n_tok, rows = x.shape[0], wb.shape[0]
    out = np.empty((n_tok, rows), np.float32)
    with vectorizing():
        act = quantize_rows(x, vec_dot_type(t))
        if t == T.F32:
            _mm_f32(wb.view(np.float32), act.values, out, TOKEN_CHUNK)
        elif t == T.F16:
            _mm_f16(wb.view(np.uint16), act.values, out, TOKEN_CHUNK)
        elif t == T.BF16:
            _mm_bf16(wb.view(np.uint16), act.values, out, TOKEN_CHUNK)
        else:
            kernel = {T.Q8_0: _direct_q8_0, T.Q4_0: _direct_q4_0, T.Q5_0: _direct_q5_0,
                      T.IQ4_NL: _direct_iq4_nl}[t]
            kernel(wb, act.qs, act.d, out, TOKEN_CHUNK)
    return out


#: Q0 types' prepared form: the VNNI one (vpdpbusd) where the CPU has it (and this is true),
#: else the int16 one (vpmaddwd); the same bits either way
USE_VNNI = True


@dataclass(eq=False)
class Prepared:
    """One weight matrix ready for `matmul_prepared`. For Q8_0 / Q4_0 / Q5_0 (see "the
    prepared form" below): P (groups of 8 rows, k / 32 * 512 bytes), the values decoded and
    laid out 8 rows a vector, int16 pairs or (vnni) bytes and their sums; D float32 (groups,
    k / 32 * 8) the rows' scales: 2 bytes a weight in all. For F32 / F16 / BF16 only the bytes
    (wb), which their kernel reads as they are."""
    qtype: T
    rows: int
    k: int
    wb: np.ndarray
    P: np.ndarray | None = None
    D: np.ndarray | None = None
    vnni: bool = False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.P, self.D) if a is not None)


def prepare(wb: np.ndarray, qtype) -> Prepared:
    """The weight matrix wb (uint8 rows of `qtype`'s blocks, as `matmul` takes it) in the form
    `matmul_prepared` multiplies: Q0 types decoded once (parallel over groups of 8 rows)."""
    t, wb, k = _check_weights(wb, qtype)
    rows = wb.shape[0]
    if t not in Q0_TYPES:
        return Prepared(t, rows, k, wb)
    nb, groups = k // 32, (rows + 7) // 8
    vnni = bool(USE_VNNI and _HAS_VNNI)
    P = _empty((groups, nb * 512), np.uint8) if vnni else _empty((groups, nb * 256), np.int16)
    D = _empty((groups, nb * 8), np.float32)
    kernel = {T.Q8_0: _prepare_q8_0, T.Q4_0: _prepare_q4_0, T.Q5_0: _prepare_q5_0,
              T.IQ4_NL: _prepare_iq4_nl}[t]
    with vectorizing():
        kernel(wb, P.view(np.int32), D, vnni)
    return Prepared(t, rows, k, wb, P, D, vnni)


def matmul_prepared(prep: Prepared, x: np.ndarray) -> np.ndarray:
    """`matmul(wb, qtype, x)` for prep = prepare(wb, qtype): the same bits, and the same
    ValueError where `applies` is false."""
    x = _check_x(prep.qtype, prep.rows, prep.k, x)
    if prep.P is None or x.shape[0] < PREDECODE_TOKENS[prep.qtype]:
        return matmul(prep.wb, prep.qtype, x)
    return _run_prepared(prep, x)


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty aligned to 64 bytes (a cache line: numpy's 16 would split half the kernels'
    32-byte loads across two lines)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + 64, np.uint8)
    o = -raw.ctypes.data % 64
    return raw[o:o + n].view(dtype).reshape(shape)


def _quantize_for(x: np.ndarray, k: int, vnni: bool) -> tuple[np.ndarray, np.ndarray]:
    """The Q8_0 activations as the prepared kernels read them: (xu uint8 q + 128 (vnni) or
    x16 int16 q, xd float32 scales)."""
    n_tok = x.shape[0]
    xd = np.empty((n_tok, k // 32), np.float32)
    if vnni:
        xq = _empty((n_tok, k), np.uint8)
        _quantize_q8_0_u8(x, xq, xd)
    else:
        xq = _empty((n_tok, k), np.int16)
        _quantize_q8_0_x16(x, xq, xd)
    return xq, xd


def _gblock(groups: int, most: int) -> int:
    """Groups a block for `groups` groups and blocks of at most `most` (>= 1), the blocks a
    multiple of the thread count (every thread the same work)."""
    threads = get_num_threads()
    blocks = -(-max(threads, -(-groups // most)) // threads) * threads
    return max(1, -(-groups // blocks))


def _q0_chunk(k: int, vnni: bool) -> int:
    """Tokens a chunk: Q0_CHUNK_BYTES of activations, a whole number of tiles (4 at least),
    at most TOKEN_CHUNK."""
    tokens = 2 if vnni else _TOKENS16
    n = Q0_CHUNK_BYTES // (k * (1 if vnni else 2)) // tokens * tokens
    return max(1, min(TOKEN_CHUNK, max(4 * tokens, n)))


def _run_fused(wb: np.ndarray, t: T, k: int, x: np.ndarray) -> np.ndarray:
    vnni = bool(USE_VNNI and _HAS_VNNI)
    out = np.empty((x.shape[0], wb.shape[0]), np.float32)
    kernel = {(T.Q8_0, False): _fused16_q8_0, (T.Q8_0, True): _fused_vnni_q8_0,
              (T.Q4_0, False): _fused16_q4_0, (T.Q4_0, True): _fused_vnni_q4_0,
              (T.Q5_0, False): _fused16_q5_0, (T.Q5_0, True): _fused_vnni_q5_0,
              (T.IQ4_NL, False): _fused16_iq4_nl, (T.IQ4_NL, True): _fused_vnni_iq4_nl}[t, vnni]
    with vectorizing():
        xq, xd = _quantize_for(x, k, vnni)
        groups = (wb.shape[0] + 7) // 8
        most = max(1, FUSED_BLOCK_BYTES // (k // 32 * 512))
        kernel(wb, xq, xd, out, _q0_chunk(k, vnni), _gblock(groups, most))
    return out


def _run_prepared(prep: Prepared, x: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], prep.rows), np.float32)
    with vectorizing():
        xq, xd = _quantize_for(x, prep.k, prep.vnni)
        kernel = _mm_prepared_vnni if prep.vnni else _mm_prepared16
        kernel(prep.P, prep.D, xq, xd, out, _q0_chunk(prep.k, prep.vnni),
               _gblock(prep.P.shape[0], 32))
    return out


# ---- 256-bit vector values and the few AVX2 operations tinyBLAS uses -------------------------

_FEATURES = llvm_binding.get_host_cpu_features().flatten().split(",")
_HAS_AVX2 = "+avx2" in _FEATURES
# What Numba compiles for (NUMBA_CPU_FEATURES, else the host's features):
_TARGET = (numba_config.CPU_FEATURES.split(",") if numba_config.CPU_FEATURES is not None
           else _FEATURES)
#: 32 vector registers (AVX-512VL: LLVM also uses ymm16-31 for 256-bit code): the prepared
#: kernel's tiles keep 24 accumulators, else 12
_WIDE = "+avx512vl" in _TARGET
#: vpdpbusd on ymm registers (AVX512-VNNI with AVX512-VL, or AVX-VNNI)
_HAS_VNNI = ("+avx512vnni" in _TARGET and "+avx512vl" in _TARGET) or "+avxvnni" in _TARGET

_i8, _i16, _i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_f32 = ir.FloatType()


class TbVec(types.Type):
    def __init__(self, kind: str, bits: int, lanes: int):
        self.kind, self.bits, self.lanes = kind, bits, lanes
        super().__init__(name=f"TbVec<{kind}{bits}x{lanes}>")

    @property
    def llvm(self):
        return ir.VectorType(_f32 if self.kind == "f" else ir.IntType(self.bits), self.lanes)


@register_model(TbVec)
class _TbVecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm)


B32 = TbVec("i", 8, 32)
W16 = TbVec("i", 16, 16)
F8 = TbVec("f", 32, 8)
_V16 = ir.VectorType(_i16, 16)
_V8 = ir.VectorType(_i32, 8)


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(mask)), list(mask)))


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_i32, 0))
    return _shuffle(builder, v, ir.Constant(vty, ir.Undefined), [0] * vty.count)


def _ptr(context, builder, arrty, arr, off, offty, vty):
    a = context.make_array(arrty)(context, builder, value=arr)
    p = builder.gep(a.data, [context.cast(builder, off, offty, types.intp)])
    return builder.bitcast(p, vty.as_pointer())


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _arr1(t, dtypes):
    return isinstance(t, types.Array) and t.ndim == 1 and t.dtype in dtypes


@intrinsic
def ld_b32(typingctx, arr, off):
    """32 bytes of a 1-D int8 / uint8 array from index off."""
    if not (_arr1(arr, (types.int8, types.uint8)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                                 B32.llvm), align=1)
    return B32(arr, off), codegen


@intrinsic
def ld_f32(typingctx, arr, off):
    """8 float32 from index off (_mm256_loadu_ps)."""
    if not (_arr1(arr, (types.float32,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                                 F8.llvm), align=4)
    return F8(arr, off), codegen


def _half_bits_to_f32(builder, v):
    """<8 x i16> IEEE half bits -> <8 x float> (vcvtph2ps; exact integer form without F16C)."""
    if HAS_F16C:
        return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), F8.llvm)
    w = builder.zext(v, _V8)
    c = lambda x: ir.Constant(_V8, [x] * 8)  # noqa: E731
    inf_nan = builder.mul(builder.lshr(builder.add(builder.and_(w, c(0x7C00)), c(0x400)), c(15)),
                          c(0x70000000))
    bits = builder.or_(builder.shl(builder.and_(w, c(0x8000)), c(16)),
                       builder.add(builder.shl(builder.and_(w, c(0x7FFF)), c(13)), inf_nan))
    return builder.fmul(builder.bitcast(bits, F8.llvm), ir.Constant(F8.llvm, [2.0 ** 112] * 8))


@intrinsic
def ld_f16(typingctx, arr, off):
    """8 fp16 (uint16 bits) from index off, widened (_mm256_cvtph_ps)."""
    if not (_arr1(arr, (types.uint16,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              ir.VectorType(_i16, 8)), align=2)
        return _half_bits_to_f32(builder, v)
    return F8(arr, off), codegen


@intrinsic
def ld_bf16(typingctx, arr, off):
    """8 bf16 (uint16 bits) from index off, widened (vpmovzxwd + vpslld 16)."""
    if not (_arr1(arr, (types.uint16,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              ir.VectorType(_i16, 8)), align=2)
        w = builder.shl(builder.zext(v, _V8), ir.Constant(_V8, [16] * 8))
        return builder.bitcast(w, F8.llvm)
    return F8(arr, off), codegen


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(F8.llvm, [0.0] * 8)
    return F8(), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c with one rounding per lane (_mm256_fmadd_ps); a may be a float32 scalar
    (broadcast)."""
    if not (a in (types.float32, F8) and b == F8 and c == F8):
        return None

    def codegen(context, builder, sig, args):
        av = args[0] if sig.args[0] == F8 else _splat(builder, args[0], F8.llvm)
        return _call(builder, "llvm.fma.v8f32", F8.llvm, [av, args[1], args[2]])
    return F8(a, b, c), codegen


@intrinsic
def hsum(typingctx, v):
    """tinyBLAS's hsum(__m256): x = hi128 + lo128; x += movehl(x); x0 + x1
    = ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    if v != F8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        s = builder.fadd(_shuffle(builder, v, v, range(4, 8)), _shuffle(builder, v, v, range(4)))
        s = builder.fadd(s, _shuffle(builder, s, s, [2, 3, 2, 3]))
        return builder.fadd(builder.extract_element(s, ir.Constant(_i32, 0)),
                            builder.extract_element(s, ir.Constant(_i32, 1)))
    return types.float32(v), codegen


def _psign(builder, a, b):
    """_mm256_sign_epi8(a, b): a where b > 0, -a where b < 0, 0 where b == 0."""
    if _HAS_AVX2:
        return _call(builder, "llvm.x86.avx2.psign.b", B32.llvm, [a, b])
    zero = ir.Constant(B32.llvm, [0] * 32)
    neg = builder.select(builder.icmp_signed("<", b, zero), builder.sub(zero, a), a)
    return builder.select(builder.icmp_signed("==", b, zero), zero, neg)


def _even_odd(builder, v, n):
    return (_shuffle(builder, v, v, range(0, 2 * n, 2)),
            _shuffle(builder, v, v, range(1, 2 * n, 2)))


def _maddubs(builder, u, s):
    """vpmaddubsw: unsigned u x signed s, adjacent pairs summed with int16 saturation."""
    if _HAS_AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16, [u, s])
    wide = ir.VectorType(_i32, 16)
    ue, uo = _even_odd(builder, u, 16)
    se, so = _even_odd(builder, s, 16)
    p = builder.add(builder.mul(builder.zext(ue, wide), builder.sext(se, wide)),
                    builder.mul(builder.zext(uo, wide), builder.sext(so, wide)))
    lo, hi = ir.Constant(wide, [-32768] * 16), ir.Constant(wide, [32767] * 16)
    p = builder.select(builder.icmp_signed("<", p, lo), lo, p)
    p = builder.select(builder.icmp_signed(">", p, hi), hi, p)
    return builder.trunc(p, _V16)


def _madd(builder, a, b):
    """vpmaddwd: int16 a times int16 b, adjacent pairs summed to int32 (exact)."""
    if _HAS_AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8, [a, b])
    ae, ao = _even_odd(builder, a, 8)
    be, bo = _even_odd(builder, b, 8)
    return builder.add(builder.mul(builder.sext(ae, _V8), builder.sext(be, _V8)),
                       builder.mul(builder.sext(ao, _V8), builder.sext(bo, _V8)))


def _madd_ones(builder, a):
    """vpmaddwd with ones: adjacent int16 pairs summed to int32."""
    ones = ir.Constant(_V16, [1] * 16)
    if _HAS_AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8, [ones, a])
    ae, ao = _even_odd(builder, a, 8)
    return builder.add(builder.sext(ae, _V8), builder.sext(ao, _V8))


@intrinsic
def updot_abs(typingctx, wabs, w, a):
    """tinyBLAS_Q0_AVX's updot(sign(w, w), sign(a, w)) as float lanes, with |w| = sign(w, w)
    given: vpsignb, vpmaddubsw, vpmaddwd with ones, vcvtdq2ps."""
    if not (wabs == B32 and w == B32 and a == B32):
        return None

    def codegen(context, builder, sig, args):
        p = _maddubs(builder, args[0], _psign(builder, args[2], args[1]))
        return builder.sitofp(_madd_ones(builder, p), F8.llvm)
    return F8(wabs, w, a), codegen


# ---- float weights: tinyBLAS<8, __m256, __m256, T, T, float> ---------------------------------

@njit(cache=True, error_model="numpy", inline="always")
def _f_4x3(w, x, out, r, t, load):
    k = w.shape[1]
    a0, a1, a2, a3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    b0, b1, b2 = x[t], x[t + 1], x[t + 2]
    c00 = c01 = c02 = c10 = c11 = c12 = vzero()
    c20 = c21 = c22 = c30 = c31 = c32 = vzero()
    for l in range(0, k, 8):
        v0 = load(b0, l)
        v1 = load(b1, l)
        v2 = load(b2, l)
        u = load(a0, l)
        c00 = vfma(u, v0, c00)
        c01 = vfma(u, v1, c01)
        c02 = vfma(u, v2, c02)
        u = load(a1, l)
        c10 = vfma(u, v0, c10)
        c11 = vfma(u, v1, c11)
        c12 = vfma(u, v2, c12)
        u = load(a2, l)
        c20 = vfma(u, v0, c20)
        c21 = vfma(u, v1, c21)
        c22 = vfma(u, v2, c22)
        u = load(a3, l)
        c30 = vfma(u, v0, c30)
        c31 = vfma(u, v1, c31)
        c32 = vfma(u, v2, c32)
    out[t, r], out[t, r + 1], out[t, r + 2], out[t, r + 3] = (
        hsum(c00), hsum(c10), hsum(c20), hsum(c30))
    out[t + 1, r], out[t + 1, r + 1], out[t + 1, r + 2], out[t + 1, r + 3] = (
        hsum(c01), hsum(c11), hsum(c21), hsum(c31))
    out[t + 2, r], out[t + 2, r + 1], out[t + 2, r + 2], out[t + 2, r + 3] = (
        hsum(c02), hsum(c12), hsum(c22), hsum(c32))


@njit(cache=True, error_model="numpy", inline="always")
def _f_4x2(w, x, out, r, t, load):
    k = w.shape[1]
    a0, a1, a2, a3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    b0, b1 = x[t], x[t + 1]
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = vzero()
    for l in range(0, k, 8):
        v0 = load(b0, l)
        v1 = load(b1, l)
        u = load(a0, l)
        c00 = vfma(u, v0, c00)
        c01 = vfma(u, v1, c01)
        u = load(a1, l)
        c10 = vfma(u, v0, c10)
        c11 = vfma(u, v1, c11)
        u = load(a2, l)
        c20 = vfma(u, v0, c20)
        c21 = vfma(u, v1, c21)
        u = load(a3, l)
        c30 = vfma(u, v0, c30)
        c31 = vfma(u, v1, c31)
    out[t, r], out[t, r + 1], out[t, r + 2], out[t, r + 3] = (
        hsum(c00), hsum(c10), hsum(c20), hsum(c30))
    out[t + 1, r], out[t + 1, r + 1], out[t + 1, r + 2], out[t + 1, r + 3] = (
        hsum(c01), hsum(c11), hsum(c21), hsum(c31))


@njit(cache=True, error_model="numpy", inline="always")
def _f_4x1(w, x, out, r, t, load):
    k = w.shape[1]
    a0, a1, a2, a3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    b0 = x[t]
    c0 = c1 = c2 = c3 = vzero()
    for l in range(0, k, 8):
        v0 = load(b0, l)
        c0 = vfma(load(a0, l), v0, c0)
        c1 = vfma(load(a1, l), v0, c1)
        c2 = vfma(load(a2, l), v0, c2)
        c3 = vfma(load(a3, l), v0, c3)
    out[t, r], out[t, r + 1], out[t, r + 2], out[t, r + 3] = (
        hsum(c0), hsum(c1), hsum(c2), hsum(c3))


@njit(cache=True, error_model="numpy", inline="always")
def _f_rows(w, x, out, chunk, load):
    """w (rows, k) with rows % 4 == 0, x (n_tok, k) in the same element type, k % 8 == 0.
    One parallel loop over (token chunk, row group) jobs, chunk-major: one fork and join per
    call (a join costs a scheduler slice when the cores are shared)."""
    n_tok = x.shape[0]
    groups = w.shape[0] // 4
    chunks = (n_tok + chunk - 1) // chunk
    for job in prange(chunks * groups):
        t0 = job // groups * chunk
        t1 = min(n_tok, t0 + chunk)
        r = 4 * (job % groups)
        t = t0
        while t + 3 <= t1:
            _f_4x3(w, x, out, r, t, load)
            t += 3
        if t + 2 == t1:
            _f_4x2(w, x, out, r, t, load)
        elif t + 1 == t1:
            _f_4x1(w, x, out, r, t, load)


@njit(cache=True, error_model="numpy", parallel=True)
def _mm_f32(w, x, out, chunk):
    _f_rows(w, x, out, chunk, ld_f32)


@njit(cache=True, error_model="numpy", parallel=True)
def _mm_f16(w, x, out, chunk):
    _f_rows(w, x, out, chunk, ld_f16)


@njit(cache=True, error_model="numpy", parallel=True)
def _mm_bf16(w, x, out, chunk):
    _f_rows(w, x, out, chunk, ld_bf16)


# ---- Q8_0 / Q4_0 / Q5_0 weights: tinyBLAS_Q0_AVX --------------------------------------------

@intrinsic
def vabs8(typingctx, v):
    """_mm256_sign_epi8(v, v): |v| per byte (-128 stays 0x80, read as 128 by vpmaddubsw)."""
    if v != B32:
        return None

    def codegen(context, builder, sig, args):
        return _psign(builder, args[0], args[0])
    return B32(v), codegen


def _nibbles(builder, context, sig, args, at):
    """tinyBLAS's denibble: the 16 bytes at args[0][args[1] + at] -> low nibbles, then high."""
    a = context.make_array(sig.args[0])(context, builder, value=args[0])
    off = builder.add(context.cast(builder, args[1], sig.args[1], types.intp),
                      ir.Constant(cgutils.intp_t, at))
    p = builder.bitcast(builder.gep(a.data, [off]), ir.VectorType(_i8, 16).as_pointer())
    v = builder.load(p, align=1)
    both = _shuffle(builder, v, builder.lshr(v, ir.Constant(v.type, [4] * 16)), range(32))
    return builder.and_(both, ir.Constant(B32.llvm, [15] * 32)), a, off


@intrinsic
def dec_q4_0(typingctx, arr, off):
    """The Q4_0 block at byte off of a uint8 row as 32 signed bytes q - 8 (tinyBLAS's load)."""
    if not (_arr1(arr, (types.uint8,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v, _, _ = _nibbles(builder, context, sig, args, 2)
        return builder.sub(v, ir.Constant(B32.llvm, [8] * 32))
    return B32(arr, off), codegen


@intrinsic
def dec_q5_0(typingctx, arr, off):
    """The Q5_0 block at byte off as 32 signed bytes q - 16: denibble | bittobyte, where
    bittobyte sets 0xF0 in the bytes whose bit of qh is clear."""
    if not (_arr1(arr, (types.uint8,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v, a, off = _nibbles(builder, context, sig, args, 6)
        qp = builder.gep(a.data, [builder.sub(off, ir.Constant(cgutils.intp_t, 4))])
        qh = builder.load(builder.bitcast(qp, _i32.as_pointer()), align=1)
        b = builder.bitcast(_splat(builder, qh, _V8), B32.llvm)
        b = _shuffle(builder, b, b, [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8)
        b = builder.or_(b, ir.Constant(B32.llvm, [0xFF ^ (1 << (j % 8)) for j in range(32)]))
        bit = builder.icmp_signed("==", b, ir.Constant(B32.llvm, [-1] * 32))
        hi = builder.select(bit, ir.Constant(B32.llvm, [0] * 32),
                            ir.Constant(B32.llvm, [0xF0] * 32))
        return builder.or_(v, hi)
    return B32(arr, off), codegen


_KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@intrinsic
def dec_iq4_nl(typingctx, arr, off):
    """The IQ4_NL block at byte off as 32 signed bytes kvalues_iq4nl[q] (tinyBLAS's load0 /
    load1: vpshufb of the table by the nibbles; without AVX2, compares and selects)."""
    if not (_arr1(arr, (types.uint8,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v, _, _ = _nibbles(builder, context, sig, args, 2)
        table = ir.Constant(B32.llvm, [x & 0xFF for x in _KVALUES_IQ4NL] * 2)
        if _HAS_AVX2:
            return _call(builder, "llvm.x86.avx2.pshuf.b", B32.llvm, [table, v])
        out = ir.Constant(B32.llvm, [0] * 32)
        for i, x in enumerate(_KVALUES_IQ4NL):
            hit = builder.icmp_unsigned("==", v, ir.Constant(B32.llvm, [i] * 32))
            out = builder.select(hit, ir.Constant(B32.llvm, [x & 0xFF] * 32), out)
        return out
    return B32(arr, off), codegen


# A weight row's block b as (|q|, q) for updot_abs, straight from the GGUF blocks (one fetch
# per type; the second argument is unused): the direct kernel's, and the decoder's.

@njit(cache=True, error_model="numpy", inline="always")
def _fetch_q8_0(wr, unused, b):
    w = ld_b32(wr, 34 * b + 2)
    return vabs8(w), w


@njit(cache=True, error_model="numpy", inline="always")
def _fetch_q4_0(wr, unused, b):
    w = dec_q4_0(wr, 18 * b)
    return vabs8(w), w


@njit(cache=True, error_model="numpy", inline="always")
def _fetch_q5_0(wr, unused, b):
    w = dec_q5_0(wr, 22 * b)
    return vabs8(w), w


@njit(cache=True, error_model="numpy", inline="always")
def _fetch_iq4_nl(wr, unused, b):
    w = dec_iq4_nl(wr, 18 * b)
    return vabs8(w), w


# ---- the direct kernel (few tokens): tinyBLAS's own tiles over the GGUF blocks ---------------

@njit(cache=True, error_model="numpy", inline="always")
def _q_4x2(A, B, ia, D, id_, aq, ad, out, r, t, fetch):
    """Weight rows r..r+3 (rows ia.. of A / B as `fetch` reads them, scales rows id_.. of D)
    against tokens t, t + 1: tinyBLAS's gemm4xN<2>, 8 accumulators."""
    nb = D.shape[1]
    a0, a1, a2, a3 = A[ia], A[ia + 1], A[ia + 2], A[ia + 3]
    b0, b1, b2, b3 = B[ia], B[ia + 1], B[ia + 2], B[ia + 3]
    d0, d1, d2, d3 = D[id_], D[id_ + 1], D[id_ + 2], D[id_ + 3]
    x0, x1 = aq[t], aq[t + 1]
    e0, e1 = ad[t], ad[t + 1]
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = vzero()
    for b in range(nb):
        o = 32 * b
        y0 = ld_b32(x0, o)
        y1 = ld_b32(x1, o)
        s0 = e0[b]
        s1 = e1[b]
        wa, w = fetch(a0, b0, b)
        c00 = vfma(d0[b] * s0, updot_abs(wa, w, y0), c00)
        c01 = vfma(d0[b] * s1, updot_abs(wa, w, y1), c01)
        wa, w = fetch(a1, b1, b)
        c10 = vfma(d1[b] * s0, updot_abs(wa, w, y0), c10)
        c11 = vfma(d1[b] * s1, updot_abs(wa, w, y1), c11)
        wa, w = fetch(a2, b2, b)
        c20 = vfma(d2[b] * s0, updot_abs(wa, w, y0), c20)
        c21 = vfma(d2[b] * s1, updot_abs(wa, w, y1), c21)
        wa, w = fetch(a3, b3, b)
        c30 = vfma(d3[b] * s0, updot_abs(wa, w, y0), c30)
        c31 = vfma(d3[b] * s1, updot_abs(wa, w, y1), c31)
    out[t, r], out[t, r + 1], out[t, r + 2], out[t, r + 3] = (
        hsum(c00), hsum(c10), hsum(c20), hsum(c30))
    out[t + 1, r], out[t + 1, r + 1], out[t + 1, r + 2], out[t + 1, r + 3] = (
        hsum(c01), hsum(c11), hsum(c21), hsum(c31))


@njit(cache=True, error_model="numpy", inline="always")
def _q_1x1(A, B, ia, D, id_, aq, ad, out, r, t, fetch):
    """One weight row against one token (the same order as in any tile)."""
    nb = D.shape[1]
    a, w_, d = A[ia], B[ia], D[id_]
    x, e = aq[t], ad[t]
    c = vzero()
    for b in range(nb):
        wa, w = fetch(a, w_, b)
        c = vfma(d[b] * e[b], updot_abs(wa, w, ld_b32(x, 32 * b)), c)
    out[t, r] = hsum(c)


@njit(cache=True, error_model="numpy", inline="always")
def _q_group(A, B, ia, D, id_, aq, ad, out, r, nr, t0, t1, fetch):
    """Weight rows r..r+nr-1 (nr <= 4) against tokens t0..t1-1."""
    if nr == 4:
        t = t0
        while t + 2 <= t1:
            _q_4x2(A, B, ia, D, id_, aq, ad, out, r, t, fetch)
            t += 2
        if t < t1:
            for i in range(4):
                _q_1x1(A, B, ia + i, D, id_ + i, aq, ad, out, r + i, t, fetch)
    else:
        for t in range(t0, t1):
            for i in range(nr):
                _q_1x1(A, B, ia + i, D, id_ + i, aq, ad, out, r + i, t, fetch)


@njit(cache=True, error_model="numpy", inline="always")
def _q0_direct(wb, aq, ad, out, chunk, bsize, fetch):
    """wb uint8 (rows, row_bytes) of one Q0 type (blocks of bsize bytes, read by fetch); aq
    int8 (n_tok, k) and ad float32 (n_tok, k / 32): the Q8_0 activations; out float32
    (n_tok, rows). One parallel loop over (token chunk, group of 4 rows) jobs, chunk-major;
    a job widens its rows' scales, then decodes every block in every tile."""
    rows = wb.shape[0]
    n_tok, k = aq.shape
    nb = k // 32
    groups = (rows + 3) // 4
    chunks = (n_tok + chunk - 1) // chunk
    for job in prange(chunks * groups):
        t0 = job // groups * chunk
        t1 = min(n_tok, t0 + chunk)
        r = 4 * (job % groups)
        nr = min(4, rows - r)
        d = np.empty((4, nb), np.float32)
        for i in range(nr):
            wr, di = wb[r + i], d[i]
            for b in range(nb):
                di[b] = load_f16(wr, bsize * b)
        _q_group(wb, wb, r, d, 0, aq, ad, out, r, nr, t0, t1, fetch)


@njit(cache=True, error_model="numpy", parallel=True)
def _direct_q8_0(wb, aq, ad, out, chunk):
    _q0_direct(wb, aq, ad, out, chunk, 34, _fetch_q8_0)


@njit(cache=True, error_model="numpy", parallel=True)
def _direct_q4_0(wb, aq, ad, out, chunk):
    _q0_direct(wb, aq, ad, out, chunk, 18, _fetch_q4_0)


@njit(cache=True, error_model="numpy", parallel=True)
def _direct_q5_0(wb, aq, ad, out, chunk):
    _q0_direct(wb, aq, ad, out, chunk, 22, _fetch_q5_0)


@njit(cache=True, error_model="numpy", parallel=True)
def _direct_iq4_nl(wb, aq, ad, out, chunk):
    _q0_direct(wb, aq, ad, out, chunk, 18, _fetch_iq4_nl)


# ---- the prepared form: 8 rows a vector --------------------------------------------------------
# Per group g of 8 weight rows (zeros past the last row) and block b, P[g] holds 512 bytes from
# 512 b: for each lane i = 0..7 (values 4i..4i+3 of the block, tinyBLAS's int32 lane i) 64
# bytes at 512 b + 64 i, in 32-bit words, word j for row j (q the decoded signed values, as
# tinyBLAS's `load`):
# - int16 form: the pairs (q[4i], q[4i+1]) of rows 0..7, then (q[4i+2], q[4i+3]); the
#   activations widened to int16 (x16). For token t,
#     vpmaddwd(pairs A, broadcast(x16[t, 32b+4i : +2])) + vpmaddwd(pairs B, x16[.. +2 : +4])
# - VNNI form: the 4 bytes q[4i..4i+3] of rows 0..7, then -128 x their sums; the activations
#   as unsigned bytes q + 128 (xu). For token t,
#     vpdpbusd(-128 sums, broadcast(xu[t, 32b+4i : +4]), bytes)
#   (no saturation: 4 products of u8 x s8 added in int32) = sum (q_x + 128) q_w - 128 sum q_w.
# Either is, in lane j, row j's exact int32 sum of its values 4i..4i+3 times the token's: lane
# i of tinyBLAS's updot for (row j, token t), for 8 rows at once. It is converted and fma'd
# with the 8 rows' scale products d_j * x.d (one float32 multiply each, as tinyBLAS's) into
# accumulator i of (rows, t): 8 accumulators of 8 rows hold the 8 lanes of 8 of tinyBLAS's
# Cv[j][i]; hsum8 then adds them in hsum's order. So every value keeps tinyBLAS's operations
# and order; only which values share a vector changes. D[g] holds the rows' fp32 scales, 8 per
# block.

@intrinsic
def ld_w16(typingctx, arr, off):
    """16 int16 (32 bytes) of a 1-D int16 array from index off."""
    if not (_arr1(arr, (types.int16,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                                 _V16), align=2)
    return W16(arr, off), codegen


@intrinsic
def bc2w(typingctx, arr, off):
    """The 2 int16 at index off of a 1-D int16 array in all 8 int32 lanes (vpbroadcastd)."""
    if not (_arr1(arr, (types.int16,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              _i32), align=2)
        return builder.bitcast(_splat(builder, v, _V8), _V16)
    return W16(arr, off), codegen


@intrinsic
def wdot(typingctx, wa, xa, wb, xb):
    """vpmaddwd(wa, xa) + vpmaddwd(wb, xb) (int32 lanes, exact), converted (vcvtdq2ps)."""
    if not (wa == W16 and xa == W16 and wb == W16 and xb == W16):
        return None

    def codegen(context, builder, sig, args):
        s = builder.add(_madd(builder, args[0], args[1]), _madd(builder, args[2], args[3]))
        return builder.sitofp(s, F8.llvm)
    return F8(wa, xa, wb, xb), codegen


@intrinsic
def bc4(typingctx, arr, off):
    """The 4 bytes at index off of a 1-D uint8 array in all 8 int32 lanes (vpbroadcastd)."""
    if not (_arr1(arr, (types.uint8,)) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              _i32), align=1)
        return builder.bitcast(_splat(builder, v, _V8), B32.llvm)
    return B32(arr, off), codegen


@intrinsic
def dpbusd(typingctx, c, u, s):
    """vpdpbusd (AVX512-VNNI / AVX-VNNI): int32 lanes of c plus the exact sums of 4 unsigned
    bytes of u times the signed bytes of s, converted (vcvtdq2ps)."""
    if not (c == B32 and u == B32 and s == B32):
        return None

    def codegen(context, builder, sig, args):
        c, u, s = (builder.bitcast(a, _V8) for a in args)
        if _HAS_VNNI:
            v = _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8, [c, u, s])
        else:
            w16 = ir.VectorType(_i32, 32)
            p = builder.mul(builder.zext(builder.bitcast(u, B32.llvm), w16),
                            builder.sext(builder.bitcast(s, B32.llvm), w16))
            v = c
            for j in range(4):
                v = builder.add(v, _shuffle(builder, p, p, range(j, 32, 4)))
        return builder.sitofp(v, F8.llvm)
    return F8(c, u, s), codegen


@intrinsic
def vmul(typingctx, a, s):
    """a * s per lane (one rounding), s a float32 scalar (broadcast)."""
    if not (a == F8 and s == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], _splat(builder, args[1], F8.llvm))
    return F8(a, s), codegen


@intrinsic
def vadd(typingctx, a, b):
    """a + b per lane (one rounding)."""
    if not (a == F8 and b == F8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return F8(a, b), codegen


@intrinsic
def st_f32(typingctx, arr, off, v):
    """Store 8 float32 into a 1-D float32 array from index off."""
    if not (_arr1(arr, (types.float32,)) and isinstance(off, types.Integer) and v == F8):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], F8.llvm)
        builder.store(args[2], p, align=4)
        return context.get_dummy_value()
    return types.none(arr, off, v), codegen


@njit(cache=True, error_model="numpy", inline="always")
def hsum8(a0, a1, a2, a3, a4, a5, a6, a7):
    """hsum of 8 values at once, value j's lanes being lane j of a0..a7: hsum's
    ((l4 + l0) + (l6 + l2)) + ((l5 + l1) + (l7 + l3)), the same additions in the same order."""
    return vadd(vadd(vadd(a4, a0), vadd(a6, a2)), vadd(vadd(a5, a1), vadd(a7, a3)))


_F127 = np.float32(127.0)
_F0 = np.float32(0.0)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_q8_0_x16(x, x16, xd):
    """The AVX2 quantize_row_q8_0 of kquant.matmul.activations (the same operations: amax,
    d = amax / 127 through fp16, id = 127 / amax, nearest-even(x * id)), its quants widened
    to int16 (x16) and its scales as float32 (xd): what the prepared kernel reads."""
    n_tok, k = x.shape
    for t in prange(n_tok):
        xt, qt, dt = x[t], x16[t], xd[t]
        for b in range(k // 32):
            o = 32 * b
            amax = _F0
            for j in range(32):
                amax = max(amax, abs(xt[o + j]))
            idv = _F127 / amax if amax != _F0 else _F0
            dt[b] = f16_to_f32(fp32_to_fp16(amax / _F127))
            for j in range(32):
                qt[o + j] = np.int16(np.int8(np.int32(round_nearest(xt[o + j] * idv))))


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_q8_0_u8(x, xu, xd):
    """_quantize_q8_0_x16 with the quants stored as unsigned bytes q + 128 (the VNNI form)."""
    n_tok, k = x.shape
    for t in prange(n_tok):
        xt, qt, dt = x[t], xu[t], xd[t]
        for b in range(k // 32):
            o = 32 * b
            amax = _F0
            for j in range(32):
                amax = max(amax, abs(xt[o + j]))
            idv = _F127 / amax if amax != _F0 else _F0
            dt[b] = f16_to_f32(fp32_to_fp16(amax / _F127))
            for j in range(32):
                qt[o + j] = np.uint8(np.int32(round_nearest(xt[o + j] * idv)) + 128)


@intrinsic
def bzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(B32.llvm, [0] * 32)
    return B32(), codegen


@intrinsic
def sx_half(typingctx, v, hi):
    """Bytes 0..15 (hi false) or 16..31 of v sign-extended to int16, as 32 bytes."""
    if not (v == B32 and isinstance(hi, types.BooleanLiteral)):
        return None
    lanes = range(16, 32) if hi.literal_value else range(16)

    def codegen(context, builder, sig, args):
        h = _shuffle(builder, args[0], args[0], lanes)
        return builder.bitcast(builder.sext(h, _V16), B32.llvm)
    return B32(v, hi), codegen


@intrinsic
def neg128_sum4(typingctx, v):
    """-128 x the sum of each 4 signed bytes of v, as 8 int32 (32 bytes)."""
    if v != B32:
        return None

    def codegen(context, builder, sig, args):
        w = builder.sext(args[0], ir.VectorType(_i32, 32))
        s = _shuffle(builder, w, w, range(0, 32, 4))
        for j in range(1, 4):
            s = builder.add(s, _shuffle(builder, w, w, range(j, 32, 4)))
        return builder.bitcast(builder.mul(s, ir.Constant(_V8, [-128] * 8)), B32.llvm)
    return B32(v), codegen


@intrinsic
def st_t8(typingctx, arr, off, stride, v0, v1, v2, v3, v4, v5, v6, v7):
    """The 8 x 8 int32 words of v0..v7 (v_j word i) transposed: word i of v0..v7 stored at
    arr[off + stride * i :][:8] (arr 1-D int32)."""
    if not (_arr1(arr, (types.int32,)) and isinstance(off, types.Integer)
            and isinstance(stride, types.Integer)
            and all(v == B32 for v in (v0, v1, v2, v3, v4, v5, v6, v7))):
        return None

    def codegen(context, builder, sig, args):
        v = [builder.bitcast(a, _V8) for a in args[3:]]
        lo32, hi32 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
        lo64, hi64 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
        t = []
        for j in range(0, 8, 2):
            t += [_shuffle(builder, v[j], v[j + 1], lo32), _shuffle(builder, v[j], v[j + 1], hi32)]
        # t0, t1 (rows 0, 1), t2, t3 (rows 2, 3), ...
        u = [_shuffle(builder, t[0], t[2], lo64), _shuffle(builder, t[0], t[2], hi64),
             _shuffle(builder, t[1], t[3], lo64), _shuffle(builder, t[1], t[3], hi64),
             _shuffle(builder, t[4], t[6], lo64), _shuffle(builder, t[4], t[6], hi64),
             _shuffle(builder, t[5], t[7], lo64), _shuffle(builder, t[5], t[7], hi64)]
        # u[m] (m < 4): words m, m + 4 of rows 0..3; u[4 + m]: of rows 4..7
        a = context.make_array(sig.args[0])(context, builder, value=args[0])
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        stride = context.cast(builder, args[2], sig.args[2], types.intp)
        for i in range(8):
            m, half = i % 4, i // 4
            sel = list(range(4 * half, 4 * half + 4)) + list(range(8 + 4 * half, 12 + 4 * half))
            w = _shuffle(builder, u[m], u[4 + m], sel)
            o = builder.add(off, builder.mul(stride, ir.Constant(cgutils.intp_t, i)))
            p = builder.bitcast(builder.gep(a.data, [o]), _V8.as_pointer())
            builder.store(w, p, align=4)
        return context.get_dummy_value()
    return types.none(arr, off, stride, v0, v1, v2, v3, v4, v5, v6, v7), codegen


@njit(cache=True, error_model="numpy", inline="always")
def _fetch_row(wb, r, b, fetch):
    """Block b of row r as signed bytes, zeros past the last row."""
    if r < wb.shape[0]:
        wr = wb[r]
        return fetch(wr, wr, b)[1]
    return bzero()


@njit(cache=True, error_model="numpy", inline="always")
def _decode_group(wb, g, bsize, fetch, Pg, Dg, vnni):
    """Weight rows 8g..8g+7 of wb (GGUF blocks of bsize bytes) into the prepared form of one
    group, as int32 words: Pg (the word of lane i, row j of block b at 128 b + 16 i + j: int16
    pair A, or the 4 bytes (vnni); at + 8: pair B, or -128 x the 4 values' sum) and Dg; rows
    past the last are zeros."""
    rows = wb.shape[0]
    nb = Dg.shape[0] // 8
    for b in range(nb):
        for j in range(8):
            r = 8 * g + j
            Dg[8 * b + j] = load_f16(wb[r], bsize * b) if r < rows else np.float32(0.0)
        r = 8 * g
        w0 = _fetch_row(wb, r, b, fetch)
        w1 = _fetch_row(wb, r + 1, b, fetch)
        w2 = _fetch_row(wb, r + 2, b, fetch)
        w3 = _fetch_row(wb, r + 3, b, fetch)
        w4 = _fetch_row(wb, r + 4, b, fetch)
        w5 = _fetch_row(wb, r + 5, b, fetch)
        w6 = _fetch_row(wb, r + 6, b, fetch)
        w7 = _fetch_row(wb, r + 7, b, fetch)
        o = 128 * b
        if vnni:
            st_t8(Pg, o, 16, w0, w1, w2, w3, w4, w5, w6, w7)
            st_t8(Pg, o + 8, 16, neg128_sum4(w0), neg128_sum4(w1), neg128_sum4(w2),
                  neg128_sum4(w3), neg128_sum4(w4), neg128_sum4(w5), neg128_sum4(w6),
                  neg128_sum4(w7))
        else:
            st_t8(Pg, o, 8, sx_half(w0, False), sx_half(w1, False), sx_half(w2, False),
                  sx_half(w3, False), sx_half(w4, False), sx_half(w5, False),
                  sx_half(w6, False), sx_half(w7, False))
            st_t8(Pg, o + 64, 8, sx_half(w0, True), sx_half(w1, True), sx_half(w2, True),
                  sx_half(w3, True), sx_half(w4, True), sx_half(w5, True),
                  sx_half(w6, True), sx_half(w7, True))


@njit(cache=True, error_model="numpy", parallel=True)
def _prepare_q8_0(wb, P32, D, vnni):
    for g in prange(P32.shape[0]):
        _decode_group(wb, g, 34, _fetch_q8_0, P32[g], D[g], vnni)


@njit(cache=True, error_model="numpy", parallel=True)
def _prepare_q4_0(wb, P32, D, vnni):
    for g in prange(P32.shape[0]):
        _decode_group(wb, g, 18, _fetch_q4_0, P32[g], D[g], vnni)


@njit(cache=True, error_model="numpy", parallel=True)
def _prepare_q5_0(wb, P32, D, vnni):
    for g in prange(P32.shape[0]):
        _decode_group(wb, g, 22, _fetch_q5_0, P32[g], D[g], vnni)


@njit(cache=True, error_model="numpy", parallel=True)
def _prepare_iq4_nl(wb, P32, D, vnni):
    for g in prange(P32.shape[0]):
        _decode_group(wb, g, 18, _fetch_iq4_nl, P32[g], D[g], vnni)


@njit(cache=True, error_model="numpy", inline="always")
def _dot16(Pg, b, i, x):
    """Lane i of block b for the group's 8 rows and the token x (int16 form)."""
    o = 256 * b + 32 * i
    xo = 32 * b + 4 * i
    return wdot(ld_w16(Pg, o), bc2w(x, xo), ld_w16(Pg, o + 16), bc2w(x, xo + 2))


@njit(cache=True, error_model="numpy", inline="always")
def _dot_vnni(Pg, b, i, x):
    """Lane i of block b for the group's 8 rows and the token x (VNNI form)."""
    o = 512 * b + 64 * i
    return dpbusd(ld_b32(Pg, o + 32), bc4(x, 32 * b + 4 * i), ld_b32(Pg, o))


@njit(cache=True, error_model="numpy", inline="always")
def _u3(Pg, b, i, x0, x1, x2, s0, s1, s2, a, c, e, dot):
    """Lane i of block b for 8 rows x 3 tokens."""
    a = vfma(s0, dot(Pg, b, i, x0), a)
    c = vfma(s1, dot(Pg, b, i, x1), c)
    e = vfma(s2, dot(Pg, b, i, x2), e)
    return a, c, e


@njit(cache=True, error_model="numpy", inline="always")
def _put(out, t, r, nr, h, buf):
    """Row r..r+nr-1 of out[t] from the 8 lanes of h."""
    if nr == 8:
        st_f32(out[t], r, h)
    else:
        st_f32(buf, 0, h)
        for j in range(nr):
            out[t, r + j] = buf[j]


@njit(cache=True, error_model="numpy", inline="always")
def _p_8x3_wide(Pg, Dg, xq, xd, out, r, nr, t, buf, dot):
    """8 rows x tokens t..t+2, all 8 lanes at once: 24 accumulators (for 32 vector
    registers)."""
    nb = xd.shape[1]
    x0, x1, x2 = xq[t], xq[t + 1], xq[t + 2]
    e0, e1, e2 = xd[t], xd[t + 1], xd[t + 2]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = vzero()
    f0 = f1 = f2 = f3 = f4 = f5 = f6 = f7 = vzero()
    for b in range(nb):
        dw = ld_f32(Dg, 8 * b)
        s0 = vmul(dw, e0[b])
        s1 = vmul(dw, e1[b])
        s2 = vmul(dw, e2[b])
        a0, c0, f0 = _u3(Pg, b, 0, x0, x1, x2, s0, s1, s2, a0, c0, f0, dot)
        a1, c1, f1 = _u3(Pg, b, 1, x0, x1, x2, s0, s1, s2, a1, c1, f1, dot)
        a2, c2, f2 = _u3(Pg, b, 2, x0, x1, x2, s0, s1, s2, a2, c2, f2, dot)
        a3, c3, f3 = _u3(Pg, b, 3, x0, x1, x2, s0, s1, s2, a3, c3, f3, dot)
        a4, c4, f4 = _u3(Pg, b, 4, x0, x1, x2, s0, s1, s2, a4, c4, f4, dot)
        a5, c5, f5 = _u3(Pg, b, 5, x0, x1, x2, s0, s1, s2, a5, c5, f5, dot)
        a6, c6, f6 = _u3(Pg, b, 6, x0, x1, x2, s0, s1, s2, a6, c6, f6, dot)
        a7, c7, f7 = _u3(Pg, b, 7, x0, x1, x2, s0, s1, s2, a7, c7, f7, dot)
    _put(out, t, r, nr, hsum8(a0, a1, a2, a3, a4, a5, a6, a7), buf)
    _put(out, t + 1, r, nr, hsum8(c0, c1, c2, c3, c4, c5, c6, c7), buf)
    _put(out, t + 2, r, nr, hsum8(f0, f1, f2, f3, f4, f5, f6, f7), buf)


@njit(cache=True, error_model="numpy", inline="always")
def _u2(Pg, b, i, x0, x1, s0, s1, a, c, dot):
    a = vfma(s0, dot(Pg, b, i, x0), a)
    c = vfma(s1, dot(Pg, b, i, x1), c)
    return a, c


@njit(cache=True, error_model="numpy", inline="always")
def _p_8x2_wide(Pg, Dg, xq, xd, out, r, nr, t, buf, dot):
    """8 rows x tokens t, t+1, all 8 lanes at once: 16 accumulators."""
    nb = xd.shape[1]
    x0, x1 = xq[t], xq[t + 1]
    e0, e1 = xd[t], xd[t + 1]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = vzero()
    for b in range(nb):
        dw = ld_f32(Dg, 8 * b)
        s0 = vmul(dw, e0[b])
        s1 = vmul(dw, e1[b])
        a0, c0 = _u2(Pg, b, 0, x0, x1, s0, s1, a0, c0, dot)
        a1, c1 = _u2(Pg, b, 1, x0, x1, s0, s1, a1, c1, dot)
        a2, c2 = _u2(Pg, b, 2, x0, x1, s0, s1, a2, c2, dot)
        a3, c3 = _u2(Pg, b, 3, x0, x1, s0, s1, a3, c3, dot)
        a4, c4 = _u2(Pg, b, 4, x0, x1, s0, s1, a4, c4, dot)
        a5, c5 = _u2(Pg, b, 5, x0, x1, s0, s1, a5, c5, dot)
        a6, c6 = _u2(Pg, b, 6, x0, x1, s0, s1, a6, c6, dot)
        a7, c7 = _u2(Pg, b, 7, x0, x1, s0, s1, a7, c7, dot)
    _put(out, t, r, nr, hsum8(a0, a1, a2, a3, a4, a5, a6, a7), buf)
    _put(out, t + 1, r, nr, hsum8(c0, c1, c2, c3, c4, c5, c6, c7), buf)


@njit(cache=True, error_model="numpy", inline="always")
def _p_8x2_half(Pg, Dg, xq, xd, out, r, nr, t, buf, S, dot):
    """8 rows x tokens t, t+1 in two passes over the blocks, lanes 0-3 then 4-7 (8
    accumulators, for 16 vector registers); the scale products are made once, into S."""
    nb = xd.shape[1]
    x0, x1 = xq[t], xq[t + 1]
    e0, e1 = xd[t], xd[t + 1]
    for b in range(nb):
        dw = ld_f32(Dg, 8 * b)
        st_f32(S, 16 * b, vmul(dw, e0[b]))
        st_f32(S, 16 * b + 8, vmul(dw, e1[b]))
    for h in range(2):
        a0 = a1 = a2 = a3 = vzero()
        c0 = c1 = c2 = c3 = vzero()
        i = 4 * h
        for b in range(nb):
            s0 = ld_f32(S, 16 * b)
            s1 = ld_f32(S, 16 * b + 8)
            a0, c0 = _u2(Pg, b, i, x0, x1, s0, s1, a0, c0, dot)
            a1, c1 = _u2(Pg, b, i + 1, x0, x1, s0, s1, a1, c1, dot)
            a2, c2 = _u2(Pg, b, i + 2, x0, x1, s0, s1, a2, c2, dot)
            a3, c3 = _u2(Pg, b, i + 3, x0, x1, s0, s1, a3, c3, dot)
        o = 8 + 32 * h
        st_f32(buf, o, a0)
        st_f32(buf, o + 8, a1)
        st_f32(buf, o + 16, a2)
        st_f32(buf, o + 24, a3)
        st_f32(buf, o + 64, c0)
        st_f32(buf, o + 72, c1)
        st_f32(buf, o + 80, c2)
        st_f32(buf, o + 88, c3)
    for u in range(2):
        o = 8 + 64 * u
        _put(out, t + u, r, nr,
             hsum8(ld_f32(buf, o), ld_f32(buf, o + 8), ld_f32(buf, o + 16), ld_f32(buf, o + 24),
                   ld_f32(buf, o + 32), ld_f32(buf, o + 40), ld_f32(buf, o + 48),
                   ld_f32(buf, o + 56)), buf)


@njit(cache=True, error_model="numpy", inline="always")
def _p_8x1(Pg, Dg, xq, xd, out, r, nr, t, buf, dot):
    """8 rows x token t (8 accumulators)."""
    nb = xd.shape[1]
    x0, e0 = xq[t], xd[t]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
    for b in range(nb):
        s = vmul(ld_f32(Dg, 8 * b), e0[b])
        a0 = vfma(s, dot(Pg, b, 0, x0), a0)
        a1 = vfma(s, dot(Pg, b, 1, x0), a1)
        a2 = vfma(s, dot(Pg, b, 2, x0), a2)
        a3 = vfma(s, dot(Pg, b, 3, x0), a3)
        a4 = vfma(s, dot(Pg, b, 4, x0), a4)
        a5 = vfma(s, dot(Pg, b, 5, x0), a5)
        a6 = vfma(s, dot(Pg, b, 6, x0), a6)
        a7 = vfma(s, dot(Pg, b, 7, x0), a7)
    _put(out, t, r, nr, hsum8(a0, a1, a2, a3, a4, a5, a6, a7), buf)


# Tokens t0..t1-1 against one group's 8 rows (r.., nr of them real): tiles of 3 or 2 tokens
# with all lanes at once (for 32 vector registers), or of 2 tokens in two passes over the
# lanes (for 16), then single tokens.

@njit(cache=True, error_model="numpy", inline="always")
def _tiles_3x8(Pg, Dg, xq, xd, out, r, nr, t0, t1, dot, buf, S):
    t = t0
    while t + 3 <= t1:
        _p_8x3_wide(Pg, Dg, xq, xd, out, r, nr, t, buf, dot)
        t += 3
    while t < t1:
        _p_8x1(Pg, Dg, xq, xd, out, r, nr, t, buf, dot)
        t += 1


@njit(cache=True, error_model="numpy", inline="always")
def _tiles_2x8(Pg, Dg, xq, xd, out, r, nr, t0, t1, dot, buf, S):
    t = t0
    while t + 2 <= t1:
        _p_8x2_wide(Pg, Dg, xq, xd, out, r, nr, t, buf, dot)
        t += 2
    if t < t1:
        _p_8x1(Pg, Dg, xq, xd, out, r, nr, t, buf, dot)


@njit(cache=True, error_model="numpy", inline="always")
def _tiles_2x4(Pg, Dg, xq, xd, out, r, nr, t0, t1, dot, buf, S):
    t = t0
    while t + 2 <= t1:
        _p_8x2_half(Pg, Dg, xq, xd, out, r, nr, t, buf, S, dot)
        t += 2
    if t < t1:
        _p_8x1(Pg, Dg, xq, xd, out, r, nr, t, buf, dot)


#: the prepared kernels' tiles, fixed at import (one compiled per kernel): with 32 vector
#: registers (AVX-512VL) 2 tokens x 8 lanes (VNNI) or 3 x 8 (int16), else 2 x 4 twice
_TILES_VNNI = _tiles_2x8 if _WIDE else _tiles_2x4
_TILES16 = _tiles_3x8 if _WIDE else _tiles_2x4
#: tokens a tile of the int16 kernel
_TOKENS16 = 3 if _WIDE else 2


@njit(cache=True, error_model="numpy", inline="always")
def _block_tiles(Pb, Db, g0, xq, xd, out, t0, t1, chunk, tiles, dot):
    """Groups g0.. (their prepared rows Pb, Db) against tokens t0..t1-1, chunk by chunk, each
    chunk's activations staying in L1 while the block's groups (in L2) pass over them and
    fill their output lines in turn."""
    rows = out.shape[1]
    nb = xd.shape[1]
    buf = np.empty(200, np.float32)
    S = np.empty(16 * nb, np.float32)
    for c0 in range(t0, t1, chunk):
        c1 = min(t1, c0 + chunk)
        for i in range(Pb.shape[0]):
            r = 8 * (g0 + i)
            tiles(Pb[i], Db[i], xq, xd, out, r, min(8, rows - r), c0, c1, dot, buf, S)


# A block kernel for each form (inlined: a call of its own costs 5-10%).

@njit(cache=True, error_model="numpy", inline="always")
def _block16(Pb, Db, g0, xq, xd, out, t0, t1, chunk):
    _block_tiles(Pb, Db, g0, xq, xd, out, t0, t1, chunk, _TILES16, _dot16)


@njit(cache=True, error_model="numpy", inline="always")
def _block_vnni(Pb, Db, g0, xq, xd, out, t0, t1, chunk):
    _block_tiles(Pb, Db, g0, xq, xd, out, t0, t1, chunk, _TILES_VNNI, _dot_vnni)


@njit(cache=True, error_model="numpy", inline="always")
def _prepared_rows(P, D, xq, xd, out, chunk, gblock, block):
    """P (groups, nb * 512 bytes) and D float32 (groups, nb * 8): the prepared weights; xq
    (n_tok, k) and xd float32 (n_tok, nb): the Q8_0 activations in the form `block` reads; out
    float32 (n_tok, rows). One parallel loop over (block of gblock groups of 8 rows, chunk of
    tokens) jobs, block-major: a thread's jobs share blocks mostly, whose weights stay in its
    L2."""
    n_tok = xq.shape[0]
    groups = P.shape[0]
    chunks = (n_tok + chunk - 1) // chunk
    blocks = (groups + gblock - 1) // gblock
    for job in prange(chunks * blocks):
        t0 = job % chunks * chunk
        g0 = job // chunks * gblock
        g1 = min(groups, g0 + gblock)
        block(P[g0:g1], D[g0:g1], g0, xq, xd, out, t0, min(n_tok, t0 + chunk), chunk)


@njit(cache=True, error_model="numpy", parallel=True)
def _mm_prepared16(P, D, x16, xd, out, chunk, gblock):
    _prepared_rows(P, D, x16, xd, out, chunk, gblock, _block16)


@njit(cache=True, error_model="numpy", parallel=True)
def _mm_prepared_vnni(P, D, xu, xd, out, chunk, gblock):
    _prepared_rows(P, D, xu, xd, out, chunk, gblock, _block_vnni)


@njit(cache=True, error_model="numpy", inline="always")
def _view16(p):
    return p.view(np.int16)


@njit(cache=True, error_model="numpy", inline="always")
def _view8(p):
    return p


@njit(cache=True, error_model="numpy", inline="always")
def _fused_rows(wb, bsize, fetch, xq, xd, out, chunk, gblock, vnni, block, view):
    """`prepare` and the prepared kernel in one: one parallel loop over blocks of gblock
    groups of 8 rows, each decoded into the job's own buffer (bytes, viewed by `view` for
    `block`), then multiplied by all the tokens, chunk by chunk."""
    n_tok = xq.shape[0]
    rows = wb.shape[0]
    nb = xd.shape[1]
    groups = (rows + 7) // 8
    for blk in prange((groups + gblock - 1) // gblock):
        g0 = blk * gblock
        ng = min(groups, g0 + gblock) - g0
        Pb = np.empty((ng, nb * 512), np.uint8)
        Db = np.empty((ng, nb * 8), np.float32)
        P32 = Pb.view(np.int32)
        for i in range(ng):
            _decode_group(wb, g0 + i, bsize, fetch, P32[i], Db[i], vnni)
        block(view(Pb), Db, g0, xq, xd, out, 0, n_tok, chunk)


@njit(cache=True, error_model="numpy", parallel=True)
def _fused16_q8_0(wb, x16, xd, out, chunk, gblock):
    _fused_rows(wb, 34, _fetch_q8_0, x16, xd, out, chunk, gblock, False, _block16,
                _view16)


@njit(cache=True, error_model="numpy", parallel=True)
def _fused_vnni_q8_0(wb, xu, xd, out, chunk, gblock):
    _fused_rows(wb, 34, _fetch_q8_0, xu, xd, out, chunk, gblock, True, _block_vnni,
                _view8)


@njit(cache=True, error_model="numpy", parallel=True)
def _fused16_q4_0(wb, x16, xd, out, chunk, gblock):
    _fused_rows(wb, 18, _fetch_q4_0, x16, xd, out, chunk, gblock, False, _block16,
                _view16)


@njit(cache=True, error_model="numpy", parallel=True)
def _fused_vnni_q4_0(wb, xu, xd, out, chunk, gblock):
    _fused_rows(wb, 18, _fetch_q4_0, xu, xd, out, chunk, gblock, True, _block_vnni,
                _view8)


@njit(cache=True, error_model="numpy", parallel=True)
def _fused16_q5_0(wb, x16, xd, out, chunk, gblock):
    _fused_rows(wb, 22, _fetch_q5_0, x16, xd, out, chunk, gblock, False, _block16,
                _view16)


@njit(cache=True, error_model="numpy", parallel=True)
def _fused_vnni_q5_0(wb, xu, xd, out, chunk, gblock):
    _fused_rows(wb, 22, _fetch_q5_0, xu, xd, out, chunk, gblock, True, _block_vnni,
                _view8)


@njit(cache=True, error_model="numpy", parallel=True)
def _fused16_iq4_nl(wb, x16, xd, out, chunk, gblock):
    _fused_rows(wb, 18, _fetch_iq4_nl, x16, xd, out, chunk, gblock, False, _block16,
                _view16)


@njit(cache=True, error_model="numpy", parallel=True)
def _fused_vnni_iq4_nl(wb, xu, xd, out, chunk, gblock):
    _fused_rows(wb, 18, _fetch_iq4_nl, xu, xd, out, chunk, gblock, True, _block_vnni,
                _view8)
