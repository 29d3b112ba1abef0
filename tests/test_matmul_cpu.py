"""kquant.matmul's CPU kernels: products straight from ggml blocks, as ggml's vec_dot.

For every weight type (random weights and real SmolLM2 rows, quantized by kquant.quantize;
rows of 256, 512 and 2304 values, 96 and 288 too for the 32-value and float types, 199 for
the float types; 1 and 3 tokens):

1. Activations: kquant's quantize_activations gives the bytes of ggml's own CPU from_float
   for the vec_dot_type (Q8_K, the AVX2 Q8_0 / Q8_1, F16, BF16, F32), checked byte for byte
   where libggml-cpu loads.
2. Exact math: Y equals R = dequantize(w) . dequantize(xq) computed in float64, where for
   Q4_1 / Q5_1 the min term uses Q8_1's stored s = fp16(d * sum q) as ggml does
   (R = sum (w - m) xq + sum_b m_b s_b). The integer block sums are exact, so only float32
   rounding separates them: |Y - R| <= n u S, S = sum |w_i xq_i| (+ sum |m_b s_b|),
   u = 2^-24, n = blocks per row + 10 (one rounding per scale product, per conversion and
   per addition in a lane, plus the final lane sum), n = k + 2 for the float types (any
   summation order).
3. Against the unquantized activation x: |Y - W x| <= n u S + sum_i |w_i| e_i (+ Q8_1's s
   term), with e_i the a-priori bound on |x_i - xq_i| of the activation format:
   Q8_K 0.5001 d (d = 1 / iscale, round to nearest), Q8_0 / Q8_1 0.57 d (half a step,
   plus d's fp16 rounding: 127 * 2^-11 d), F16 2^-11 |x| + 2^-25, BF16 2^-8 |x|, F32 0; and
   for Q8_1 sum_b |m_b| 2^-10 d_b |sum q| (s's fp16 rounding).
4. Against ggml's own vec_dot (ggml_get_type_traits_cpu) on the same activation bytes:
   |Y - G| <= 2 n u S here, and test_bits_are_ggml_vec_dot: Y equals G bit for bit (the
   kernels do ggml's AVX2 float operations in its order, fused where it fuses), for every
   type, random and heavy-tailed rows with all-zero blocks, every _ks row length (and every
   leftover count of the float types' 32-value steps), 1, 3 and 7 tokens.
Then the public entry points (matvec, matmul, dot with its BLAS path), the AVX2 (not _ref)
rounding of Q8_0 activations, the generic (non-AVX2, non-F16C) vector IR giving the same
bits, and errors. Skips cleanly without llama-cpp-python (ggml
parts) or the SmolLM2 model (real-weight part).
"""
from __future__ import annotations

import numpy as np
import pytest

import kquant
from kquant.matmul import (Activations, WEIGHT_TYPES, dot, matmul, matvec,
                           quantize_activations, vec_dot_type)
from kquant.matmul import cpu

T = cpu.T
U = 2.0 ** -24
# the weight types but the grid i-quants (IQ2_* / IQ1_*): several need an importance matrix to be
# quantized at all, and their codecs (kquant.codecs.iq2 / iq1) are not on every branch, so
# tests/test_matmul_iq.py checks them, on blocks ggml_quantize_chunk makes with an imatrix
GRID = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"}
TYPES = [t.name for t in WEIGHT_TYPES if t.name not in GRID]
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ3_XXS", "IQ3_S",  # 256-value blocks
           "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"}
Q8_1_TYPES = {"Q4_1", "Q5_1"}
MIN_OFFSET = {"Q4_1": 20, "Q5_1": 24}   # block bytes; the min m is the fp16 at offset 2


@pytest.fixture(scope="module")
def ggml_cpu():
    from kquant.reference import find_libggml_cpu
    from kquant.reference.ggml_cpu import ggml_cpu as get

    if find_libggml_cpu() is None:
        pytest.skip("llama.cpp's libggml-cpu not found: pip install -e '.[interop]' "
                    "(llama-cpp-python==0.3.36) or set KQUANT_LIBGGML_CPU")
    return get()


def _ks(name: str) -> list[int]:
    if name in K_TYPES:
        return [256, 512, 2304]
    # 288: 9 blocks, one group of 8 and a remainder in the 32-value kernels
    return [96, 256, 288, 512, 2304] + ([199] if name in ("F32", "F16", "BF16") else [])


def _weights(name: str, x: np.ndarray) -> np.ndarray:
    return x.copy() if name == "F32" else kquant.quantize(x, name)


def _random_rows(rng, rows: int, k: int) -> np.ndarray:
    """Rows of different scales with heavy-ish tails."""
    scale = 10.0 ** rng.uniform(-2, 1, size=(rows, 1))
    return (rng.standard_t(5, size=(rows, k)) * scale).astype(np.float32)


