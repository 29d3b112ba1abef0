"""kquant.matmul.tiled against ggml's real CPU MUL_MAT, which for >= 8 activation rows and
K-quant (or IQ4_XS) weights in a plain buffer runs llama.cpp's tiled kernel (ggml-cpu/tiled/).

Against the library (skipped without it: set KQUANT_LIBGGML / KQUANT_LIBGGML_CPU): float32
results must be bit-identical.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.matmul import tiled

TYPES = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS"]
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
