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
- Q8_0 / Q4_0 / Q5_0 (`tinyBLAS_Q0_AVX`): always (any rows, any number of blocks).
The weight type's other conditions come from ggml itself (k a multiple of the block size).
Other kquant types (Q4_1, Q5_1, the K-quants) never go through tinyBLAS on this build.

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
  decoded to signed bytes q - 8 / q - 16, as tinyBLAS's `load` does);
then `hsum`: (hi128 + lo128), then (l0 + l2) + (l1 + l3) of that (movehl / movehdup).
The activations are ggml's from_float bytes (kquant.matmul.activations): F16 / BF16 rounding,
the AVX2 quantize_row_q8_0.

The port
--------
One parallel loop (prange) over jobs = (chunk of TOKEN_CHUNK tokens, group of 4 weight rows),
chunk-major, so one fork and join per call; a row's result does not depend on its job, so
nothing depends on the thread count either. Floats: 4 rows x 3 tokens a tile (12
accumulators, tinyBLAS<8>'s RM = 4, RN = 3; 4 x 2 and 4 x 1 for the last tokens). Q0 types:
4 rows x 2 tokens (8 accumulators, as gemm4xN<2>), single elements for the last rows and
token; a job widens its rows' fp16 scales once and, for chunks of PREDECODE_TOKENS tokens or
more, decodes their blocks once into signed bytes and their magnitudes (vpsignb's first
operand) instead of in every tile. None of these choices changes a bit
(tests/test_matmul_tinyblas.py varies them). The vector operations are LLVM IR intrinsics
below (vpsignb, vpmaddubsw, vpmaddwd, llvm.fma.v8f32, vcvtph2ps), in kquant.matmul.simd's
style but kept in this file so that Numba's cache (which tracks the defining file) stays
right. Speed (tools/bench_tinyblas.py, 2048 x 2048 by 512 tokens, 1 and 2 threads): 0.9-1.4x
ggml's own mul_mat, F32 / F16 / BF16 about equal, Q8_0 0.9x, Q4_0 1.1x, Q5_0 1.4x.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.datamodel import models
from numba.extending import intrinsic, register_model

from ..codecs import vectorizing
from ..codecs.bits import HAS_F16C
from .activations import qtype_of, quantize_rows, vec_dot_type
from .prims import load_f16

T = GGMLQuantizationType

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
Q0_TYPES = (T.Q8_0, T.Q4_0, T.Q5_0)
#: the weight types llamafile_sgemm handles on an AVX2 + FMA + F16C build (IQ4_NL aside)
TYPES = FLOAT_TYPES + Q0_TYPES
_BLOCK = {T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2),
          T.Q8_0: (32, 34), T.Q4_0: (32, 18), T.Q5_0: (32, 22)}

