"""kquant.matmul.repack: llama.cpp's repacked Q4_K / Q4_0 / IQ4_NL CPU matmul (AVX2), bit for bit.

Against the library (skipped without it: set KQUANT_LIBGGML / KQUANT_LIBGGML_CPU or install
llama-cpp-python): the activation bytes of ggml_quantize_mat_*_4x8, ggml's gemm / gemv fed with
kquant's repacked bytes, and ggml's whole MUL_MAT with the weight in the CPU_REPACK buffer (on
1 and 2 threads). Without it: a numpy model of the kernels' float order, and the layouts.
"""
from __future__ import annotations

import zlib

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.matmul import repack
from kquant.matmul.activations import quantize_rows
from kquant.reference.repack import GGMLRepack

TOKENS = (1, 3, 4, 5, 8, 13, 16, 21)
SHAPES = [("Q4_K", rows, k) for rows in (8, 24, 64) for k in (256, 768, 2048)] + \
         [(t, rows, k) for t in ("Q4_0", "IQ4_NL") for rows in (8, 24, 64) for k in (32, 96, 2048)]


@pytest.fixture(scope="module")
def g() -> GGMLRepack:
    try:
        return GGMLRepack()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _heavy(rng, shape, spread=True):
    """Student-t(3) values, rows scaled over six decades (heavy tails, varied block scales)."""
    x = rng.standard_t(3, size=shape).astype(np.float32)
    if spread:
        x *= (10.0 ** rng.uniform(-3, 3, size=(shape[0], 1))).astype(np.float32)
    return x


def _acts(rng, n, k):
    x = _heavy(rng, (n, k), spread=False)
    # a block with +amax after -amax (the 4x8 Q8_K quantizer flips the sign there), and a
    # block of zeros
    if k >= 256 and n:
        x[0, 10], x[0, 200] = -50.0, 50.0
    if k >= 512 and n > 1:
        x[1, 256:512] = 0.0
    return x


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


# ---- without the library -----------------------------------------------------------------

def test_applies():
    assert repack.applies(T.Q4_K, 8, 256)
    assert repack.applies("Q4_0", 4096, 32) and repack.applies(2, 16, 64)
    assert not repack.applies(T.Q4_K, 12, 256)
    assert not repack.applies(T.Q4_0, 4, 64)
    assert not repack.applies(T.Q6_K, 8, 256)
    assert not repack.applies(T.Q8_0, 8, 256)
    assert not repack.applies(T.Q4_1, 8, 256)
    assert repack.applies(T.IQ4_NL, 8, 32) and not repack.applies(T.IQ4_NL, 12, 32)
    assert not repack.applies(T.IQ4_XS, 8, 256)


