"""The grid i-quants' products (IQ2_XXS, IQ2_XS, IQ2_S: kquant.matmul.iq2; IQ1_S, IQ1_M:
kquant.matmul.iq1; their grids: kquant.matmul.iq_grids) against llama.cpp's libggml, bit for bit:

1. the grid tables are ggml-common.h's (parsed from llama.cpp's header, conftest.llama_cpp_file,
   where it can be had; their SHA-256 always);
2. the block kernels give ggml's AVX2 vec_dot (ggml_get_type_traits_cpu) float32 bits, on
   weights quantized by ggml_quantize_chunk with an importance matrix (the IQ2 / IQ1 codecs
   live in kquant.codecs.iq2 / iq1), random and heavy-tailed rows, all-zero blocks, 1 / 3 / 7
   tokens, on 1 and 2 threads;
3. ggml's MUL_MAT (1 and 2 threads): vec_dot below 8 tokens, the tiled kernel from 8
   (kquant.matmul.tiled), through kquant.matmul.exact.ExactMatrix;
4. the generic (non-AVX2) vector IR gives the same bits.
Skips without llama-cpp-python's libraries.
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import llama_cpp_file  # noqa: E402
from kquant.matmul import cpu, iq_grids, matmul, quantize_activations, tiled  # noqa: E402
from kquant.matmul.exact import ExactMatrix  # noqa: E402

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]


@pytest.fixture(scope="module")
def ggml_cpu():
    from kquant.reference import find_libggml_cpu
    from kquant.reference.ggml_cpu import ggml_cpu as get

    if find_libggml_cpu() is None:
        pytest.skip("llama.cpp's libggml-cpu not found: pip install -e '.[interop]'")
    return get()


@pytest.fixture(scope="module")
def compute():
    try:
        from kquant.reference.libggml import GGMLCompute
        return GGMLCompute()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _header() -> Path | None:
    """ggml-common.h of llama.cpp 0.3.36's source (conftest.llama_cpp_file), or None."""
    return llama_cpp_file("ggml/src/ggml-common.h")


@pytest.mark.parametrize("name", ["iq2xxs_grid", "iq2xs_grid", "iq2s_grid", "iq1s_grid"])
def test_grids_are_ggml_common(name):
    table = getattr(iq_grids, name.upper())
    digest = hashlib.sha256(table.astype("<u8").tobytes()).hexdigest()
    assert digest == iq_grids.SHA256[name]
    header = _header()
    if header is None:
        return
    m = re.search(r"GGML_TABLE_BEGIN\(\w+, " + name + r",[^)]*\)(.*?)GGML_TABLE_END",
                  header.read_text(), re.S)
    theirs = np.array([int(v, 16) for v in re.findall(r"0x[0-9a-fA-F]+", m.group(1))], np.uint64)
    assert np.array_equal(theirs, table)


def test_even_signs_are_ksigns_iq2xs():
    header = _header()
    if header is None:
        pytest.skip("ggml-common.h not found")
    m = re.search(r"GGML_TABLE_BEGIN\(uint8_t, ksigns_iq2xs, 128\)(.*?)GGML_TABLE_END",
                  header.read_text(), re.S)
    ks = np.array([int(v) for v in re.findall(r"\d+", m.group(1))], np.int64)
    signs = iq_grids.KSIGNS_Q2XS.view(np.int8).reshape(128, 8)
    assert np.array_equal(np.where(signs < 0, 1, 0) @ (1 << np.arange(8)), ks)


def _weights(ggml, name: str, x: np.ndarray, rng) -> np.ndarray:
    """ggml_quantize_chunk's blocks (IQ2_XXS / IQ2_XS / IQ1_S need an importance matrix: every
    type gets one)."""
    imatrix = (rng.random(x.shape[1]) ** 2 + 0.05).astype(np.float32)
    return ggml.quantize(x, T[name], imatrix)


