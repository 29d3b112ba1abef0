"""llama.cpp's "repacked" CPU matmul of Q4_K, Q4_0 and IQ4_NL weights (AVX2 build), bit for bit.

On x86 with AVX2, llama.cpp puts every 2-D Q4_K / Q4_0 / IQ4_NL weight of a MUL_MAT whose row
count is a multiple of 8 into its CPU_REPACK buffer (ggml-cpu/repack.cpp,
`ggml_repack_get_optimal_repack_type` -> q4_K_8x8_q8_K, q4_0_8x8_q8_0, iq4_nl_8x8_q8_0): 8
rows are interleaved into one block_q4_Kx8 (d[8], dmin[8], scales[96], qs[1024]) /
block_q4_0x8 (d[8], qs[128], nibbles xor 0x88) / block_iq4_nlx8 (d[8], qs[128], nibbles as
stored) per 256 / 32 columns (`make_block_q4_Kx8`, `make_block_q4_0x8`,
`make_block_iq4_nlx8`), and `tensor_traits<...>::forward_mul_mat` multiplies them:

- activations: rows in groups of 4 (the first n_tok - n_tok % 4) are quantized by
  `ggml_quantize_mat_q8_K_4x8` / `ggml_quantize_mat_q8_0_4x8` (interleaved 4-row blocks),
  the n_tok % 4 last rows by the ordinary from_float (`quantize_row_q8_K` = _ref,
  the AVX2 `quantize_row_q8_0`). The 4x8 Q8_0 quantizer computes the same numbers as
  quantize_row_q8_0. The 4x8 Q8_K one differs from quantize_row_q8_K_ref in one case: the
  sign of the scale. _ref takes the first value of largest magnitude (iscale = -127 / max);
  4x8 takes -127 / amax when any value equals +amax, else +127 / amax. So where -amax comes
  before +amax, the quants and d have the other sign. The rounding (nearest-even in both)
  and d = 1 / iscale are the same.
- weight columns are cut into chunks aligned to 8 rows, shared among threads. Activation
  rows are not split: the first n_tok - n_tok % 4 go to `ggml_gemm_*_8x8` and the rest to
  `ggml_gemv_*_8x8`, one call per row. No element depends on the thread count.

Per output element (token t, weight row c) the float operations of the AVX2 kernels are
(every int exact; `fma` is one rounding, _mm256_fmadd_ps):
  Q4_K gemm: for each super-block b, for each pair sb of 32-value sub-blocks (4 per block):
      acc  = fma(float(sc[2sb] dot_2sb + sc[2sb+1] dot_2sb+1), d_c * a.d, acc)
      accm = fma(float(mn[2sb] bsum_2sb + mn[2sb+1] bsum_2sb+1), dmin_c * a.d, accm)
    result acc - accm.
  Q4_K gemv: the same with one fma per super-block (the ints summed over its 8 sub-blocks).
  Q4_0 gemm and gemv: acc = fma(float(sum (q - 8) a), d_c * a.d, acc), one per 32-block.
  IQ4_NL gemm and gemv: the same with kvalues_iq4nl[q] for q - 8 (ggml's AVX2 kernels are
      one template, gemm/gemv_q4_b32_8x8_q8_0_lut_avx, with the type's table in vpshufb).
The lanes and shuffles of ggml's kernels only decide which lane holds which column, so the
kernels here compute the same ints their own way (per token: 8 weight rows in 8 int32 /
float lanes, 32-byte nibble loads against 8-byte activation broadcasts, `vpmaddubsw` +
`vpmaddwd` with the scales, `vphaddd`), and keep that float order per element.
Q4_0 uses unsigned nibbles q with the -8 taken as -8 * sum(a) (exact); IQ4_NL its table's
signed bytes, decoded once by `prepare`, with ggml's sign trick (|w| times sign(a, w)), each
vpmaddubsw's int16 pairs widened to int32 before they are added (they reach 2 * 127 * 127).

`prepare(wb, qtype)` repacks once (ggml's bytes: `repack_bytes`) and unpacks what the kernels
read; `matmul_prepared(p, x)` runs the product; `matmul(wb, qtype, x)` does both. The
kernels run `prange` over groups of 8 weight rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.datamodel import models
from numba.extending import intrinsic, register_model

from ..codecs.bits import round_nearest
from .activations import quantize_rows

T = GGMLQuantizationType
F32 = np.float32
I32 = np.int32

_HAS_AVX2 = "+avx2" in llvm_binding.get_host_cpu_features().flatten().split(",")

#: the lane order of the kernels' 8 columns (vphaddd of two 4-column halves); an involution
P = np.array([0, 1, 4, 5, 2, 3, 6, 7])

QK_K = 256
Q4_K_BYTES = 144
Q4_0_BYTES = 18
Q4_KX8_BYTES = 1152      # block_q4_Kx8: d[8] f16, dmin[8] f16, scales[96], qs[1024]
Q4_0X8_BYTES = 144       # block_q4_0x8: d[8] f16, qs[128]
Q8_KX4_BYTES = 1168      # block_q8_Kx4: d[4] f32, qs[1024], bsums[64] i16
Q8_0X4_BYTES = 136       # block_q8_0x4: d[4] f16, qs[128]
IQ4_NL_BYTES = 18

#: the weight types repacked on AVX2
TYPES = (T.Q4_K, T.Q4_0, T.IQ4_NL)
#: ggml-common.h's kvalues_iq4nl
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                          113], np.int8)


def _qtype(qtype) -> T:
    """A type given as GGMLQuantizationType, its name or its number."""
    if isinstance(qtype, T):
        return qtype
    return T[qtype.upper()] if isinstance(qtype, str) else T(int(qtype))


def applies(qtype, rows: int, k: int) -> bool:
    """Whether llama.cpp's AVX2 CPU backend repacks this weight (a 2-D MUL_MAT weight):
    Q4_K, Q4_0 or IQ4_NL with ne[1] = rows a multiple of 8
    (`ggml_repack_get_optimal_repack_type`; repack_*_to_*_8_bl also wants ne[0] = k % 8 == 0,
    which whole blocks always are)."""
    try:
        qtype = _qtype(qtype)
    except (KeyError, ValueError):
        return False
    if qtype not in TYPES:
        return False
    block = QK_K if qtype == T.Q4_K else 32
    return rows > 0 and rows % 8 == 0 and k > 0 and k % block == 0 and k % 8 == 0


# ---- 256-bit vector values (own types: independent of kquant.matmul.simd) ----------------

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32 = ir.FloatType()


class _Vec(types.Type):
    def __init__(self, kind: str, bits: int, lanes: int):
        self.kind, self.bits, self.lanes = kind, bits, lanes
        super().__init__(name=f"RepackVec<{kind}{bits}x{lanes}>")

    @property
    def llvm(self):
        return ir.VectorType(_f32 if self.kind == "f" else ir.IntType(self.bits), self.lanes)


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm)


B32 = _Vec("i", 8, 32)
W16 = _Vec("i", 16, 16)
D8 = _Vec("i", 32, 8)
F8 = _Vec("f", 32, 8)


def _ptr(context, builder, arrty, arr, off, offty, elty):
    a = context.make_array(arrty)(context, builder, value=arr)
    p = builder.gep(a.data, [context.cast(builder, off, offty, types.intp)])
    return builder.bitcast(p, elty.as_pointer())


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(_i32, vty.count), [0] * vty.count))


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(mask)), list(mask)))


def _x86(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _arr(t, bits=None, kind=types.Integer):
    return (isinstance(t, types.Array) and t.ndim == 1 and isinstance(t.dtype, kind)
            and (bits is None or t.dtype.bitwidth == bits))


@intrinsic
def ld32(typingctx, arr, off):
    """32 bytes of a 1-D 8-bit array from index off."""
    if not (_arr(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                                 B32.llvm), align=1)
    return B32(arr, off), codegen


@intrinsic
def bc8(typingctx, arr, off):
    """The 8 bytes at index off of a 1-D 8-bit array, repeated 4 times (vpbroadcastq)."""
    if not (_arr(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        q = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              _i64), align=1)
        return builder.bitcast(_splat(builder, q, ir.VectorType(_i64, 4)), B32.llvm)
    return B32(arr, off), codegen


@intrinsic
def bc2(typingctx, arr, off):
    """The two int16 at index off of a 1-D int16 array, repeated 8 times (vpbroadcastd)."""
    if not (_arr(arr, 16) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        d = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              _i32), align=2)
        return builder.bitcast(_splat(builder, d, D8.llvm), W16.llvm)
    return W16(arr, off), codegen


@intrinsic
def ldz16(typingctx, arr, off):
    """16 unsigned bytes of a 1-D uint8 array from index off, widened to int16 (vpmovzxbw)."""
    if not (_arr(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              ir.VectorType(_i8, 16)), align=1)
        return builder.zext(v, W16.llvm)
    return W16(arr, off), codegen


@intrinsic
def ldf(typingctx, arr, off):
    """8 float32 of a 1-D float32 array from index off."""
    if not (_arr(arr, kind=types.Float) and arr.dtype == types.float32
            and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                                 F8.llvm), align=4)
    return F8(arr, off), codegen


@intrinsic
def st_unperm(typingctx, arr, off, acc, accm):
    """arr[off + P[i]] = (acc - accm)[i]: the kernels' lanes back in column order."""
    if not (_arr(arr, kind=types.Float) and arr.dtype == types.float32
            and isinstance(off, types.Integer) and acc == F8 and accm == F8):
        return None

    def codegen(context, builder, sig, args):
        v = builder.fsub(args[2], args[3])
        v = _shuffle(builder, v, v, [int(i) for i in P])
        builder.store(v, _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              F8.llvm), align=4)
        return context.get_dummy_value()
    return types.none(arr, off, acc, accm), codegen


