"""kquant against bytes libggml produced once (tools/make_golden.py): exactness checked even
where llama-cpp-python is not installed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant

GOLDEN = Path(__file__).parent / "data" / "golden.npz"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


def golden_keys():
    with np.load(GOLDEN) as z:
        return sorted(k for k in z.files if "-" in k)


def test_golden_file_is_complete(golden):
    meta = json.loads(str(golden["meta"]))
    assert meta["llama_cpp_python"] == "0.3.36"
    types = {k.split("-")[0] for k in golden if "-" in k}
    assert types == {t.name for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K, T.Q4_0,
                                      T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.BF16, T.F32)}
    cases = set(golden["case"])
    assert {"gauss", "outliers", "zero_const", "non_finite", "smollm2_ffn_down"} <= cases


@pytest.mark.parametrize("key", golden_keys())
def test_quantize_matches_golden(golden, key):
    name, mode = key.split("-")
    imatrix = golden.get(f"imatrix_{mode}")
    x, want = golden["x"], golden[key]
    with np.errstate(all="ignore"):
        got = kquant.quantize(x, name, imatrix)
    bad = np.nonzero((got != want).any(axis=-1))[0]
    assert bad.size == 0, f"{key}: rows {bad.tolist()} ({set(golden['case'][bad])}) differ"


@pytest.mark.parametrize("key", [k for k in golden_keys() if k.endswith("-none")])
def test_dequantize_matches_golden(golden, key):
    """ggml's decoding of the reference bytes, float bit for float bit (as a digest)."""
    name = key.split("-")[0]
    y = kquant.dequantize(golden[key], name)
    assert y.shape == golden["x"].shape and y.dtype == np.float32
    want = json.loads(str(golden["meta"]))["dequantize_sha256"][name]
    assert hashlib.sha256(y.view(np.uint32).tobytes()).hexdigest() == want
