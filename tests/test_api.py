"""The public codec API: argument handling, clear errors, shapes and round-trip accuracy."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

import kquant

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
         "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
         "F16", "BF16", "F32"]
#: ggml quantizes these only with an imatrix: their round trip uses a flat one
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}

# relative RMS error of a Gaussian matrix after a round trip, without imatrix: about 1.2x
# what each type gives (Q4_K: 0.071; IQ1_S with a uniform imatrix 0.48, IQ1_M 0.60), so a
# wrong scale or level layout fails
RMSE_LIMIT = {"Q2_K": 0.35, "Q3_K": 0.18, "Q4_K": 0.085, "Q5_K": 0.045, "Q6_K": 0.021,
              "Q8_K": 0.0085, "Q4_0": 0.105, "Q4_1": 0.095, "Q5_0": 0.052, "Q5_1": 0.046,
              "Q8_0": 0.0065, "IQ4_NL": 0.093, "IQ4_XS": 0.093, "IQ3_XXS": 0.26,
              "IQ3_S": 0.2, "IQ2_XXS": 0.41, "IQ2_XS": 0.36, "IQ2_S": 0.32, "IQ1_S": 0.58,
              "IQ1_M": 0.72, "F16": 2.5e-4, "BF16": 2e-3,
              "F32": 0.0}


def gauss(rows=8, n=512, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, n), dtype=np.float32)


@pytest.mark.parametrize("name", TYPES)
def test_round_trip_shape_size_and_error(name):
    x = gauss()
    q = kquant.quantize(x, name, np.ones(512, np.float32) if name in NEEDS_IMATRIX else None)
    block, size = GGML_QUANT_SIZES[T[name]]
    assert q.dtype == np.uint8 and q.shape == (8, 512 // block * size)
    y = kquant.dequantize(q, name)
    assert y.dtype == np.float32 and y.shape == x.shape
    rel = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    assert rel <= RMSE_LIMIT[name], f"{name}: relative rmse {rel:.4f}"


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_1", "IQ4_NL",
                                  "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_S", "IQ1_M"])
def test_imatrix_lowers_weighted_error(name):
    """The imatrix is used: error weighted by it is lower with it than without."""
    x = gauss(16, 1024, seed=1)
    w = np.random.default_rng(2).exponential(1.0, 1024).astype(np.float32) ** 3
    err = {}
    for use in (False, True):
        without = np.ones(1024, np.float32) if name in NEEDS_IMATRIX else None
        y = kquant.dequantize(kquant.quantize(x, name, w if use else without), name)
        err[use] = float((w * (y - x) ** 2).sum())
    assert err[True] < err[False]


@pytest.mark.parametrize("qtype", [T.Q4_K, "Q4_K", "q4_k", int(T.Q4_K), np.int32(T.Q4_K)])
def test_type_by_enum_name_or_number(qtype):
    x = gauss(2, 256)
    assert np.array_equal(kquant.quantize(x, qtype), kquant.quantize(x, T.Q4_K))
    assert kquant.get_codec(qtype).qtype == T.Q4_K


def test_leading_dimensions_are_kept():
    x = gauss(6, 256).reshape(2, 3, 256)
    q = kquant.quantize(x, "Q6_K")
    assert q.shape == (2, 3, 210)
    assert kquant.dequantize(q, "Q6_K").shape == (2, 3, 256)
    assert kquant.quantize(x[0, 0], "Q6_K").shape == (210,)


def test_non_contiguous_input_is_the_same_as_contiguous():
    big = gauss(8, 1024)
    view = big[::2, 256:768]
    assert np.array_equal(kquant.quantize(view, "Q5_K"),
                          kquant.quantize(np.ascontiguousarray(view), "Q5_K"))


def test_f16_dequantize_reads_float16_arrays():
    h = gauss(3, 64).astype(np.float16)
    assert np.array_equal(kquant.dequantize(h, "F16"), h.astype(np.float32))
    assert np.array_equal(kquant.quantize(h.astype(np.float32), "F16").view(np.float16), h)


def test_imatrix_is_ignored_where_ggml_ignores_it():
    x, w = gauss(2, 256), np.arange(256, dtype=np.float32)
    for name in ("Q8_0", "Q8_K", "F16", "BF16", "F32"):
        assert np.array_equal(kquant.quantize(x, name, w), kquant.quantize(x, name))


def test_codec_registry():
    assert set(TYPES) == {c.name for c in kquant.CODECS.values()}
    c = kquant.get_codec("Q3_K")
    assert (c.block_size, c.type_size, c.row_bytes(512)) == (256, 110, 220)


@pytest.mark.parametrize("bad_type", ["Q4_K_M", "TQ1_0", "nonsense", 99, 3.5, None])
def test_unknown_type(bad_type):
    with pytest.raises(ValueError, match="type"):
        kquant.quantize(gauss(1, 256), bad_type)
    with pytest.raises(ValueError, match="type"):
        kquant.dequantize(np.zeros((1, 144), np.uint8), bad_type)


@pytest.mark.parametrize("x, match", [
    ([1.0] * 256, "numpy"),
    (np.zeros((2, 256), np.float64), "float32"),
    (np.zeros((2, 256), np.float16), "float32"),
    (np.zeros((2, 256), np.int32), "float32"),
    (np.array(1.0, np.float32), "dimension"),
    (np.zeros((2, 0), np.float32), "multiple of 256"),
    (np.zeros((2, 300), np.float32), "multiple of 256"),
    (np.zeros((2, 128), np.float32), "got rows of 128"),
])
def test_bad_rows(x, match):
    with pytest.raises(ValueError, match=match):
        kquant.quantize(x, "Q4_K")


def test_legacy_block_is_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        kquant.quantize(np.zeros((1, 48), np.float32), "Q4_0")
    assert kquant.quantize(np.zeros((1, 96), np.float32), "Q4_0").shape == (1, 54)


@pytest.mark.parametrize("w, match", [
    (np.ones(255, np.float32), r"shape \(256,\)"),
    (np.ones((2, 256), np.float32), r"shape \(256,\)"),
    (np.ones(256, np.int64), "float32"),
])
def test_bad_imatrix(w, match):
    with pytest.raises(ValueError, match=match):
        kquant.quantize(gauss(2, 256), "Q4_K", w)


def test_float64_imatrix_is_converted():
    x, w = gauss(2, 256), np.linspace(0.1, 2, 256)
    assert np.array_equal(kquant.quantize(x, "Q4_K", w),
                          kquant.quantize(x, "Q4_K", w.astype(np.float32)))


@pytest.mark.parametrize("n_threads", [0, -1, 1.5, "2"])
def test_bad_thread_count(n_threads):
    with pytest.raises(ValueError, match="n_threads"):
        kquant.quantize(gauss(2, 256), "Q4_K", n_threads=n_threads)


def test_dequantize_rejects_partial_blocks():
    with pytest.raises(ValueError, match="144-byte blocks"):
        kquant.dequantize(np.zeros((2, 100), np.uint8), "Q4_K")
    with pytest.raises(ValueError, match="numpy array"):
        kquant.dequantize(b"\0" * 144, "Q4_K")


def test_nan_and_inf_do_not_crash():
    """ggml quantizes non-finite values too (test_parity checks the bytes); here: no error
    and finite rows stay finite around them."""
    x = gauss(4, 256)
    x[0, 3], x[1, 200] = np.nan, np.inf
    for name in ("Q4_K", "Q6_K", "Q8_0"):
        with np.errstate(all="ignore"):
            y = kquant.dequantize(kquant.quantize(x, name), name)
        assert np.isfinite(y[2:]).all()