def _act_values(act: Activations) -> np.ndarray:
    """The activation's exact values in float64 (d * q without float32 rounding)."""
    if act.qtype == T.F32:
        return act.values.astype(np.float64)
    if act.qtype in (T.F16, T.BF16):
        return kquant.dequantize(act.values.view(np.uint8), act.qtype).astype(np.float64)
    block = 256 if act.qtype == T.Q8_K else 32
    n, k = act.qs.shape
    q = act.qs.reshape(n, k // block, block).astype(np.float64)
    return (q * act.d[:, :, None].astype(np.float64)).reshape(n, k)


def _reference(name: str, w: np.ndarray, act: Activations):
    """(R, S): ggml's math in float64 and the sum of absolute terms it rounds over."""
    wd = kquant.dequantize(w, name).astype(np.float64)
    xq = _act_values(act)
    if name not in Q8_1_TYPES:
        return xq @ wd.T, np.abs(xq) @ np.abs(wd).T
    rows, k = wd.shape
    size = MIN_OFFSET[name]
    m = np.ascontiguousarray(w.reshape(rows, -1, size)[:, :, 2:4]).view(np.float16)
    m = m.reshape(rows, -1).astype(np.float64)                      # (rows, nb)
    dq = wd - np.repeat(m, 32, axis=1)                               # d * q per value
    s = act.s.astype(np.float64)                                     # (n_tok, nb)
    return xq @ dq.T + s @ m.T, np.abs(xq) @ np.abs(dq).T + np.abs(s) @ np.abs(m).T


def _n_adds(name: str, k: int) -> int:
    if name in ("F32", "F16", "BF16"):
        return k + 2
    return k // (256 if name in K_TYPES else 32) + 10


def _act_error_bound(name: str, x: np.ndarray, act: Activations) -> np.ndarray:
    """A-priori bound on |x - xq| per value (see the module docstring)."""
    ax = np.abs(x.astype(np.float64))
    t = act.qtype
    if t == T.F32:
        return np.zeros_like(ax)
    if t == T.F16:
        return ax * 2.0 ** -11 + 2.0 ** -25
    if t == T.BF16:
        return ax * 2.0 ** -8
    block = 256 if t == T.Q8_K else 32
    factor = 0.5001 if t == T.Q8_K else 0.57
    d = np.repeat(np.abs(act.d.astype(np.float64)), block, axis=1)
    e = factor * d
    return np.where(d == 0, ax, e)


def _check(name: str, w: np.ndarray, x: np.ndarray, act: Activations, y: np.ndarray,
           g: np.ndarray | None = None) -> None:
    k = x.shape[1]
    R, S = _reference(name, w, act)
    n = _n_adds(name, k)
    bound = n * U * S + 1e-30
    err = np.abs(y.astype(np.float64) - R)
    assert np.all(err <= bound), (name, k, float(np.max(err / bound)))
    # against the unquantized activation
    wd = kquant.dequantize(w, name).astype(np.float64)
    exact = x.astype(np.float64) @ wd.T
    qbound = _act_error_bound(name, x, act) @ np.abs(wd).T
    if name in Q8_1_TYPES:
        rows = w.shape[0]
        m = np.ascontiguousarray(w.reshape(rows, -1, MIN_OFFSET[name])[:, :, 2:4])
        m = np.abs(m.view(np.float16).reshape(rows, -1).astype(np.float64))
        sumq = np.abs(act.qs.reshape(act.n_tok, -1, 32).sum(-1, dtype=np.int64))
        qbound = qbound + (2.0 ** -10 * 1.01 * np.abs(act.d) * sumq) @ m.T
    err_x = np.abs(y.astype(np.float64) - exact)
    limit = bound + qbound * 1.0001
    assert np.all(err_x <= limit), (name, k, float(np.max(err_x / limit)))
    if g is not None:
        gerr = np.abs(y.astype(np.float64) - g.astype(np.float64))
        assert np.all(gerr <= 2 * bound), (name, k, float(np.max(gerr / bound)))


# ---- activations ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_vec_dot_type_is_ggml(name, ggml_cpu):
    assert vec_dot_type(name) == ggml_cpu.vec_dot_type(T[name])
    assert ggml_cpu.traits(T[name]).nrows == 1


@pytest.mark.parametrize("vt", ["Q4_K", "Q4_0", "Q4_1", "F16", "BF16", "F32"])
def test_activations_are_ggml_from_float(vt, ggml_cpu):
    rng = np.random.default_rng(1)
    act_type = vec_dot_type(vt)
    for k in (_ks(vt)):
        x = rng.standard_normal((3, k)).astype(np.float32) * np.float32(3.0)
        x[1, : min(k, 256)] = 0.0                       # an all-zero block
        x[2, 5] = 1e4                                   # an outlier
        act = quantize_activations(x, vt)
        assert act.qtype == act_type
        theirs = ggml_cpu.from_float(x, act_type)
        assert np.array_equal(act.data, theirs), (vt, k)
        again = Activations.from_bytes(theirs, act_type)
        for field in ("qs", "d", "sums", "s", "values"):
            a, b = getattr(act, field), getattr(again, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert np.array_equal(a, b), field


def test_q8_0_activation_rounding_is_avx2():
    """ggml's CPU quantize_row_q8_0 rounds half to even with id = 127 / amax (x86 AVX2), not
    as quantize_row_q8_0_ref (roundf, id = 1 / d) the Q8_0 file format uses."""
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [127.0, 0.5, 1.5, 2.5, -0.5, -3.5]      # amax 127: d = 1, id = 1
    act = quantize_activations(x, "Q8_0")
    assert act.qs[0, :6].tolist() == [127, 0, 2, 2, 0, -4]
    ref = kquant.quantize(x, "Q8_0").view(np.int8)[0, 2:8]
    assert ref.tolist() == [127, 1, 2, 3, -1, -4]
    assert act.d[0, 0] == 1.0


# ---- products ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_random_weights(name, request):
    ggml = None
    try:
        ggml = request.getfixturevalue("ggml_cpu")
    except pytest.skip.Exception:
        pass
    rng = np.random.default_rng(TYPES.index(name))
    for k in _ks(name):
        w = _weights(name, _random_rows(rng, 13, k))
        for n_tok in (1, 3):
            x = rng.standard_normal((n_tok, k)).astype(np.float32)
            act = quantize_activations(x, name)
            y = matmul(w, name, act)
            assert y.shape == (n_tok, 13) and y.dtype == np.float32
            g = None
            if ggml is not None:
                g = ggml.vec_dot_rows(cpu.weight_rows(w, T[name])[0], T[name], act.data)
            _check(name, w, x, act, y, g)


@pytest.mark.parametrize("name", TYPES)
def test_smollm2_weights(name, smollm2_weights, request):
    ggml = None
    try:
        ggml = request.getfixturevalue("ggml_cpu")
    except pytest.skip.Exception:
        pass
    rng = np.random.default_rng(7)
    for tensor, full in smollm2_weights.items():
        for k in _ks(name):
            if k > full.shape[1]:
                continue
            w = _weights(name, np.ascontiguousarray(full[:, :k]))
            x = rng.standard_normal((3, k)).astype(np.float32)
            act = quantize_activations(x, name)
            y = matmul(w, name, act)
            g = None
            if ggml is not None:
                g = ggml.vec_dot_rows(cpu.weight_rows(w, T[name])[0], T[name], act.data)
            _check(name, w, x, act, y, g)


def _exact_ks(name: str) -> list[int]:
    if name in ("F32", "F16", "BF16"):
        # every n % 32 leftover path of ggml_vec_dot_f32 (fused or not) and of F16 / BF16
        return _ks(name) + [1, 3, 4, 5, 8, 11, 12, 31, 32, 33, 45, 63, 64 + 29]
    return _ks(name) + ([32] if name not in K_TYPES else [])


def _heavy_rows(rng, rows: int, k: int, block: int) -> np.ndarray:
    """Heavy-tailed rows (Student t, 2 degrees of freedom) over 4 decades of scale, one row
    all zero, others with zero blocks, and an outlier."""
    x = (rng.standard_t(2, size=(rows, k)) * 10.0 ** rng.uniform(-3, 1, size=(rows, 1)))
    x = x.astype(np.float32)
    x[1] = 0.0
    x[2, :min(k, block)] = 0.0
    x[3, k - min(k, block):] = 0.0
    x[4, k // 2] = 1e3
    return x


@pytest.mark.parametrize("name", TYPES)
def test_bits_are_ggml_vec_dot(name, ggml_cpu):
    """matmul's results are ggml's vec_dot's, bit for bit (float32 bits compared)."""
    rng = np.random.default_rng(100 + TYPES.index(name))
    block = 256 if name in K_TYPES else 32
    checked = 0
    for k in _exact_ks(name):
        for rows in (_random_rows(rng, 9, k), _heavy_rows(rng, 9, k, block)):
            w = _weights(name, rows)
            wb = cpu.weight_rows(w, T[name])[0]
            for n_tok in (1, 3, 7):
                x = (rng.standard_t(3, size=(n_tok, k)) * 10.0 ** rng.uniform(-2, 2)).astype(
                    np.float32)
                if n_tok > 1:
                    x[1, :min(k, block)] = 0.0                  # an all-zero activation block
                if n_tok > 2:
                    x[2] = 0.0
                act = quantize_activations(x, name)
                y = matmul(w, name, act)
                g = ggml_cpu.vec_dot_rows(wb, T[name], act.data)
                diff = y.view(np.uint32) != g.view(np.uint32)
                assert not diff.any(), (name, k, n_tok, int(diff.sum()),
                                        y[diff][:4].tolist(), g[diff][:4].tolist())
                checked += y.size
    assert checked > 0


# ---- entry points --------------------------------------------------------------------------

def test_entry_points_agree():
    rng = np.random.default_rng(3)
    x = _random_rows(rng, 40, 512)
    w = kquant.quantize(x, "Q4_K")
    X = rng.standard_normal((5, 512)).astype(np.float32)
    act = quantize_activations(X, "Q4_K")
    Y = matmul(w, "Q4_K", X)
    assert np.array_equal(Y, matmul(w, T.Q4_K, act))
    assert np.array_equal(Y[0], matvec(w, "q4_k", X[0]))
    assert np.array_equal(Y[1], matvec(w, 12, quantize_activations(X[1], "Q4_K")))
    assert np.array_equal(Y, dot(w, "Q4_K", X))
    assert np.array_equal(Y[2], dot(w, "Q4_K", X[2]))


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "F16", "F32"])
def test_dot_blas_path(name, monkeypatch):
    """From BLAS_MIN_TOKENS tokens, dot dequantizes weight tiles and calls BLAS: the same
    products, float32 sums of k terms."""
    rng = np.random.default_rng(4)
    k = 512
    w = _weights(name, _random_rows(rng, 300, k))
    X = rng.standard_normal((6, k)).astype(np.float32)
    monkeypatch.setitem(cpu.BLAS_MIN_TOKENS, T[name], 4)
    monkeypatch.setattr(cpu, "BLAS_TILE_VALUES", 128 * k)      # several tiles
    Y = dot(w, name, X)
    act = quantize_activations(X, name)
    R, S = _reference(name, w, act)
    assert np.all(np.abs(Y - R) <= (k + 2) * U * S + 1e-30)


def test_float_weight_dtypes():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    X = rng.standard_normal((2, 96)).astype(np.float32)
    assert np.array_equal(matmul(x, "F32", X), matmul(x.view(np.uint8), "F32", X))
    h = x.astype(np.float16)
    assert np.array_equal(matmul(h, "F16", X), matmul(kquant.quantize(x, "F16"), "F16", X))
    b = kquant.quantize(x, "BF16").view(np.uint16)
    assert np.array_equal(matmul(b, "BF16", X), matmul(b.view(np.uint8), "BF16", X))


def test_errors():
    w = kquant.quantize(np.ones((2, 256), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="unsupported weight type"):
        matmul(w, "Q8_K", np.ones((1, 256), np.float32))
    with pytest.raises(ValueError, match="Q8_K activations"):
        matmul(w, "Q4_K", quantize_activations(np.ones(256, np.float32), "Q4_0"))
    with pytest.raises(ValueError, match="activations of 512 values"):
        matmul(w, "Q4_K", np.ones((1, 512), np.float32))
    with pytest.raises(ValueError, match="float32"):
        matmul(w, "Q4_K", np.ones((1, 256), np.float64))
    with pytest.raises(ValueError, match="whole number"):
        matmul(w[:, :100], "Q4_K", np.ones((1, 256), np.float32))
    with pytest.raises(ValueError, match="one activation vector"):
        matvec(w, "Q4_K", np.ones((2, 256), np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_activations(np.ones((1, 96), np.float32), "Q4_K")


def _options(kernel) -> dict:
    """A kernel's compile options, uncached (njit sets nopython itself)."""
    opts = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}
    return {**opts, "cache": False}


def test_generic_vector_ir(monkeypatch):
    """Without AVX2 / F16C (other CPUs), kquant.matmul.simd emits plain LLVM vector IR for
    vpmaddubsw, vpmaddwd, vpsignb, vpshufb and vcvtph2ps: the kernels recompiled that way give the
    same bits (the integer sums are exact either way, the float operations the same)."""
    from numba import njit

    from kquant.matmul import simd

    monkeypatch.setattr(simd, "HAS_AVX2", False)
    monkeypatch.setattr(simd, "HAS_F16C", False)
    rng = np.random.default_rng(6)
    # between them every path that depends on the flags (Q4_1: f16at, F16: loadh, the IQ4
    # types: vpshufb's table lookup, IQ3_XXS: vpsignb on the activations)
    for name in ("Q4_K", "Q8_0", "Q4_1", "F16", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S"):
        args = cpu.kernel_args(name, rng)
        kernel = cpu.kernel(name)
        want = args[-1].copy()
        kernel(*args[:-1], want)
        generic = njit(**_options(kernel))(kernel.py_func)
        got = np.empty_like(want)
        generic(*args[:-1], got)
        assert np.array_equal(got, want), name