#: tokens per chunk: all row groups pass over one chunk's activations before the next
TOKEN_CHUNK = 64
#: Q0 types: chunk lengths from which a job decodes its rows' blocks to bytes once (below:
#: in every tile)
PREDECODE_TOKENS = {T.Q8_0: 32, T.Q4_0: 4, T.Q5_0: 4}


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
    Q8_0 / Q4_0 / Q5_0, k a whole number of blocks. False for every other type."""
    t = _qtype(qtype)
    if t is None or n_tok < 2 or rows < 1 or k < 1:
        return False
    if t in FLOAT_TYPES:
        return k % 8 == 0 and rows % 4 == 0
    return k % 32 == 0


def matmul(wb: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    """x @ W.T as ggml's mul_mat computes it through tinyBLAS: wb uint8 (rows, row_bytes),
    the weight rows as stored in GGUF (F32 / F16 / BF16 as raw bytes too; other dtypes are
    read as bytes), x float32 (n_tok, k). Returns float32 (n_tok, rows). Raises ValueError
    where `applies` is false (ggml would take another path, with another order)."""
    t = _qtype(qtype)
    if t is None:
        raise ValueError(f"tinyBLAS does not handle {qtype!r} on AVX2; it takes "
                         + ", ".join(t.name for t in TYPES))
    wb = np.asarray(wb)
    x = np.asarray(x)
    if wb.ndim != 2 or x.ndim != 2:
        raise ValueError("weights must be (rows, row_bytes) and activations (n_tok, k)")
    if x.dtype != np.float32:
        raise ValueError(f"activations must be float32, got {x.dtype}")
    wb = np.ascontiguousarray(wb).view(np.uint8)
    block, size = _BLOCK[t]
    rows, n_tok = wb.shape[0], x.shape[0]
    if wb.shape[1] % size:
        raise ValueError(f"{t.name}: a row of {wb.shape[1]} bytes is not whole blocks")
    k = wb.shape[1] // size * block
    if x.shape[1] != k:
        raise ValueError(f"activations of {x.shape[1]} values against rows of {k}")
    if not applies(t, rows, k, n_tok):
        raise ValueError(f"llamafile_sgemm does not take {t.name} ({rows} x {k}) by "
                         f"{n_tok} tokens; ggml uses its vec_dot path there")
    x = np.ascontiguousarray(x)
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
            kernel = _mm_q8_0 if t == T.Q8_0 else _mm_q4_0 if t == T.Q4_0 else _mm_q5_0
            kernel(wb, act.qs, act.d, out, TOKEN_CHUNK, PREDECODE_TOKENS[t])
    return out


# ---- 256-bit vector values and the few AVX2 operations tinyBLAS uses -------------------------

_FEATURES = llvm_binding.get_host_cpu_features().flatten().split(",")
_HAS_AVX2 = "+avx2" in _FEATURES

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
def st_b32(typingctx, arr, off, v):
    """Store 32 bytes into a 1-D int8 / uint8 array from index off."""
    if not (_arr1(arr, (types.int8, types.uint8)) and isinstance(off, types.Integer)
            and v == B32):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], B32.llvm)
        builder.store(args[2], p, align=1)
        return context.get_dummy_value()
    return types.none(arr, off, v), codegen


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


# A weight row's block b as (|q|, q) for updot_abs: straight from the GGUF blocks (one fetch
# per type), or from rows decoded beforehand (_fetch_pre: magnitudes and values stored).

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
def _fetch_pre(wa, w, b):
    return ld_b32(wa, 32 * b), ld_b32(w, 32 * b)


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
def _q0_rows(wb, aq, ad, out, chunk, pre_tokens, bsize, fetch):
    """wb uint8 (rows, row_bytes) of one Q0 type (blocks of bsize bytes, read by fetch); aq
    int8 (n_tok, k) and ad float32 (n_tok, k / 32): the Q8_0 activations; out float32
    (n_tok, rows). One parallel loop over (token chunk, row group) jobs, chunk-major; a job
    widens its 4 rows' scales and, for chunks of at least pre_tokens tokens, decodes their
    blocks into its own small buffers before its tiles."""
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
        pre = t1 - t0 >= pre_tokens
        d = np.empty((4, nb), np.float32)
        qa = np.empty((4 if pre else 0, k), np.uint8)
        q = np.empty((4 if pre else 0, k), np.int8)
        for i in range(nr):
            wr, di = wb[r + i], d[i]
            for b in range(nb):
                di[b] = load_f16(wr, bsize * b)
            if pre:
                qai, qi = qa[i], q[i]
                for b in range(nb):
                    wa, w = fetch(wr, wr, b)
                    st_b32(qai, 32 * b, wa)
                    st_b32(qi, 32 * b, w)
        if pre:
            _q_group(qa, q, 0, d, 0, aq, ad, out, r, nr, t0, t1, _fetch_pre)
        else:
            _q_group(wb, wb, r, d, 0, aq, ad, out, r, nr, t0, t1, fetch)


@njit(cache=True, error_model="numpy", parallel=True)
def _mm_q8_0(wb, aq, ad, out, chunk, pre_tokens):
    _q0_rows(wb, aq, ad, out, chunk, pre_tokens, 34, _fetch_q8_0)


@njit(cache=True, error_model="numpy", parallel=True)
def _mm_q4_0(wb, aq, ad, out, chunk, pre_tokens):
    _q0_rows(wb, aq, ad, out, chunk, pre_tokens, 18, _fetch_q4_0)


@njit(cache=True, error_model="numpy", parallel=True)
def _mm_q5_0(wb, aq, ad, out, chunk, pre_tokens):
    _q0_rows(wb, aq, ad, out, chunk, pre_tokens, 22, _fetch_q5_0)