def _rows(rng, rows: int, k: int) -> np.ndarray:
    """Heavy-tailed rows over 4 decades of scale, one all zero, one with a zero block, an
    outlier."""
    x = rng.standard_t(3, size=(rows, k)) * 10.0 ** rng.uniform(-3, 1, size=(rows, 1))
    x = x.astype(np.float32)
    x[1] = 0.0
    x[2, :256] = 0.0
    x[3, k // 2] = 1e3
    return x


@pytest.mark.parametrize("name", TYPES)
def test_bits_are_ggml_vec_dot(name, ggml, ggml_cpu):
    rng = np.random.default_rng(200 + TYPES.index(name))
    checked = 0
    for k in (256, 512, 2304):
        w = _weights(ggml, name, _rows(rng, 37, k), rng)
        for n_tok in (1, 3, 7):
            x = (rng.standard_t(3, size=(n_tok, k)) * 10.0 ** rng.uniform(-2, 2)).astype(np.float32)
            if n_tok > 1:
                x[1, :256] = 0.0
            if n_tok > 2:
                x[2] = 0.0
            act = quantize_activations(x, name)
            g = ggml_cpu.vec_dot_rows(w, T[name], act.data)
            assert np.count_nonzero(g[0]) > 37 // 2
            for threads in (1, 2):
                y = matmul(w, name, act, n_threads=threads)
                diff = y.view(np.uint32) != g.view(np.uint32)
                assert not diff.any(), (name, k, n_tok, threads, int(diff.sum()))
                checked += y.size
    assert checked == 2 * 37 * 11 * 3


@pytest.mark.parametrize("name", TYPES)
def test_mul_mat_is_ggml(name, ggml, compute):
    """ExactMatrix: vec_dot below 8 tokens, ggml's tiled kernel from 8 (tiled.cpp unpacks
    these types too), against ggml's MUL_MAT on 1 and 2 threads."""
    rng = np.random.default_rng(300 + TYPES.index(name))
    for rows, k, n_tok in [(8, 256, 8), (17, 512, 9), (33, 768, 16), (21, 1536, 37),
                           (13, 512, 3), (9, 2304, 1)]:
        wf = rng.standard_normal((rows, k)).astype(np.float32)
        wf[:, : k // 4] *= np.float32(4.0)
        wb = _weights(ggml, name, wf, rng)
        x = rng.standard_normal((n_tok, k)).astype(np.float32)
        assert tiled.applies(T[name], rows, k, n_tok) == (n_tok >= 8)
        got = ExactMatrix(wb, T[name])(x)
        for threads in (1, 2):
            ref = compute._run(lambda ctx, t: compute.base.ggml_mul_mat(ctx, t[0], t[1]),
                               [(int(T[name]), (k, rows), wb), (0, (k, n_tok), x)],
                               (n_tok, rows), threads=threads)
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_exact_math(name, ggml):
    """Against ggml's dequantize_row_* times the Q8_K values in float64: only float32
    roundings apart (blocks + 10 of them, each at most u times the sum of |terms|)."""
    rng = np.random.default_rng(400 + TYPES.index(name))
    k = 512
    w = _weights(ggml, name, _rows(rng, 11, k), rng)
    x = rng.standard_normal((3, k)).astype(np.float32)
    act = quantize_activations(x, name)
    y = matmul(w, name, act).astype(np.float64)
    wd = ggml.dequantize(w, T[name]).astype(np.float64)
    xq = (act.qs.reshape(3, -1, 256) * act.d[:, :, None].astype(np.float64)).reshape(3, k)
    bound = (k // 256 + 10) * 2.0 ** -24 * (np.abs(xq) @ np.abs(wd).T) + 1e-30
    assert np.all(np.abs(y - xq @ wd.T) <= bound)


def test_generic_vector_ir(monkeypatch, ggml):
    """Without AVX2 / F16C the kernels (recompiled) give the same bits."""
    from numba import njit

    from kquant.matmul import simd

    monkeypatch.setattr(simd, "HAS_AVX2", False)
    monkeypatch.setattr(simd, "HAS_F16C", False)
    rng = np.random.default_rng(6)
    for name in TYPES:
        w = _weights(ggml, name, rng.standard_normal((4, 512)).astype(np.float32), rng)
        act = quantize_activations(rng.standard_normal((2, 512)).astype(np.float32), name)
        kernel = cpu.kernel(name)
        want = np.empty((2, 4), np.float32)
        kernel(w, act.qs, act.d, act.sums, want)
        opts = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}
        got = np.empty_like(want)
        njit(**{**opts, "cache": False})(kernel.py_func)(w, act.qs, act.d, act.sums, got)
        assert np.array_equal(got, want), name


def test_pdep_fallback_is_bmi2s():
    """The grid kernels' index packing without BMI2 (a bit loop) gives pdep's bits."""
    from numba import njit

    from kquant.matmul import iq2

    rng = np.random.default_rng(7)
    xs = rng.integers(0, 2 ** 32, 200, dtype=np.int64)
    generic = njit(lambda x, m: iq2._pdep_generic(x, m))
    for mask in (0x00FF00FF00FF00FF, 0x0700070007000700, 0x0F000F000F000F00):
        want = [generic(int(x), mask) for x in xs]
        assert want[0] >= 0
        if iq2.HAS_BMI2:
            native = njit(lambda x, m: iq2._pdep_bmi2(x, m))
            assert [native(int(x), mask) for x in xs] == want
        ref = []
        for x in xs:
            out, k = 0, 0
            for b in range(64):
                if (mask >> b) & 1:
                    out |= ((int(x) >> k) & 1) << b
                    k += 1
            ref.append(out)
        assert want == ref
