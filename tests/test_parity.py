"""kquant against llama.cpp's libggml itself, byte for byte (skipped without llama-cpp-python)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from cases import CASES, IMATRIX_MODES, make_case, make_imatrix

ALL_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K,
             T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.BF16, T.F32, T.IQ4_NL, T.IQ4_XS,
             T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M]
#: ggml aborts (GGML_ASSERT) on these cases' rows for the IQ3 / IQ2 types, and for IQ1_M
#: without an imatrix: kquant raises instead, checked in test_iq3.py / test_iq2.py /
#: test_iq1.py against ggml in a subprocess
ABORTS = {T.IQ3_XXS: {"non_finite"}, T.IQ3_S: {"non_finite"}, T.IQ2_XS: {"non_finite"},
          T.IQ2_S: {"non_finite"}}
ABORTS_WITHOUT_IMATRIX = {T.IQ1_M: {"non_finite"}}
#: ggml requires an imatrix for these (ggml_quantize_requires_imatrix; kquant refuses:
#: test_iq2.py, test_iq1.py)
NEEDS_IMATRIX = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}
ROW_LENGTHS = (256, 512, 2304)
ROWS = 24


def assert_same_as_ggml(ggml, x, qtype, imatrix, what):
    got = kquant.quantize(x, qtype, imatrix)
    want = ggml.quantize(x, qtype, imatrix)
    assert got.shape == want.shape, what
    bad = np.nonzero((got != want).any(axis=-1))[0]
    assert bad.size == 0, f"{what}: {bad.size} of {got.shape[0]} rows differ (first: row {bad[0]})"
    # dequantize the reference bytes both ways: every float bit equal (NaN payloads too)
    back, ref = kquant.dequantize(want, qtype), ggml.dequantize(want, qtype)
    assert np.array_equal(back.view(np.uint32), ref.view(np.uint32)), f"{what}: dequantize"


def lengths_for(qtype):
    block = kquant.get_codec(qtype).block_size
    extra = (96,) if block == 32 else ()
    return [n for n in ROW_LENGTHS + extra if n % block == 0]


def modes_for(qtype):
    return [m for m in IMATRIX_MODES if m != "none" or qtype not in NEEDS_IMATRIX]


def aborts(qtype, case, imatrix):
    return case in ABORTS.get(qtype, ()) or (
        imatrix is None and case in ABORTS_WITHOUT_IMATRIX.get(qtype, ()))


PARAMS = [pytest.param(t, n, mode, id=f"{t.name}-{n}-{mode}")
          for t in ALL_TYPES for n in lengths_for(t) for mode in modes_for(t)]


@pytest.mark.parametrize("qtype,n,mode", PARAMS)
def test_synthetic_rows(ggml, qtype, n, mode):
    imatrix = make_imatrix(mode, n, seed=n)
    for i, case in enumerate(CASES):
        if aborts(qtype, case, imatrix):
            continue
        x = make_case(case, ROWS, n, seed=1000 * n + i)
        with np.errstate(all="ignore"):
            assert_same_as_ggml(ggml, x, qtype, imatrix, f"{qtype.name} {case} n={n} {mode}")


@pytest.mark.parametrize("qtype,mode", [pytest.param(t, m, id=f"{t.name}-{m}")
                                        for m in IMATRIX_MODES for t in ALL_TYPES
                                        if m in modes_for(t)])
def test_real_weights(ggml, smollm2_weights, qtype, mode):
    if mode not in modes_for(qtype):
        pytest.skip("ggml requires an imatrix")
    for name, w in smollm2_weights.items():
        imatrix = make_imatrix(mode, w.shape[1], seed=7)
        assert_same_as_ggml(ggml, w, qtype, imatrix, f"{qtype.name} {name} {mode}")


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q4_0, T.IQ4_NL, T.IQ4_XS, T.IQ3_XXS, T.IQ3_S,
                                   T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M], ids=lambda t: t.name)
def test_shapes_and_threads_do_not_change_bytes(ggml, qtype):
    x = make_case("gauss", 30, 512, seed=3).reshape(3, 10, 512)
    w = make_imatrix("random", 512)
    flat = ggml.quantize(x.reshape(-1, 512), qtype, w)
    for n_threads in (1, 2, None):
        got = kquant.quantize(x, qtype, w, n_threads=n_threads)
        assert got.shape == (3, 10, flat.shape[-1])
        assert np.array_equal(got.reshape(flat.shape), flat)
    one_row = kquant.quantize(x[0, 0], qtype, w)
    assert one_row.shape == (flat.shape[-1],) and np.array_equal(one_row, flat[0])


IQ4_STRESS = ["table_points", "near_eps", "overflow", "scattered_non_finite", "row_scales"]


def _iq4_stress_rows(rng, kind, n):
    """Rows aimed at quantize_row_iq4_nl_impl's edges: values on the table's points and
    midpoints (best_index_int8's ties), sub-blocks around GROUP_MAX_EPS, x^2 overflowing
    the weights, scattered non-finite values, wildly different row scales."""
    x = rng.standard_normal((16, n)).astype(np.float32)
    if kind == "table_points":
        from kquant.codecs.iq4 import KVALUES_IQ4NL, THRESHOLDS
        pts = np.concatenate([np.array(KVALUES_IQ4NL, np.float32), THRESHOLDS])
        x = rng.choice(pts, (16, n)).astype(np.float32) * rng.choice([1, 0.5, 0.25], (16, 1)).astype(np.float32)
    elif kind == "near_eps":
        x *= np.float32(10.0) ** rng.uniform(-17, -13, (16, n // 32)).repeat(32, axis=1).astype(np.float32)
    elif kind == "overflow":
        x *= np.float32(10.0) ** rng.uniform(18, 38, (16, 1)).astype(np.float32)
    elif kind == "scattered_non_finite":
        m = rng.random((16, n)) < 0.03
        x[m] = rng.choice(np.array([np.inf, -np.inf, np.nan, -0.0], np.float32), m.sum())
    elif kind == "row_scales":
        x *= np.exp(rng.uniform(-30, 30, (16, 1))).astype(np.float32)
    return x


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
@pytest.mark.parametrize("kind", IQ4_STRESS)
def test_iq4_edges(ggml, qtype, kind):
    rng = np.random.default_rng(IQ4_STRESS.index(kind))
    x = _iq4_stress_rows(rng, kind, 768)
    base = (rng.random(768) * rng.exponential(1.0, 768)).astype(np.float32)
    for w in (None, base, base * np.float32(1e30), base * np.float32(1e-30)):
        with np.errstate(all="ignore"):
            assert_same_as_ggml(ggml, x, qtype, w, f"{qtype.name} {kind}")


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
def test_iq4_dequantize_any_bytes(ggml, qtype):
    """Every block ggml could be handed (random bytes: NaN and inf scales, all 6-bit scales)
    decodes to the same float bits."""
    size = kquant.get_codec(qtype).type_size
    q = np.random.default_rng(5).integers(0, 256, (64, 8 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        got, want = kquant.dequantize(q, qtype), ggml.dequantize(q, qtype)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
