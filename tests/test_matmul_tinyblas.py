"""kquant.matmul.tinyblas against ggml's own mul_mat (llamafile's tinyBLAS), bit for bit.

The oracle is GGMLCompute.mul_mat (a GGML_OP_MUL_MAT graph on ggml's CPU backend, 2 threads),
which takes llamafile_sgemm for >= 2 tokens; skipped where llama.cpp's libraries are missing.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.matmul import tinyblas

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.IQ4_NL]
TOKENS = [2, 3, 4, 5, 7, 16, 37]
# (rows, k): rows 1..70 with non-multiples of 4 (and of the 4 x 2 / 4 x 3 tiles), k from one
# block to 2048; the floats' rows % 4 != 0 and k % 8 != 0 shapes are checked to be refused.
SHAPES = [(1, 32), (2, 64), (3, 96), (4, 32), (5, 256), (6, 64), (7, 160), (8, 2048),
          (9, 128), (12, 512), (13, 64), (16, 1024), (17, 32), (20, 40), (24, 8), (33, 224),
          (28, 72), (36, 1000), (52, 24), (60, 136), (64, 256), (67, 96), (68, 512), (70, 64),
          (8, 36), (12, 100), (4, 12)]


@pytest.fixture(scope="module")
def ggml_cpu():
    from kquant.reference.libggml import GGMLCompute

    try:
        return GGMLCompute()
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"ggml's CPU backend not available: {e}")


def make_weights(t: T, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random weights with some spread of magnitudes, a zero row and a zero block among them,
    as GGUF stores them (uint8 rows)."""
    w = rng.standard_normal((rows, k)).astype(np.float32)
    w *= np.exp(rng.uniform(-3, 3, (rows, 1))).astype(np.float32)
    if rows > 2:
        w[1] = 0
        w[2, : min(k, 32)] = 0
    if t == T.F32:
        return w.view(np.uint8)
    if t == T.F16:
        return w.astype(np.float16).view(np.uint8)
    return np.ascontiguousarray(kquant.quantize(w, t.name)).view(np.uint8)


def make_x(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, :: max(1, k // 7)] *= 20  # outliers, as activations have
    return x


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("n_tok", TOKENS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_ggml_mul_mat(ggml_cpu, qtype, n_tok):
    rng = np.random.default_rng([int(qtype), n_tok])
    taken = 0
    for rows, k in SHAPES:
        if k % 32 and qtype not in tinyblas.FLOAT_TYPES:
            continue  # not a whole number of blocks: no such weight
        wb = make_weights(qtype, rows, k, rng)
        x = make_x(n_tok, k, rng)
        if not tinyblas.applies(qtype, rows, k, n_tok):
            assert qtype in tinyblas.FLOAT_TYPES and (rows % 4 or k % 8)
            with pytest.raises(ValueError):
                tinyblas.matmul(wb, qtype, x)
            continue
        y = tinyblas.matmul(wb, qtype, x)
        ref = ggml_cpu.mul_mat(wb, qtype, k, x)
        assert same_bits(y, ref), (qtype.name, rows, k, n_tok,
                                   int((y.view(np.uint32) != ref.view(np.uint32)).sum()))
        taken += 1
    assert taken >= 10


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_slabs_chunks_and_threads(ggml_cpu, qtype, monkeypatch):
    """The result does not depend on the token chunk, the Q0 predecoding choice or the thread
    count: they only decide which elements are computed together."""
    rng = np.random.default_rng(int(qtype))
    rows, k, n = 68, 256, 23
    wb = make_weights(qtype, rows, k, rng)
    x = make_x(n, k, rng)
    ref = ggml_cpu.mul_mat(wb, qtype, k, x)
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for chunk, pre in [(64, 4), (5, 1), (2, 10 ** 9), (7, 6), (1, 1), (100, 30)]:
                monkeypatch.setattr(tinyblas, "TOKEN_CHUNK", chunk)
                if qtype in tinyblas.PREDECODE_TOKENS:
                    monkeypatch.setitem(tinyblas.PREDECODE_TOKENS, qtype, pre)
                assert same_bits(tinyblas.matmul(wb, qtype, x), ref), (threads, chunk, pre)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_large(ggml_cpu, qtype):
    rng = np.random.default_rng(100 + int(qtype))
    rows, k, n = 260, 2048, 37
    wb = make_weights(qtype, rows, k, rng)
    x = make_x(n, k, rng)
    assert same_bits(tinyblas.matmul(wb, qtype, x), ggml_cpu.mul_mat(wb, qtype, k, x))


def test_applies():
    for t in TYPES:
        assert tinyblas.applies(t, 4, 64, 2)
        assert tinyblas.applies(t.name, 8, 2048, 512)
        assert not tinyblas.applies(t, 4, 64, 1)          # one token: vec_dot
        assert not tinyblas.applies(t, 4, 64, 0)
    for t in (T.F32, T.F16, T.BF16):
        assert not tinyblas.applies(t, 6, 64, 8)          # rows % 4
        assert not tinyblas.applies(t, 1, 64, 8)
        assert not tinyblas.applies(t, 8, 36, 8)          # k % 8
        assert tinyblas.applies(t, 8, 40, 8)
    for t in (T.Q8_0, T.Q4_0, T.Q5_0, T.IQ4_NL):
        assert tinyblas.applies(t, 1, 32, 2)              # any rows
        assert tinyblas.applies(t, 67, 96, 3)
        assert not tinyblas.applies(t, 4, 48, 2)          # not whole blocks
    for t in ("Q4_1", "Q5_1", "Q4_K", "Q6_K", "Q8_K", "IQ4_XS", "nonsense", 999):
        assert not tinyblas.applies(t, 8, 256, 8)


def test_rejects():
    rng = np.random.default_rng(0)
    wb = make_weights(T.F32, 6, 64, rng)
    with pytest.raises(ValueError):
        tinyblas.matmul(wb, T.F32, make_x(4, 64, rng))     # rows % 4
    wb = make_weights(T.Q8_0, 4, 64, rng)
    with pytest.raises(ValueError):
        tinyblas.matmul(wb, T.Q8_0, make_x(1, 64, rng))    # one token
    with pytest.raises(ValueError):
        tinyblas.matmul(wb, T.Q8_0, make_x(2, 96, rng))    # k mismatch
    with pytest.raises(ValueError):
        tinyblas.matmul(wb, T.Q8_0, make_x(2, 64, rng).astype(np.float64))
    with pytest.raises(ValueError):
        tinyblas.matmul(make_weights(T.Q8_0, 4, 64, rng), "Q4_K", make_x(2, 256, rng))


def test_refused_shapes_take_another_order(ggml_cpu):
    """Where `applies` is false ggml computes in another order (its vec_dot path): F32 weights
    with rows % 4 != 0 or one token give other bits than tinyBLAS's order would."""
    rng = np.random.default_rng(7)
    k = 2048
    w = rng.standard_normal((8, k)).astype(np.float32)
    x = make_x(5, k, rng)
    mine = tinyblas.matmul(w.view(np.uint8), T.F32, x)
    ref6 = ggml_cpu.mul_mat(w[:6].view(np.uint8), T.F32, k, x)
    assert not same_bits(mine[:, :6].copy(), ref6)
    ref1 = ggml_cpu.mul_mat(w.view(np.uint8), T.F32, k, x[:1])
    assert not same_bits(mine[:1].copy(), ref1)