@intrinsic
def lo4(typingctx, v):
    if v != B32:
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], ir.Constant(B32.llvm, [15] * 32))
    return B32(v), codegen


@intrinsic
def hi4(typingctx, v):
    if v != B32:
        return None

    def codegen(context, builder, sig, args):
        return builder.lshr(args[0], ir.Constant(B32.llvm, [4] * 32))
    return B32(v), codegen


def _maddubs(builder, u, s):
    if _HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", W16.llvm, [u, s])
    wide = ir.VectorType(_i32, 16)
    ev, od = list(range(0, 32, 2)), list(range(1, 32, 2))
    p = builder.add(builder.mul(builder.zext(_shuffle(builder, u, u, ev), wide),
                                builder.sext(_shuffle(builder, s, s, ev), wide)),
                    builder.mul(builder.zext(_shuffle(builder, u, u, od), wide),
                                builder.sext(_shuffle(builder, s, s, od), wide)))
    lo, hi = ir.Constant(wide, [-32768] * 16), ir.Constant(wide, [32767] * 16)
    p = builder.select(builder.icmp_signed("<", p, lo), lo, p)
    p = builder.select(builder.icmp_signed(">", p, hi), hi, p)
    return builder.trunc(p, W16.llvm)


def _madd(builder, a, b):
    if _HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.pmadd.wd", D8.llvm, [a, b])
    ev, od = list(range(0, 16, 2)), list(range(1, 16, 2))
    w = D8.llvm
    return builder.add(
        builder.mul(builder.sext(_shuffle(builder, a, a, ev), w),
                    builder.sext(_shuffle(builder, b, b, ev), w)),
        builder.mul(builder.sext(_shuffle(builder, a, a, od), w),
                    builder.sext(_shuffle(builder, b, b, od), w)))


