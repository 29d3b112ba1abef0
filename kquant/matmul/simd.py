"""256-bit integer vectors for Numba kernels: the few operations ggml's AVX2 dot products use.

LLVM's auto-vectorizers, left to themselves, do not find ggml's scheme for these dot
products (kquant.matmul.cpu's module docstring has the measurements): they vectorise each
16- or 32-value reduction and then add it up horizontally (5 to 7 shuffles and adds a
sub-block), or vectorise the loop over blocks instead. ggml keeps 8 int32 lanes per
super-block and 8 float lanes per row, and adds across lanes once. These intrinsics let a
Numba kernel say the same thing: each is a few lines of plain LLVM vector IR (loads of
<32 x i8>, `and`/`lshr`/`sext`/`zext`, shufflevector, vector add/mul), and LLVM's x86 backend
picks the AVX2 instructions for them. Two products are spelled as LLVM's own x86 intrinsics
where the host has AVX2, because that is what they are:

- `maddubs(u, s)`: u8 x s8 pairs summed to saturated int16 (`vpmaddubsw`);
- `madd(a, b)`: int16 x int16 pairs summed to int32 (`vpmaddwd`).

Without AVX2 (other x86, ARM) the same two are emitted as generic IR with the same results
(exact: the kernels keep every int16 sum in range, as ggml's do), for LLVM to lower as it can.

Types (Numba values held in vector registers): I8x16, I8x32 (bytes; signedness is the
operation's), I16x16, I32x8, F32x8.

Float lanes follow ggml's rounding exactly, for the kernels to give its bits: `fma` and
`fmaf8` are fused (`llvm.fma`, one rounding: vfmadd231ps, as _mm256_fmadd_ps), and the
horizontal sums keep ggml's orders (`hsumf`: hsum_float_8; `hsum4`: a __m128's movehl +
movehdup sum; `hsum_hadd`: GGML_F32x8_REDUCE's two vhaddps).
"""
from __future__ import annotations

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.datamodel import models
from numba.extending import intrinsic, register_model

from ..codecs.bits import HAS_F16C

_FEATURES = llvm_binding.get_host_cpu_features().flatten().split(",")
HAS_AVX2 = "+avx2" in _FEATURES

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32 = ir.FloatType()


class Vec(types.Type):
    def __init__(self, kind: str, bits: int, lanes: int):
        self.kind, self.bits, self.lanes = kind, bits, lanes
        super().__init__(name=f"Vec<{kind}{bits}x{lanes}>")

    @property
    def llvm(self):
        elem = _f32 if self.kind == "f" else ir.IntType(self.bits)
        return ir.VectorType(elem, self.lanes)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm)


I8x16 = Vec("i", 8, 16)
I8x32 = Vec("i", 8, 32)
I16x16 = Vec("i", 16, 16)
I32x8 = Vec("i", 32, 8)
F32x8 = Vec("f", 32, 8)


# ---- IR helpers --------------------------------------------------------------------------

def _splat(builder, value, vty: ir.VectorType):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(_i32, vty.count), [0] * vty.count))


def _int(context, builder, value, ty, width):
    """A Numba integer argument as an LLVM integer of `width` bits (truncated or extended)."""
    v = context.cast(builder, value, ty, types.int64)
    t = ir.IntType(width)
    return builder.trunc(v, t) if width < 64 else v


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(mask)), list(mask)))


def _vec_ptr(context, builder, arrty, arr, off, offty, vty):
    a = context.make_array(arrty)(context, builder, value=arr)
    p = builder.gep(a.data, [context.cast(builder, off, offty, types.intp)])
    return builder.bitcast(p, vty.as_pointer())


