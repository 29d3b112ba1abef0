"""kquant.matmul.tiled against ggml's real CPU MUL_MAT, which for >= 8 activation rows and
K-quant (or IQ4_XS, IQ3_XXS, IQ3_S) weights in a plain buffer runs llama.cpp's tiled kernel
(ggml-cpu/tiled/); and the IQ3 types' whole exact product (vec_dot below 8 rows) against it.

Against the library (skipped without it: set KQUANT_LIBGGML / KQUANT_LIBGGML_CPU): float32
results must be bit-identical.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.matmul import tiled

TYPES = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ3_XXS", "IQ3_S"]
SHAPES = [(8, 256), (17, 512), (33, 768), (70, 1536)]
TOKENS = [8, 9, 16, 37]


@pytest.fixture(scope="module")
def ggml():
    try:
        from kquant.reference.libggml import GGMLCompute
        return GGMLCompute()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _case(qtype, rows, k, n_tok, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    w[:, : k // 4] *= np.float32(4.0)  # uneven block scales
    wb = np.asarray(kquant.quantize(w, qtype))
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    return wb, x


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows,k", SHAPES)
@pytest.mark.parametrize("n_tok", TOKENS)
def test_bit_identical(ggml, qtype, rows, k, n_tok):
    wb, x = _case(qtype, rows, k, n_tok, rows * 1000 + k + n_tok)
    assert tiled.applies(T[qtype], rows, k, n_tok)
    ref = ggml.mul_mat(wb, T[qtype], k, x)
    got = tiled.matmul(wb, T[qtype], x)
    assert got.shape == (n_tok, rows) and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_applies():
    assert tiled.applies(T.Q6_K, 64, 4096, 8)
    assert not tiled.applies(T.Q6_K, 64, 4096, 7)
    assert not tiled.applies(T.Q4_K, 64, 4096, 1)
    assert not tiled.applies(T.Q4_K, 64, 4096, 32, repacked=True)
    assert not tiled.applies(T.Q4_0, 64, 4096, 32)
    assert not tiled.applies(T.Q8_0, 64, 4096, 32)
    assert not tiled.applies(T.IQ4_NL, 64, 4096, 32)
    for q in TYPES:
        assert tiled.applies(T[q], 8, 256, 37)


def test_applies_env(monkeypatch):
    monkeypatch.setenv("GGML_CPU_TILED_MM", "0")
    assert not tiled.applies(T.Q6_K, 64, 4096, 32)
    monkeypatch.delenv("GGML_CPU_TILED_MM")
    monkeypatch.setenv("GGML_CPU_TILED_MM_FORCE", "1")
    assert tiled.applies(T.Q6_K, 64, 4096, 2)


def _edge_rows(rng, rows: int, k: int) -> np.ndarray:
    """Weights over 6 decades of scale with heavy tails, an all-zero row, zero super-blocks, an
    outlier, a constant row and one of alternating signs."""
    w = (rng.standard_t(2, size=(rows, k)) * 10.0 ** rng.uniform(-4, 2, size=(rows, 1)))
    w = w.astype(np.float32)
    w[1] = 0.0
    w[2, :256] = 0.0
    w[3, -256:] = 0.0
    w[4, k // 3] = 1e4
    w[5] = 0.5
    w[6] = np.where(np.arange(k) % 2, 1.0, -1.0)
    return w


@pytest.mark.parametrize("qtype", ["IQ3_XXS", "IQ3_S"])
def test_iq3_exact_products_are_ggml_mul_mat(ggml, qtype):
    """kquant.matmul.exact's product for IQ3 weights (ggml's vec_dot per row and token below 8
    tokens, the tiled kernel from 8) equals ggml's whole MUL_MAT on 1 and 2 threads, bit for
    bit: 67 rows of edge data (tests/test_matmul_cpu.py checks the vec_dot kernels alone)."""
    from kquant.matmul.exact import ExactMatrix

    rng = np.random.default_rng(16 + len(qtype))
    k = 768
    wb = np.asarray(kquant.quantize(_edge_rows(rng, 67, k), qtype))
    m = ExactMatrix(wb, T[qtype])
    checked = 0
    for n_tok in (1, 2, 3, 7, 8, 9, 33):
        x = (rng.standard_t(3, size=(n_tok, k)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
        x[0, :256] = 0.0                                      # an all-zero activation block
        if n_tok > 2:
            x[2] = 0.0
        ours = m(x)
        for threads in (1, 2):
            ref = ggml.mul_mat(wb, T[qtype], k, x, threads)
            np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32),
                                          err_msg=f"{n_tok} tokens, {threads} threads")
            checked += ref.size
    assert checked == 2 * 67 * 63