@intrinsic
def mubs(typingctx, u, s):
    """Unsigned bytes u times signed bytes s, pairs summed to int16 (vpmaddubsw)."""
    if not (u == B32 and s == B32):
        return None

    def codegen(context, builder, sig, args):
        return _maddubs(builder, args[0], args[1])
    return W16(u, s), codegen


@intrinsic
def mwd(typingctx, a, b):
    """int16 a times int16 b, pairs summed to int32 (vpmaddwd)."""
    if not (a == W16 and b == W16):
        return None

    def codegen(context, builder, sig, args):
        return _madd(builder, args[0], args[1])
    return D8(a, b), codegen


@intrinsic
def pairs(typingctx, a):
    """int16 pairs summed to int32 (vpmaddwd with ones)."""
    if a != W16:
        return None

    def codegen(context, builder, sig, args):
        return _madd(builder, args[0], ir.Constant(W16.llvm, [1] * 16))
    return D8(a), codegen


def _psign(builder, a, b):
    """_mm256_sign_epi8(a, b): a where b > 0, -a where b < 0, 0 where b == 0."""
    if _HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.psign.b", B32.llvm, [a, b])
    zero = ir.Constant(B32.llvm, [0] * 32)
    neg = builder.select(builder.icmp_signed("<", b, zero), builder.sub(zero, a), a)
    return builder.select(builder.icmp_signed("==", b, zero), zero, neg)


@intrinsic
def sdp(typingctx, w, x):
    """Signed bytes w times signed bytes x, summed in 4s to int32 (ggml's
    mul_sum_i8_pairs_acc_int32x8 without the accumulator: vpsignb x2, vpmaddubsw, vpmaddwd
    with ones)."""
    if not (w == B32 and x == B32):
        return None

    def codegen(context, builder, sig, args):
        a, b = args
        p = _maddubs(builder, _psign(builder, a, a), _psign(builder, b, a))
        return _madd(builder, p, ir.Constant(W16.llvm, [1] * 16))
    return D8(w, x), codegen


@intrinsic
def hadd(typingctx, a, b):
    """vphaddd: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]."""
    if not (a == D8 and b == D8):
        return None

    def codegen(context, builder, sig, args):
        x, y = args
        if _HAS_AVX2:
            return _x86(builder, "llvm.x86.avx2.phadd.d", D8.llvm, [x, y])
        ev = _shuffle(builder, x, y, [0, 2, 8, 10, 4, 6, 12, 14])
        od = _shuffle(builder, x, y, [1, 3, 9, 11, 5, 7, 13, 15])
        return builder.add(ev, od)
    return D8(a, b), codegen


@intrinsic
def add16(typingctx, a, b):
    if not (a == W16 and b == W16):
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return W16(a, b), codegen