def _x86(builder, name, ret, args):
    """A call of the LLVM intrinsic `name` (x86 ones, llvm.fma.*)."""
    mod = builder.module
    fn = cgutils.get_or_insert_function(mod, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _fma(builder, a, b, c):
    """a * b + c, one rounding, scalar or vector (`llvm.fma.*`: vfmadd with FMA3)."""
    if isinstance(a.type, ir.VectorType):
        name = f"llvm.fma.v{a.type.count}f32"
        return _x86(builder, name, a.type, [a, b, c])
    return builder.fma(a, b, c)


def _is_array(t, bits=None):
    return (isinstance(t, types.Array) and t.ndim == 1 and isinstance(t.dtype, types.Integer)
            and (bits is None or t.dtype.bitwidth == bits))


# ---- loads and constructors -------------------------------------------------------------

@intrinsic
def load32(typingctx, arr, off):
    """32 bytes of a 1-D uint8/int8 array from index `off` (unaligned)."""
    if not (_is_array(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I8x32.llvm)
        return builder.load(p, align=1)
    return I8x32(arr, off), codegen


@intrinsic
def load16(typingctx, arr, off):
    """16 bytes of a 1-D uint8/int8 array from index `off`."""
    if not (_is_array(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I8x16.llvm)
        return builder.load(p, align=1)
    return I8x16(arr, off), codegen


@intrinsic
def load_i16(typingctx, arr, off):
    """16 int16 of a 1-D int16 array from index `off`."""
    if not (_is_array(arr, 16) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I16x16.llvm)
        return builder.load(p, align=1)
    return I16x16(arr, off), codegen


def _from_words(words, bits: int, out: Vec):
    """The intrinsic's result: the integer arguments `words` as little-endian `bits`-bit
    words, the first lowest, reinterpreted as the byte vector `out` (ggml's _mm*_set_epi*
    with the arguments reversed); None (no match) unless all are integers."""
    if not all(isinstance(t, types.Integer) for t in words):
        return None

    def codegen(context, builder, sig, args):
        v = ir.Constant(ir.VectorType(ir.IntType(bits), len(args)), ir.Undefined)
        for i, (x, t) in enumerate(zip(args, sig.args)):
            v = builder.insert_element(v, _int(context, builder, x, t, bits), ir.Constant(_i32, i))
        return builder.bitcast(v, out.llvm)
    return out(*words), codegen


@intrinsic
def from_u32x4(typingctx, a, b, c, d):
    """16 bytes from four little-endian 32-bit words (ggml's _mm_set_epi32(d, c, b, a))."""
    return _from_words((a, b, c, d), 32, I8x16)


@intrinsic
def u32at(typingctx, arr, off):
    """The little-endian uint32 at byte `off` of a uint8 array, one unaligned load (four byte
    loads OR-ed together are not always merged: LLVM's SLP vectorizer may widen them into
    vector shifts instead)."""
    if not (_is_array(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                     ir.VectorType(_i32, 1))
        return builder.extract_element(builder.load(p, align=1), ir.Constant(_i32, 0))
    return types.uint32(arr, off), codegen


@intrinsic
def zero32(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(I32x8.llvm, [0] * 8)
    return I32x8(), codegen


@intrinsic
def zerof(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(F32x8.llvm, [0.0] * 8)
    return F32x8(), codegen


@intrinsic
def bitmask32(typingctx, u):
    """ggml's bytes_from_bits_32: byte j = 0xFF if bit j of the 32-bit u is set, else 0
    (broadcast, byte shuffle, or with a per-byte mask, compare: 4 instructions)."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        u = _int(context, builder, args[0], sig.args[0], 32)
        v = _splat(builder, u, ir.VectorType(_i32, 8))
        b = builder.bitcast(v, I8x32.llvm)
        b = _shuffle(builder, b, b, [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8)
        m = ir.Constant(I8x32.llvm, [0xFF ^ (1 << (j % 8)) for j in range(32)])
        b = builder.or_(b, m)
        return builder.sext(builder.icmp_signed("==", b, ir.Constant(I8x32.llvm, [-1] * 32)),
                            I8x32.llvm)
    return I8x32(u), codegen


# ---- byte vectors --------------------------------------------------------------------------

def _binop8(op):
    def impl(typingctx, a, b):
        if a not in (I8x32, I8x16):
            return None
        if b == a:
            def codegen(context, builder, sig, args):
                return getattr(builder, op)(args[0], args[1])
            return a(a, b), codegen
        if isinstance(b, types.Integer):
            def codegen(context, builder, sig, args):
                s = _splat(builder, _int(context, builder, args[1], sig.args[1], 8),
                           sig.args[0].llvm)
                return getattr(builder, op)(args[0], s)
            return a(a, b), codegen
        return None
    impl.__name__ = op
    return intrinsic(impl)


# Byte-wise operations on I8x32 or I8x16, with a vector or a scalar (for every byte).
and8 = _binop8("and_")
or8 = _binop8("or_")
add8 = _binop8("add")
sub8 = _binop8("sub")
shr8 = _binop8("lshr")      # logical shift right of each byte (x86: vpsrlw + vpand)
shl8 = _binop8("shl")


@intrinsic
def andnot8(typingctx, a, b):
    """~a & b (`vpandn`)."""
    if not (a == I8x32 and (b == I8x32 or isinstance(b, types.Integer))):
        return None

    def codegen(context, builder, sig, args):
        bv = args[1] if sig.args[1] == I8x32 else _splat(
            builder, _int(context, builder, args[1], sig.args[1], 8), I8x32.llvm)
        return builder.and_(builder.not_(args[0]), bv)
    return I8x32(a, b), codegen


@intrinsic
def nibbles32(typingctx, arr, off):
    """ggml's bytes_from_nibbles_32: 16 bytes at `off` -> their low nibbles, then their high."""
    if not (_is_array(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I8x16.llvm)
        v = builder.load(p, align=1)
        hi = builder.lshr(v, ir.Constant(I8x16.llvm, [4] * 16))
        both = _shuffle(builder, v, hi, range(32))
        return builder.and_(both, ir.Constant(I8x32.llvm, [15] * 32))
    return I8x32(arr, off), codegen


@intrinsic
def zext16(typingctx, v):
    """16 unsigned bytes -> int16."""
    if v != I8x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(args[0], I16x16.llvm)
    return I16x16(v), codegen


@intrinsic
def sext16(typingctx, v):
    """16 signed bytes -> int16."""
    if v != I8x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.sext(args[0], I16x16.llvm)
    return I16x16(v), codegen


# ---- products ------------------------------------------------------------------------------

def _even_odd(builder, v, n):
    even = _shuffle(builder, v, v, range(0, 2 * n, 2))
    return even, _shuffle(builder, v, v, range(1, 2 * n, 2))


def _maddubs(builder, u, s):
    if HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", I16x16.llvm, [u, s])
    wide = ir.VectorType(_i32, 16)
    ue, uo = _even_odd(builder, u, 16)
    se, so = _even_odd(builder, s, 16)
    p = builder.add(builder.mul(builder.zext(ue, wide), builder.sext(se, wide)),
                    builder.mul(builder.zext(uo, wide), builder.sext(so, wide)))
    lo = ir.Constant(wide, [-32768] * 16)
    hi = ir.Constant(wide, [32767] * 16)
    p = builder.select(builder.icmp_signed("<", p, lo), lo, p)
    p = builder.select(builder.icmp_signed(">", p, hi), hi, p)
    return builder.trunc(p, I16x16.llvm)


def _madd(builder, a, b):
    if HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.pmadd.wd", I32x8.llvm, [a, b])
    ae, ao = _even_odd(builder, a, 8)
    be, bo = _even_odd(builder, b, 8)
    w = I32x8.llvm
    return builder.add(builder.mul(builder.sext(ae, w), builder.sext(be, w)),
                       builder.mul(builder.sext(ao, w), builder.sext(bo, w)))


@intrinsic
def maddubs(typingctx, u, s):
    """Unsigned bytes u times signed bytes s, adjacent pairs summed (saturating) to int16."""
    if not (u == I8x32 and s == I8x32):
        return None

    def codegen(context, builder, sig, args):
        return _maddubs(builder, args[0], args[1])
    return I16x16(u, s), codegen


@intrinsic
def madd(typingctx, a, b):
    """int16 a times int16 b, adjacent pairs summed to int32."""
    if not (a == I16x16 and b == I16x16):
        return None

    def codegen(context, builder, sig, args):
        return _madd(builder, args[0], args[1])
    return I32x8(a, b), codegen


def _psign(builder, a, b):
    """ggml's _mm256_sign_epi8(a, b): a where b > 0, -a where b < 0, 0 where b == 0."""
    if HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.psign.b", I8x32.llvm, [a, b])
    zero = ir.Constant(I8x32.llvm, [0] * 32)
    neg = builder.select(builder.icmp_signed("<", b, zero), builder.sub(zero, a), a)
    return builder.select(builder.icmp_signed("==", b, zero), zero, neg)


@intrinsic
def dot8(typingctx, a, b):
    """Signed bytes a times signed bytes b, summed in 4s to int32 (8 lanes): ggml's
    mul_sum_i8_pairs, maddubs(sign(a, a), sign(b, a)) then madd with ones (a = -128 gives
    ggml's saturated result too)."""
    if not (a == I8x32 and b == I8x32):
        return None

    def codegen(context, builder, sig, args):
        x, y = args
        p = _maddubs(builder, _psign(builder, x, x), _psign(builder, y, x))
        return _madd(builder, p, ir.Constant(I16x16.llvm, [1] * 16))
    return I32x8(a, b), codegen


@intrinsic
def dotu8_off(typingctx, u, s, off):
    """(u - off) . s for unsigned bytes u, signed bytes s and a constant offset, summed in 4s
    to int32: maddubs(u, s) - maddubs(off, s), then madd with ones (exact while both int16
    pair sums stay in range: u <= 31, off <= 16 here)."""
    if not (u == I8x32 and s == I8x32 and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        o = _splat(builder, _int(context, builder, args[2], sig.args[2], 8), I8x32.llvm)
        p = builder.sub(_maddubs(builder, args[0], args[1]), _maddubs(builder, o, args[1]))
        return _madd(builder, p, ir.Constant(I16x16.llvm, [1] * 16))
    return I32x8(u, s, off), codegen


@intrinsic
def dotu8(typingctx, u, s):
    """Unsigned bytes u times signed bytes s, summed in 4s to int32 (ggml's
    mul_sum_us8_pairs: maddubs, then madd with ones)."""
    if not (u == I8x32 and s == I8x32):
        return None

    def codegen(context, builder, sig, args):
        p = _maddubs(builder, args[0], args[1])
        return _madd(builder, p, ir.Constant(I16x16.llvm, [1] * 16))
    return I32x8(u, s), codegen


@intrinsic
def sub16(typingctx, a, b):
    if not (a == I16x16 and b == I16x16):
        return None

    def codegen(context, builder, sig, args):
        return builder.sub(args[0], args[1])
    return I16x16(a, b), codegen


@intrinsic
def lane16(typingctx, v, k):
    """Every lane = lane k of v (k a constant once LLVM unrolls the loop around it)."""
    if not (v == I16x16 and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        e = builder.extract_element(args[0], _int(context, builder, args[1], sig.args[1], 32))
        return _splat(builder, e, I16x16.llvm)
    return I16x16(v, k), codegen


@intrinsic
def lane16x2(typingctx, v, a, b):
    """Lanes 0-7 = lane a of v, lanes 8-15 = lane b (two 16-value sub-blocks' scales against
    one 32-value maddubs result)."""
    if not (v == I16x16 and isinstance(a, types.Integer) and isinstance(b, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ea = builder.extract_element(args[0], _int(context, builder, args[1], sig.args[1], 32))
        eb = builder.extract_element(args[0], _int(context, builder, args[2], sig.args[2], 32))
        h = ir.VectorType(_i16, 8)
        return _shuffle(builder, _splat(builder, ea, h), _splat(builder, eb, h), range(16))
    return I16x16(v, a, b), codegen


@intrinsic
def halves16(typingctx, v, h):
    """Both 128-bit halves = lanes 8h..8h+7 of v (h constant after unrolling), so that a
    later lane16x2(result, a, 8 + b) picks within each half: one in-lane vpshufb, as ggml's
    duplicated `scales[j]` vectors."""
    if not (v == I16x16 and isinstance(h, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        base = builder.mul(_int(context, builder, args[1], sig.args[1], 32), ir.Constant(_i32, 8))
        out = ir.Constant(I16x16.llvm, ir.Undefined)
        for i in range(8):
            e = builder.extract_element(args[0], builder.add(base, ir.Constant(_i32, i)))
            out = builder.insert_element(out, e, ir.Constant(_i32, i))
            out = builder.insert_element(out, e, ir.Constant(_i32, i + 8))
        return out
    return I16x16(v, h), codegen


@intrinsic
def pairs16(typingctx, v, start):
    """Lane i = lane start + i // 2 of v: [v[s], v[s], v[s+1], v[s+1], ...]."""
    if not (v == I16x16 and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s = _int(context, builder, args[1], sig.args[1], 32)
        out = ir.Constant(I16x16.llvm, ir.Undefined)
        for i in range(8):
            e = builder.extract_element(args[0], builder.add(s, ir.Constant(_i32, i)))
            out = builder.insert_element(out, e, ir.Constant(_i32, 2 * i))
            out = builder.insert_element(out, e, ir.Constant(_i32, 2 * i + 1))
        return out
    return I16x16(v, start), codegen


# ---- int32 and float lanes -------------------------------------------------------------------

@intrinsic
def add32(typingctx, a, b):
    if not (a == I32x8 and b == I32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return I32x8(a, b), codegen


@intrinsic
def sub32(typingctx, a, b):
    if not (a == I32x8 and b == I32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.sub(args[0], args[1])
    return I32x8(a, b), codegen


@intrinsic
def shl32(typingctx, a, n):
    if not (a == I32x8 and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s = _splat(builder, _int(context, builder, args[1], sig.args[1], 32), I32x8.llvm)
        return builder.shl(args[0], s)
    return I32x8(a, n), codegen


@intrinsic
def fma(typingctx, d, v, acc):
    """acc + d * float(v) with one rounding: int32 lanes converted to float, scaled by d (a
    float32, or float lanes) and added to the float lanes acc, fused (`llvm.fma`, one
    vfmadd231ps): ggml's _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(v), acc), bit for bit."""
    if not (d in (types.float32, F32x8) and v == I32x8 and acc == F32x8):
        return None

    def codegen(context, builder, sig, args):
        f = builder.sitofp(args[1], F32x8.llvm)
        dv = args[0] if sig.args[0] == F32x8 else _splat(builder, args[0], F32x8.llvm)
        return _fma(builder, dv, f, args[2])
    return F32x8(d, v, acc), codegen


@intrinsic
def fmaf8(typingctx, a, b, acc):
    """a * b + acc on float lanes, one rounding (_mm256_fmadd_ps(a, b, acc))."""
    if not (a == F32x8 and b == F32x8 and acc == F32x8):
        return None

    def codegen(context, builder, sig, args):
        return _fma(builder, args[0], args[1], args[2])
    return F32x8(a, b, acc), codegen


@intrinsic
def hadd32(typingctx, v):
    """Adjacent int32 lanes summed: lanes 0-3 = v0+v1, v2+v3, v4+v5, v6+v7, and lanes 4-7
    the same again (ggml's 4-lane Q4_K min products, from 8-lane ones)."""
    if v != I32x8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        return builder.add(_shuffle(builder, v, v, [0, 2, 4, 6] * 2),
                           _shuffle(builder, v, v, [1, 3, 5, 7] * 2))
    return I32x8(v), codegen


@intrinsic
def hsum32(typingctx, v):
    """Sum of the 8 int32 lanes (exact; ggml's hsum_i32_8 / _mm_hadd_epi32)."""
    if v != I32x8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        s = builder.add(_shuffle(builder, v, v, range(4)), _shuffle(builder, v, v, range(4, 8)))
        s = builder.add(s, _shuffle(builder, s, s, [2, 3, 2, 3]))
        return builder.add(builder.extract_element(s, ir.Constant(_i32, 0)),
                           builder.extract_element(s, ir.Constant(_i32, 1)))
    return types.int32(v), codegen


@intrinsic
def loadf(typingctx, arr, off):
    """8 float32 of a 1-D float32 array from index `off`."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.float32
            and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], F32x8.llvm)
        return builder.load(p, align=4)
    return F32x8(arr, off), codegen


@intrinsic
def f16x8(typingctx, arr, off, stride):
    """The fp16 values at bytes off, off + stride, ... off + 7 stride of a uint8 array, as 8
    float32 lanes: the scales of 8 consecutive blocks (8 16-bit loads, then one vcvtph2ps
    with F16C; without it, kquant's integer conversion in vector form)."""
    if not (_is_array(arr, 8) and isinstance(off, types.Integer)
            and isinstance(stride, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, value=args[0])
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        stride = context.cast(builder, args[2], sig.args[2], types.intp)
        v = ir.Constant(ir.VectorType(_i16, 8), ir.Undefined)
        for i in range(8):
            pos = builder.add(off, builder.mul(stride, ir.Constant(off.type, i)))
            p = builder.bitcast(builder.gep(a.data, [pos]), _i16.as_pointer())
            v = builder.insert_element(v, builder.load(p, align=1), ir.Constant(_i32, i))
        return _half8_to_f32(builder, v)
    return F32x8(arr, off, stride), codegen


@intrinsic
def f16at(typingctx, arr, off):
    """The fp16 value at byte off of a uint8 array, as float32, converted from a 64-bit
    vector load (vcvtph2ps xmm, m64: no false dependency, no gather; 8 bytes are read, so
    off + 8 must be inside the array)."""
    if not (_is_array(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                     ir.VectorType(_i16, 4))
        h = builder.load(p, align=1)
        if HAS_F16C:
            f = builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 4)),
                              ir.VectorType(_f32, 4))
        else:
            h8 = _shuffle(builder, h, h, [0, 1, 2, 3, 0, 1, 2, 3])
            f = _half8_to_f32(builder, h8)
        return builder.extract_element(f, ir.Constant(_i32, 0))
    return types.float32(arr, off), codegen


@intrinsic
def f16x2(typingctx, arr, off):
    """The two fp16 values at bytes off and off + 2 (a K-quant's d and dmin) as two float32:
    one 32-bit load into a vector register and vcvtph2ps with F16C (kquant's integer
    conversion, on 2 lanes, without)."""
    if not (_is_array(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _i32)
        w = builder.load(p, align=1)
        v = builder.insert_element(ir.Constant(ir.VectorType(_i32, 4), [0] * 4), w,
                                   ir.Constant(_i32, 0))
        if HAS_F16C:
            h = builder.bitcast(v, ir.VectorType(ir.HalfType(), 8))
            f = builder.fpext(_shuffle(builder, h, h, range(4)), ir.VectorType(_f32, 4))
        else:
            u = builder.zext(builder.bitcast(v, ir.VectorType(_i16, 8)), ir.VectorType(_i32, 8))
            u = _shuffle(builder, u, u, range(4))
            c = lambda x: ir.Constant(ir.VectorType(_i32, 4), [x] * 4)  # noqa: E731
            inf_nan = builder.mul(builder.lshr(builder.add(builder.and_(u, c(0x7C00)), c(0x400)),
                                               c(15)), c(0x70000000))
            bits = builder.or_(builder.shl(builder.and_(u, c(0x8000)), c(16)),
                               builder.add(builder.shl(builder.and_(u, c(0x7FFF)), c(13)), inf_nan))
            f = builder.fmul(builder.bitcast(bits, ir.VectorType(_f32, 4)),
                             ir.Constant(ir.VectorType(_f32, 4), [2.0 ** 112] * 4))
        tup = context.get_value_type(sig.return_type)
        out = ir.Constant(tup, ir.Undefined)
        out = builder.insert_value(out, builder.extract_element(f, ir.Constant(_i32, 0)), 0)
        return builder.insert_value(out, builder.extract_element(f, ir.Constant(_i32, 1)), 1)
    return types.UniTuple(types.float32, 2)(arr, off), codegen


@intrinsic
def mulf(typingctx, a, b):
    if not (a == F32x8 and b == F32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])
    return F32x8(a, b), codegen


@intrinsic
def addf(typingctx, a, b):
    if not (a == F32x8 and b == F32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return F32x8(a, b), codegen


@intrinsic
def lanef(typingctx, v, k):
    """Every lane = lane k of the float lanes v (k constant after unrolling)."""
    if not (v == F32x8 and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        e = builder.extract_element(args[0], _int(context, builder, args[1], sig.args[1], 32))
        return _splat(builder, e, F32x8.llvm)
    return F32x8(v, k), codegen


@intrinsic
def hsum4(typingctx, v):
    """Sum of float lanes 0-3 in ggml's order for a __m128 (movehl + add, then movehdup +
    add_ss): (v0 + v2) + (v1 + v3). Lanes 4-7 are ignored."""
    if v != F32x8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        e = lambda x, i: builder.extract_element(x, ir.Constant(_i32, i))  # noqa: E731
        return builder.fadd(builder.fadd(e(v, 0), e(v, 2)), builder.fadd(e(v, 1), e(v, 3)))
    return types.float32(v), codegen


@intrinsic
def hsum_hadd(typingctx, v):
    """Sum of the 8 float lanes in GGML_F32x8_REDUCE's order (ggml_vec_dot_f32 / _f16):
    t = lo4 + hi4, then two vhaddps: (t0 + t1) + (t2 + t3)."""
    if v != F32x8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        t = builder.fadd(_shuffle(builder, v, v, range(4)), _shuffle(builder, v, v, range(4, 8)))
        e = lambda i: builder.extract_element(t, ir.Constant(_i32, i))  # noqa: E731
        return builder.fadd(builder.fadd(e(0), e(1)), builder.fadd(e(2), e(3)))
    return types.float32(v), codegen


def _is_u16_array(t):
    return (isinstance(t, types.Array) and t.ndim == 1 and isinstance(t.dtype, types.Integer)
            and t.dtype.bitwidth == 16)


def _half8_to_f32(builder, v):
    """<8 x i16> IEEE half bits -> <8 x float> (vcvtph2ps with F16C, else kquant's integer
    conversion lane-wise: exact either way)."""
    if HAS_F16C:
        return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), F32x8.llvm)
    w = builder.zext(v, I32x8.llvm)
    c = lambda x: ir.Constant(I32x8.llvm, [x] * 8)  # noqa: E731
    inf_nan = builder.mul(builder.lshr(builder.add(builder.and_(w, c(0x7C00)), c(0x400)),
                                       c(15)), c(0x70000000))
    bits = builder.or_(builder.shl(builder.and_(w, c(0x8000)), c(16)),
                       builder.add(builder.shl(builder.and_(w, c(0x7FFF)), c(13)), inf_nan))
    return builder.fmul(builder.bitcast(bits, F32x8.llvm),
                        ir.Constant(F32x8.llvm, [2.0 ** 112] * 8))


@intrinsic
def loadh(typingctx, arr, off):
    """8 fp16 values (a 1-D uint16 array from index `off`) as float32 lanes (GGML_F32Cx8_LOAD:
    vcvtph2ps)."""
    if not (_is_u16_array(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                     ir.VectorType(_i16, 8))
        return _half8_to_f32(builder, builder.load(p, align=2))
    return F32x8(arr, off), codegen


@intrinsic
def loadbf(typingctx, arr, off):
    """8 bf16 values (a 1-D uint16 array from index `off`) as float32 lanes (vpmovzxwd +
    vpslld 16, as ggml_vec_dot_bf16's LOAD)."""
    if not (_is_u16_array(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                     ir.VectorType(_i16, 8))
        w = builder.zext(builder.load(p, align=2), I32x8.llvm)
        w = builder.shl(w, ir.Constant(I32x8.llvm, [16] * 8))
        return builder.bitcast(w, F32x8.llvm)
    return F32x8(arr, off), codegen


@intrinsic
def hsumf(typingctx, v):
    """Sum of the 8 float lanes, in ggml's hsum_float_8 order: (lo4 + hi4), then pairs."""
    if v != F32x8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        s = builder.fadd(_shuffle(builder, v, v, range(4, 8)), _shuffle(builder, v, v, range(4)))
        s = builder.fadd(s, _shuffle(builder, s, s, [2, 3, 2, 3]))
        return builder.fadd(builder.extract_element(s, ir.Constant(_i32, 0)),
                            builder.extract_element(s, ir.Constant(_i32, 1)))
    return types.float32(v), codegen


# ---- i-quants: a 16-entry table of signed bytes ----------------------------------------------

#: ggml-common.h's kvalues_iq4nl (the IQ4_NL / IQ4_XS levels), as kquant.codecs.iq4 has them
_KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _lut16(builder, idx):
    """Each byte (0..15) of the 32 bytes idx replaced by kvalues_iq4nl[byte]: ggml's
    _mm_shuffle_epi8(values128, idx) on each half (`vpshufb` with AVX2; without, a chain of
    16 compares and selects, the same bytes)."""
    table = ir.Constant(I8x32.llvm, [v & 0xFF for v in _KVALUES_IQ4NL] * 2)
    if HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.pshuf.b", I8x32.llvm, [table, idx])
    out = ir.Constant(I8x32.llvm, [0] * 32)
    for i, v in enumerate(_KVALUES_IQ4NL):
        hit = builder.icmp_unsigned("==", idx, ir.Constant(I8x32.llvm, [i] * 32))
        out = builder.select(hit, ir.Constant(I8x32.llvm, [v & 0xFF] * 32), out)
    return out


@intrinsic
def iq4vals32(typingctx, arr, off):
    """The 32 IQ4 levels of 16 index bytes at `off` (low nibbles, then high nibbles), as
    signed bytes: ggml's MM256_SET_M128I(shuffle(values, q >> 4 & 15), shuffle(values, q & 15))."""
    if not (_is_array(arr, 8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], I8x16.llvm)
        v = builder.load(p, align=1)
        hi = builder.lshr(v, ir.Constant(I8x16.llvm, [4] * 16))
        both = _shuffle(builder, v, hi, range(32))
        return _lut16(builder, builder.and_(both, ir.Constant(I8x32.llvm, [15] * 32)))
    return I8x32(arr, off), codegen


@intrinsic
def sdot16(typingctx, a, b):
    """Signed bytes a times signed bytes b, adjacent pairs summed to int16: ggml's
    mul_add_epi8, maddubs(sign(a, a), sign(b, a)) (exact while |a|, |b| <= 127)."""
    if not (a == I8x32 and b == I8x32):
        return None

    def codegen(context, builder, sig, args):
        x, y = args
        return _maddubs(builder, _psign(builder, x, x), _psign(builder, y, x))
    return I16x16(a, b), codegen


@intrinsic
def splat16(typingctx, x):
    """An integer in all 16 int16 lanes (_mm256_set1_epi16)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, _int(context, builder, args[0], sig.args[0], 16), I16x16.llvm)
    return I16x16(x), codegen


# ---- i-quants: vectors built from grid points and sign patterns --------------------------------

@intrinsic
def from_u32x8(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """32 bytes from eight little-endian 32-bit words, a0 first (ggml's
    _mm256_set_epi32(a7, ..., a0): eight IQ3 grid points)."""
    return _from_words((a0, a1, a2, a3, a4, a5, a6, a7), 32, I8x32)


@intrinsic
def from_u64x4(typingctx, a, b, c, d):
    """32 bytes from four little-endian 64-bit words, a first (ggml's
    _mm256_set_epi64x(d, c, b, a): four 8-byte sign patterns)."""
    return _from_words((a, b, c, d), 64, I8x32)


@intrinsic
def sign8(typingctx, a, b):
    """_mm256_sign_epi8(a, b): each byte of a, negated where b's is negative, 0 where it is 0."""
    if not (a == I8x32 and b == I8x32):
        return None

    def codegen(context, builder, sig, args):
        return _psign(builder, args[0], args[1])
    return I8x32(a, b), codegen


xor8 = _binop8("xor")