@pytest.mark.parametrize("name,k", [("Q4_K", 512), ("Q4_0", 96), ("IQ4_NL", 96)])
def test_repack_layout(name, k):
    """repack_bytes interleaves 8 rows' blocks as make_block_*x8 does (checked by undoing it)."""
    rng = np.random.default_rng(1)
    qtype = T[name]
    wb = kquant.quantize(_heavy(rng, (16, k)), name)
    packed = repack.repack_bytes(wb, qtype)
    if qtype in (T.Q4_0, T.IQ4_NL):
        p = packed.reshape(2, k // 32, 144)
        d = p[..., :16].reshape(2, k // 32, 8, 2)
        qs = (p[..., 16:] ^ (0x88 if qtype == T.Q4_0 else 0)).reshape(2, k // 32, 2, 8, 8).transpose(0, 1, 3, 2, 4)
        back = np.concatenate([d, qs.reshape(2, k // 32, 8, 16)], -1)
        assert np.array_equal(back.transpose(0, 2, 1, 3).reshape(16, -1), wb)
    else:
        p = packed.reshape(2, k // 256, 1152)
        d = p[..., 0:16].reshape(2, -1, 8, 2)
        dm = p[..., 16:32].reshape(2, -1, 8, 2)
        qs = p[..., 128:].reshape(2, -1, 16, 8, 8).transpose(0, 1, 3, 2, 4).reshape(2, -1, 8, 128)
        blk = wb.reshape(2, 8, -1, 144).transpose(0, 2, 1, 3)
        assert np.array_equal(d, blk[..., 0:2]) and np.array_equal(dm, blk[..., 2:4])
        assert np.array_equal(qs, blk[..., 16:])
        sc, mn = repack._k4_scales(blk[..., 4:16])
        sc2, mn2 = repack._k4_scales(p[..., 32:128].reshape(2, -1, 8, 12))   # (.., sub, row)
        assert np.array_equal(np.swapaxes(sc2, -1, -2), sc)
        assert np.array_equal(np.swapaxes(mn2, -1, -2), mn)


def _fma32(a, b, c):
    """float32 fma through float64 (the product is exact there; the sum rounds twice, which
    differs from one rounding only in rare midpoint cases, none in these seeds)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _model(wb, qtype, x):
    """The kernels' float order (module docstring) in numpy, ints in int64."""
    act = repack.quantize_activations(x, qtype)
    n, k = x.shape
    rows = wb.shape[0]
    a = act.qs.astype(np.int64)
    out = np.empty((n, rows), np.float32)
    if qtype in (T.Q4_0, T.IQ4_NL):
        nb = k // 32
        blk = wb.reshape(rows, nb, 18)
        d = blk[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blk[..., 2:]
        q = np.concatenate([qs & 15, qs >> 4], -1).astype(np.int64)            # (rows, nb, 32)
        q = q - 8 if qtype == T.Q4_0 else repack.KVALUES_IQ4NL[q].astype(np.int64)
        dots = np.einsum("cbl,tbl->tcb", q, a.reshape(n, nb, 32))
        acc = np.zeros((n, rows), np.float32)
        for b in range(nb):
            acc = _fma32(dots[:, :, b].astype(np.float32), d[None, :, b] * act.d[:, None, b], acc)
        return acc
    nb = k // 256
    blk = wb.reshape(rows, nb, 144)
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dm = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, mn = repack._k4_scales(blk[..., 4:16])                              # (rows, nb, 8)
    qs = blk[..., 16:].reshape(rows, nb, 4, 32)
    q = np.stack([qs & 15, qs >> 4], 3).reshape(rows, nb, 8, 32).astype(np.int64)
    dots = np.einsum("cbjl,tbjl->tcbj", q, a.reshape(n, nb, 8, 32))
    s = dots * sc[None].astype(np.int64)
    b32 = act.aux.reshape(n, nb, 8).astype(np.int64)
    m = b32[:, None] * mn[None].astype(np.int64)
    for t0, t1, per_sb in ((0, act.n_gemm, True), (act.n_gemm, n, False)):
        acc = np.zeros((t1 - t0, rows), np.float32)
        accm = np.zeros_like(acc)
        for b in range(nb):
            ds = d[None, :, b] * act.d[t0:t1, None, b]
            ms = dm[None, :, b] * act.d[t0:t1, None, b]
            steps = [(2 * j, 2 * j + 2) for j in range(4)] if per_sb else [(0, 8)]
            for j0, j1 in steps:
                acc = _fma32(s[t0:t1, :, b, j0:j1].sum(-1).astype(np.float32), ds, acc)
                accm = _fma32(m[t0:t1, :, b, j0:j1].sum(-1).astype(np.float32), ms, accm)
        out[t0:t1] = acc - accm
    return out


@pytest.mark.parametrize("name,k", [("Q4_K", 512), ("Q4_K", 256), ("Q4_0", 96), ("IQ4_NL", 96)])
def test_float_order_model(name, k):
    rng = np.random.default_rng(_seed(name, k))
    qtype = T[name]
    wb = kquant.quantize(_heavy(rng, (24, k)), name)
    x = _acts(rng, 7, k)
    assert np.array_equal(_bits(repack.matmul(wb, qtype, x)), _bits(_model(wb, qtype, x)))


def test_threads_do_not_matter():
    rng = np.random.default_rng(3)
    wb = kquant.quantize(_heavy(rng, (64, 512)), "Q4_K")
    p = repack.prepare(wb, T.Q4_K)
    x = _acts(rng, 13, 512)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = repack.matmul_prepared(p, x)
        numba.set_num_threads(before)
        many = repack.matmul_prepared(p, x)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(_bits(one), _bits(many))


def test_bad_input():
    with pytest.raises(ValueError):
        repack.prepare(np.zeros((12, 144), np.uint8), T.Q4_K)
    with pytest.raises(ValueError):
        repack.prepare(np.zeros((8, 144), np.uint8), T.Q6_K)
    p = repack.prepare(np.zeros((8, 144), np.uint8), T.Q4_K)
    with pytest.raises(ValueError):
        repack.matmul_prepared(p, np.zeros((2, 512), np.float32))


# ---- against llama.cpp ---------------------------------------------------------------------

@pytest.mark.parametrize("name,k", [("Q4_K", 256), ("Q4_K", 2048), ("Q4_0", 32), ("Q4_0", 2048),
                                    ("IQ4_NL", 96)])
def test_activation_bytes(g, name, k):
    """quantize_activations' 4-row groups are ggml_quantize_mat_*_4x8's bytes."""
    rng = np.random.default_rng(_seed("act", name, k))
    qtype = T[name]
    for trial in range(4):
        x = _acts(rng, 4, k) * np.float32(10.0 ** rng.uniform(-4, 4))
        act = repack.quantize_activations(x, qtype)
        mine = (repack.q8_k_4x8_bytes(act.qs, act.d, act.sums) if qtype == T.Q4_K
                else repack.q8_0_4x8_bytes(act.qs, act.d))
        assert np.array_equal(mine, g.quantize_mat(x, qtype)), trial
        if qtype == T.Q4_K and trial == 0:
            # the sign case: plain quantize_row_q8_K gives the other sign on row 0, block 0
            plain = quantize_rows(x[:1], T.Q8_K)
            assert np.array_equal(plain.qs[0, :256], -act.qs[0, :256])
            assert plain.d[0, 0] == -act.d[0, 0]


@pytest.mark.parametrize("name,rows,k", SHAPES)
def test_kernels(g, name, rows, k):
    """ggml's gemm (nr = 4 and 16: both of its row loops) and gemv on kquant's repacked bytes
    give kquant's results: checks repack_bytes, prepare and both float orders."""
    from kquant.reference.ggml_cpu import ggml_cpu

    rng = np.random.default_rng(_seed("kern", name, rows, k))
    qtype = T[name]
    wb = kquant.quantize(_heavy(rng, (rows, k)), name)
    packed = repack.repack_bytes(wb, qtype)
    p = repack.prepare(wb, qtype)
    x = _acts(rng, 19, k)
    ours = repack.matmul_prepared(p, x)
    act = np.concatenate([g.quantize_mat(x[i:i + 4], qtype) for i in range(0, 16, 4)])
    assert np.array_equal(_bits(g.gemm(packed, qtype, k, act, 16)), _bits(ours[:16]))
    assert np.array_equal(_bits(g.gemm(packed, qtype, k, act[:act.size // 4], 4)),
                          _bits(ours[:4]))
    vt = T.Q8_K if qtype == T.Q4_K else T.Q8_0
    rest = ggml_cpu().from_float(x[16:], vt)
    for i in range(3):
        assert np.array_equal(_bits(g.gemv(packed, qtype, k, rest[i])), _bits(ours[16 + i]))


@pytest.mark.parametrize("name,rows,k", SHAPES)
def test_mul_mat(g, name, rows, k):
    """ggml's whole MUL_MAT, weight in CPU_REPACK (forward_mul_mat: its quantization, its
    gemm / gemv split, its chunks), on 1 and 2 threads: kquant's matmul, bit for bit."""
    rng = np.random.default_rng(_seed("mm", name, rows, k))
    qtype = T[name]
    wb = kquant.quantize(_heavy(rng, (rows, k)), name)
    p = repack.prepare(wb, qtype)
    for n in TOKENS:
        x = _acts(rng, n, k)
        ours = repack.matmul_prepared(p, x)
        assert np.array_equal(_bits(ours), _bits(repack.matmul(wb, qtype, x)))
        for threads in (1, 2):
            ref = g.mul_mat(wb, qtype, x, threads)
            assert np.array_equal(_bits(ref), _bits(ours)), (n, threads)