@intrinsic
def add32(typingctx, a, b):
    if not (a == D8 and b == D8):
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return D8(a, b), codegen


@intrinsic
def sub32s(typingctx, a, s):
    """a - s in every lane (s an integer)."""
    if not (a == D8 and isinstance(s, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[1], sig.args[1], types.int32)
        return builder.sub(args[0], _splat(builder, v, D8.llvm))
    return D8(a, s), codegen


@intrinsic
def zero16(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(W16.llvm, [0] * 16)
    return W16(), codegen


@intrinsic
def zero32(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(D8.llvm, [0] * 8)
    return D8(), codegen


@intrinsic
def zerof(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(F8.llvm, [0.0] * 8)
    return F8(), codegen


@intrinsic
def mulfs(typingctx, v, s):
    """Float lanes v times the float32 s (one rounding each)."""
    if not (v == F8 and s == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], _splat(builder, args[1], F8.llvm))
    return F8(v, s), codegen


@intrinsic
def fmacc(typingctx, i, scale, acc):
    """fma(float(i), scale, acc), one rounding per lane (_mm256_fmadd_ps of cvtepi32_ps)."""
    if not (i == D8 and scale == F8 and acc == F8):
        return None

    def codegen(context, builder, sig, args):
        f = builder.sitofp(args[0], F8.llvm)
        return _x86(builder, "llvm.fma.v8f32", F8.llvm, [f, args[1], args[2]])
    return F8(i, scale, acc), codegen


# ---- the kernels ---------------------------------------------------------------------------
# Q4_K prepared arrays, per group of 8 weight rows g and super-block b:
#   qs  uint8 (groups, nb * 1024): block_q4_Kx8.qs (64-byte groups h of each 256 bytes sb:
#       32 bytes rows 0-3, 32 bytes rows 4-7, 8 bytes a row: 8 low nibbles of sub-block 2sb,
#       8 high nibbles of 2sb+1)
#   sc  uint8 (groups, nb * 320): per sb 80 bytes: scales of 2sb for rows 0-3 (each x4), 4-7,
#       of 2sb+1 for rows 0-3, 4-7, then the mins of 2sb, 2sb+1 in pairs, rows in P order
#   d, dm float32 (groups, nb * 8): d and dmin in P order
# Activations (plain rows): aq int8 (n_tok, k), ad float32 (n_tok, nb), b32 int16 (n_tok,
# k / 32) sums of 32 quants.


@njit(cache=True, error_model="numpy", inline="always")
def _q4k_sb(qs, wo, sc, so, aq, ao):
    """sc[2sb] dot_2sb + sc[2sb+1] dot_2sb+1 of one activation row for 8 weight rows (int32
    lanes, P order). wo, so, ao: offsets of the sb's weights, scales and activations."""
    a0 = zero16()
    a1 = zero16()
    a2 = zero16()
    a3 = zero16()
    for h in range(4):
        w0 = ld32(qs, wo + 64 * h)
        w1 = ld32(qs, wo + 64 * h + 32)
        xl = bc8(aq, ao + 8 * h)
        xh = bc8(aq, ao + 32 + 8 * h)
        a0 = add16(a0, mubs(lo4(w0), xl))
        a1 = add16(a1, mubs(lo4(w1), xl))
        a2 = add16(a2, mubs(hi4(w0), xh))
        a3 = add16(a3, mubs(hi4(w1), xh))
    x0 = add32(mwd(a0, ldz16(sc, so)), mwd(a2, ldz16(sc, so + 32)))
    x1 = add32(mwd(a1, ldz16(sc, so + 16)), mwd(a3, ldz16(sc, so + 48)))
    return hadd(x0, x1)


@njit(cache=True, error_model="numpy", inline="always")
def _q4k_gemm_row(qs, sc, d, dm, aq, ad, b32, out, o):
    """ggml_gemm_q4_K_8x8_q8_K's float order for one activation row, 8 weight rows."""
    acc = zerof()
    accm = zerof()
    for b in range(ad.shape[0]):
        ds = mulfs(ldf(d, 8 * b), ad[b])
        ms = mulfs(ldf(dm, 8 * b), ad[b])
        for sb in range(4):
            x = _q4k_sb(qs, 1024 * b + 256 * sb, sc, 320 * b + 80 * sb, aq, 256 * b + 64 * sb)
            m = mwd(ldz16(sc, 320 * b + 80 * sb + 64), bc2(b32, 8 * b + 2 * sb))
            acc = fmacc(x, ds, acc)
            accm = fmacc(m, ms, accm)
    st_unperm(out, o, acc, accm)


@njit(cache=True, error_model="numpy", inline="always")
def _q4k_gemv_row(qs, sc, d, dm, aq, ad, b32, out, o):
    """ggml_gemv_q4_K_8x8_q8_K's float order: one fma per super-block."""
    acc = zerof()
    accm = zerof()
    for b in range(ad.shape[0]):
        x = zero32()
        m = zero32()
        for sb in range(4):
            x = add32(x, _q4k_sb(qs, 1024 * b + 256 * sb, sc, 320 * b + 80 * sb, aq,
                                 256 * b + 64 * sb))
            m = add32(m, mwd(ldz16(sc, 320 * b + 80 * sb + 64), bc2(b32, 8 * b + 2 * sb)))
        acc = fmacc(x, mulfs(ldf(d, 8 * b), ad[b]), acc)
        accm = fmacc(m, mulfs(ldf(dm, 8 * b), ad[b]), accm)
    st_unperm(out, o, acc, accm)


@njit(cache=True, error_model="numpy", parallel=True)
def _q4k_mm(qs, sc, d, dm, aq, ad, b32, n_gemm, out):
    """Tokens [0, n_gemm) in gemm order, the rest in gemv order; weight row groups in
    parallel."""
    n_tok = aq.shape[0]
    for g in prange(qs.shape[0]):
        qg, sg, dg, mg = qs[g], sc[g], d[g], dm[g]
        for t in range(n_gemm):
            _q4k_gemm_row(qg, sg, dg, mg, aq[t], ad[t], b32[t], out[t], 8 * g)
        for t in range(n_gemm, n_tok):
            _q4k_gemv_row(qg, sg, dg, mg, aq[t], ad[t], b32[t], out[t], 8 * g)


# Q4_0 prepared arrays: qs uint8 (groups, nb * 128), block_q4_0x8.qs with the nibbles as
# stored in Q4_0 (no xor): 64-byte halves g, 32 bytes rows 0-3 and 32 bytes rows 4-7, 8 bytes
# a row (low nibbles values 8g.., high nibbles 16 + 8g..); d float32 (groups, nb * 8) in P
# order. Activations: aq int8 (n_tok, k), ad float32 (n_tok, nb), asum int32 (n_tok, nb).


@njit(cache=True, error_model="numpy", inline="always")
def _q4_0_row(qs, d, aq, ad, asum, out, o):
    acc = zerof()
    for b in range(ad.shape[0]):
        wo = 128 * b
        ao = 32 * b
        w0 = ld32(qs, wo)
        w1 = ld32(qs, wo + 32)
        w2 = ld32(qs, wo + 64)
        w3 = ld32(qs, wo + 96)
        x0 = bc8(aq, ao)
        x1 = bc8(aq, ao + 8)
        x2 = bc8(aq, ao + 16)
        x3 = bc8(aq, ao + 24)
        p0 = add16(add16(mubs(lo4(w0), x0), mubs(hi4(w0), x2)),
                   add16(mubs(lo4(w2), x1), mubs(hi4(w2), x3)))
        p1 = add16(add16(mubs(lo4(w1), x0), mubs(hi4(w1), x2)),
                   add16(mubs(lo4(w3), x1), mubs(hi4(w3), x3)))
        x = sub32s(hadd(pairs(p0), pairs(p1)), I32(8 * asum[b]))
        acc = fmacc(x, mulfs(ldf(d, 8 * b), ad[b]), acc)
    st_unperm(out, o, acc, zerof())


@njit(cache=True, error_model="numpy", parallel=True)
def _q4_0_mm(qs, d, aq, ad, asum, out):
    """ggml_gemm/gemv_q4_0_8x8_q8_0 (the same float order); weight row groups in parallel."""
    for g in prange(qs.shape[0]):
        qg, dg = qs[g], d[g]
        for t in range(aq.shape[0]):
            _q4_0_row(qg, dg, aq[t], ad[t], asum[t], out[t], 8 * g)


# IQ4_NL prepared arrays: lo, hi int8 (groups, nb * 128), the table values of the low and high
# nibbles of block_iq4_nlx8.qs (laid out as Q4_0's qs above); d float32 (groups, nb * 8) in P
# order. Activations as Q4_0's (asum unused).


@njit(cache=True, error_model="numpy", inline="always")
def _iq4_nl_row(lo, hi, d, aq, ad, out, o):
    acc = zerof()
    for b in range(ad.shape[0]):
        wo = 128 * b
        ao = 32 * b
        x0 = bc8(aq, ao)
        x1 = bc8(aq, ao + 8)
        x2 = bc8(aq, ao + 16)
        x3 = bc8(aq, ao + 24)
        p0 = add32(add32(sdp(ld32(lo, wo), x0), sdp(ld32(hi, wo), x2)),
                   add32(sdp(ld32(lo, wo + 64), x1), sdp(ld32(hi, wo + 64), x3)))
        p1 = add32(add32(sdp(ld32(lo, wo + 32), x0), sdp(ld32(hi, wo + 32), x2)),
                   add32(sdp(ld32(lo, wo + 96), x1), sdp(ld32(hi, wo + 96), x3)))
        acc = fmacc(hadd(p0, p1), mulfs(ldf(d, 8 * b), ad[b]), acc)
    st_unperm(out, o, acc, zerof())


@njit(cache=True, error_model="numpy", parallel=True)
def _iq4_nl_mm(lo, hi, d, aq, ad, out):
    """ggml_gemm/gemv_iq4_nl_8x8_q8_0 (the same float order); weight row groups in parallel."""
    for g in prange(lo.shape[0]):
        lg, hg, dg = lo[g], hi[g], d[g]
        for t in range(aq.shape[0]):
            _iq4_nl_row(lg, hg, dg, aq[t], ad[t], out[t], 8 * g)


# ---- activations -------------------------------------------------------------------------

_F127 = F32(127.0)
_ONE = F32(1.0)
_ZERO = F32(0.0)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_q8_k_4x8(x, qs, d, bsums):
    """ggml_quantize_mat_q8_K_4x8's numbers (AVX2), one row at a time in plain layout."""
    n_tok, k = x.shape
    for t in prange(n_tok):
        for b in range(k // QK_K):
            o = QK_K * b
            amax = _ZERO
            for j in range(QK_K):
                amax = max(amax, abs(x[t, o + j]))
            pos = False
            for j in range(QK_K):
                if x[t, o + j] == amax:
                    pos = True
            iscale = _ZERO
            if amax != _ZERO:
                iscale = -_F127 / amax if pos else _F127 / amax
            d[t, b] = _ONE / iscale if amax != _ZERO else _ZERO
            for j in range(QK_K):
                v = round_nearest(x[t, o + j] * iscale)
                v = min(max(v, F32(-128.0)), F32(127.0))
                qs[t, o + j] = np.int8(v)
            for j in range(16):
                s = I32(0)
                for i in range(16):
                    s += I32(qs[t, o + 16 * j + i])
                bsums[t, 16 * b + j] = np.int16(s)


@dataclass
class QuantizedActivations:
    """What the kernels read: plain rows (n_tok, k) of quants, scales per block and sums."""
    qtype: GGMLQuantizationType     # Q8_K or Q8_0
    n_gemm: int                     # rows quantized (and multiplied) the 4-row way
    qs: np.ndarray                  # int8 (n_tok, k)
    d: np.ndarray                   # float32 (n_tok, nb)
    sums: np.ndarray                # Q8_K: int16 bsums (n_tok, k/16); Q8_0: unused (0, 0)
    aux: np.ndarray                 # sums of 32 quants: Q8_K int16 (n_tok, k/32),
    #                                 Q8_0 int32 (n_tok, nb)


def quantize_activations(x: np.ndarray, qtype) -> QuantizedActivations:
    """x float32 (n_tok, k) quantized as forward_mul_mat does for a repacked `qtype` weight:
    rows [0, n_tok - n_tok % 4) by ggml_quantize_mat_*_4x8, the rest by from_float."""
    qtype = _qtype(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tok, k = x.shape
    n_gemm = n_tok - n_tok % 4
    if qtype in (T.Q4_0, T.IQ4_NL):
        act = quantize_rows(x, T.Q8_0)   # quantize_mat_q8_0_4x8 computes the same numbers
        asum = act.qs.reshape(n_tok, k // 32, 32).sum(axis=2, dtype=np.int32)
        return QuantizedActivations(T.Q8_0, n_gemm, act.qs, act.d,
                                    np.zeros((0, 0), np.int16), asum)
    if qtype != T.Q4_K:
        raise ValueError(f"no repacked kernel for {qtype.name}")
    qs = np.empty((n_tok, k), np.int8)
    d = np.empty((n_tok, k // QK_K), np.float32)
    bsums = np.empty((n_tok, k // 16), np.int16)
    if n_gemm:
        _quantize_q8_k_4x8(x[:n_gemm], qs[:n_gemm], d[:n_gemm], bsums[:n_gemm])
    if n_gemm < n_tok:
        act = quantize_rows(x[n_gemm:], T.Q8_K)
        qs[n_gemm:], d[n_gemm:], bsums[n_gemm:] = act.qs, act.d, act.sums
    b32 = (bsums[:, 0::2].astype(np.int32) + bsums[:, 1::2]).astype(np.int16)
    return QuantizedActivations(T.Q8_K, n_gemm, qs, d, bsums, b32)


def q8_k_4x8_bytes(qs: np.ndarray, d: np.ndarray, bsums: np.ndarray) -> np.ndarray:
    """4 plain Q8_K rows (qs (4, k), d (4, nb), bsums (4, k/16)) as ggml's block_q8_Kx4 bytes:
    d[4], qs interleaved 8 values a row, bsums[16 k + 4 r + i] = row r's sum 4 k + i."""
    nb = d.shape[1]
    out = np.empty((nb, Q8_KX4_BYTES), np.uint8)
    out[:, :16] = np.ascontiguousarray(d.T.astype(np.float32)).view(np.uint8)
    q = qs.reshape(4, nb, 32, 8).transpose(1, 2, 0, 3).reshape(nb, 1024)
    out[:, 16:1040] = q.view(np.uint8)
    s = bsums.reshape(4, nb, 4, 4).transpose(1, 2, 0, 3).reshape(nb, 64).astype(np.int16)
    out[:, 1040:] = np.ascontiguousarray(s).view(np.uint8)
    return out.reshape(-1)


def q8_0_4x8_bytes(qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """4 plain Q8_0 rows (qs (4, k), d (4, nb) float32 = fp16 values) as ggml's
    block_q8_0x4 bytes: d[4] fp16, qs interleaved 8 values a row."""
    nb = d.shape[1]
    out = np.empty((nb, Q8_0X4_BYTES), np.uint8)
    out[:, :8] = np.ascontiguousarray(d.T.astype(np.float16)).view(np.uint8)
    out[:, 8:] = qs.reshape(4, nb, 4, 8).transpose(1, 2, 0, 3).reshape(nb, 128).view(np.uint8)
    return out.reshape(-1)


# ---- repacking -------------------------------------------------------------------------------

def _check(wb: np.ndarray, qtype) -> tuple[T, int, int]:
    qtype = _qtype(qtype)
    wb = np.asarray(wb)
    if wb.dtype != np.uint8 or wb.ndim != 2:
        raise ValueError("weights must be uint8 (rows, row_bytes) in ggml's block layout")
    size, block = ((Q4_K_BYTES, QK_K) if qtype == T.Q4_K else
                   (IQ4_NL_BYTES, 32) if qtype == T.IQ4_NL else (Q4_0_BYTES, 32))
    if qtype not in TYPES:
        raise ValueError(f"no repacked kernel for {qtype.name}")
    rows, nbytes = wb.shape
    if nbytes % size or rows % 8:
        raise ValueError(f"{qtype.name}: {rows} rows of {nbytes} bytes cannot be repacked "
                         f"(rows must be a multiple of 8, rows whole {size}-byte blocks)")
    return qtype, rows, nbytes // size * block


def repack_bytes(wb: np.ndarray, qtype) -> np.ndarray:
    """ggml's repacked tensor data (repack_q4_K_to_q4_K_8_bl / repack_q4_0_to_q4_0_8_bl /
    repack_iq4_nl_to_iq4_nl_8_bl with interleave 8): uint8 (rows / 8, nb * 1152 or nb * 144)."""
    qtype, rows, k = _check(wb, qtype)
    g = rows // 8
    if qtype in (T.Q4_0, T.IQ4_NL):
        nb = k // 32
        blk = wb.reshape(g, 8, nb, Q4_0_BYTES).transpose(0, 2, 1, 3)   # (g, nb, row, 18)
        out = np.empty((g, nb, Q4_0X8_BYTES), np.uint8)
        out[..., :16] = blk[..., :2].reshape(g, nb, 16)
        q = blk[..., 2:].reshape(g, nb, 8, 2, 8).transpose(0, 1, 3, 2, 4)
        if qtype == T.Q4_0:
            q = q ^ np.uint8(0x88)
        out[..., 16:] = q.reshape(g, nb, 128)
        return out.reshape(g, nb * Q4_0X8_BYTES)
    nb = k // QK_K
    blk = wb.reshape(g, 8, nb, Q4_K_BYTES).transpose(0, 2, 1, 3)      # (g, nb, row, 144)
    out = np.empty((g, nb, Q4_KX8_BYTES), np.uint8)
    out[..., 0:16] = blk[..., 0:2].reshape(g, nb, 16)
    out[..., 16:32] = blk[..., 2:4].reshape(g, nb, 16)
    sc, mn = _k4_scales(blk[..., 4:16])                                 # (g, nb, row, 8)
    out[..., 32:128] = _pack_scales8(sc, mn)
    out[..., 128:] = blk[..., 16:].reshape(g, nb, 8, 16, 8).transpose(0, 1, 3, 2, 4).reshape(
        g, nb, 1024)
    return out.reshape(g, nb * Q4_KX8_BYTES)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes (..., 12) -> 6-bit scales and mins (..., 8) as uint8."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _pack_scales8(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """make_block_q4_Kx8's 96 scale bytes from the 8 rows' scales and mins (..., row, sub):
    12 bytes per sub-block t, the 8 rows' (scale, min) of t in Q4_K's own 12-byte packing."""
    s = np.swapaxes(sc, -1, -2)   # (..., sub, row)
    m = np.swapaxes(mn, -1, -2)
    out = np.empty(s.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = (s[..., 0:4] & 63) + ((s[..., 4:8] & 48) << 2)
    out[..., 4:8] = (m[..., 0:4] & 63) + ((m[..., 4:8] & 48) << 2)
    out[..., 8:12] = (s[..., 4:8] & 15) + ((m[..., 4:8] & 15) << 4)
    return out.reshape(s.shape[:-2] + (96,))


@dataclass
class Prepared:
    """A repacked weight, as the kernels read it (see the comments above the kernels)."""
    qtype: GGMLQuantizationType
    rows: int
    k: int
    qs: np.ndarray
    d: np.ndarray
    dmin: np.ndarray | None = None
    sc: np.ndarray | None = None
    hi: np.ndarray | None = None     # IQ4_NL: the high nibbles' values (qs: the low ones')

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.qs, self.d, self.dmin, self.sc, self.hi)
                   if a is not None)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def prepare(wb: np.ndarray, qtype) -> Prepared:
    """Repack a weight once (ggml's repack_bytes, then unpacked for the kernels)."""
    qtype, rows, k = _check(wb, qtype)
    packed = repack_bytes(wb, qtype)
    g = rows // 8
    if qtype == T.IQ4_NL:
        nb = k // 32
        p = packed.reshape(g, nb, Q4_0X8_BYTES)
        d = _f16(p[..., :16])[..., P]
        q = p[..., 16:].reshape(g, nb * 128)
        return Prepared(qtype, rows, k, np.ascontiguousarray(KVALUES_IQ4NL[q & 15]),
                        np.ascontiguousarray(d.reshape(g, nb * 8)),
                        hi=np.ascontiguousarray(KVALUES_IQ4NL[q >> 4]))
    if qtype == T.Q4_0:
        nb = k // 32
        p = packed.reshape(g, nb, Q4_0X8_BYTES)
        d = _f16(p[..., :16])[..., P]
        qs = p[..., 16:] ^ np.uint8(0x88)
        return Prepared(qtype, rows, k, np.ascontiguousarray(qs.reshape(g, nb * 128)),
                        np.ascontiguousarray(d.reshape(g, nb * 8)))
    nb = k // QK_K
    p = packed.reshape(g, nb, Q4_KX8_BYTES)
    d = _f16(p[..., 0:16])[..., P]
    dmin = _f16(p[..., 16:32])[..., P]
    sc, mn = _k4_scales(p[..., 32:128].reshape(g, nb, 8, 12))        # (g, nb, sub, row)
    rep = np.repeat(np.arange(4), 4)
    lo, hi = sc[:, :, 0::2], sc[:, :, 1::2]                          # (g, nb, sb, row)
    ex = np.empty((g, nb, 4, 80), np.uint8)
    ex[..., 0:16] = lo[..., rep]
    ex[..., 16:32] = lo[..., 4 + rep]
    ex[..., 32:48] = hi[..., rep]
    ex[..., 48:64] = hi[..., 4 + rep]
    ex[..., 64:80] = np.stack([mn[:, :, 0::2][..., P], mn[:, :, 1::2][..., P]], -1).reshape(
        g, nb, 4, 16)
    return Prepared(qtype, rows, k, np.ascontiguousarray(p[..., 128:].reshape(g, nb * 1024)),
                    np.ascontiguousarray(d.reshape(g, nb * 8)),
                    np.ascontiguousarray(dmin.reshape(g, nb * 8)),
                    np.ascontiguousarray(ex.reshape(g, nb * 320)))


def matmul_prepared(p: Prepared, x: np.ndarray,
                    act: QuantizedActivations | None = None) -> np.ndarray:
    """x float32 (n_tok, k) times the prepared weight: float32 (n_tok, rows), ggml's bits.
    The caller sets Numba's thread count (the result does not depend on it)."""
    if act is None:
        x = np.asarray(x)
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != p.k:
            raise ValueError(f"activations must be float32 (n_tok, {p.k})")
        act = quantize_activations(x, p.qtype)
    out = np.empty((act.qs.shape[0], p.rows), np.float32)
    if p.qtype == T.Q4_K:
        _q4k_mm(p.qs, p.sc, p.d, p.dmin, act.qs, act.d, act.aux, act.n_gemm, out)
    elif p.qtype == T.IQ4_NL:
        _iq4_nl_mm(p.qs, p.hi, p.d, act.qs, act.d, out)
    else:
        _q4_0_mm(p.qs, p.d, act.qs, act.d, act.aux, out)
    return out


def matmul(wb: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    """x float32 (n_tok, k) times the weight wb (uint8 (rows, row_bytes), ggml's ordinary
    blocks as stored in GGUF), as llama.cpp's repacked CPU path computes it."""
    return matmul_prepared(prepare(wb, qtype), x)
