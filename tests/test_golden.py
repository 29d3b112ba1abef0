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

DATA = Path(__file__).parent / "data"
#: each golden file (tools/make_golden.py's FILES) and the types it holds
FILES = {
    "golden": {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
               T.Q8_0, T.F16, T.BF16, T.F32},
    "golden_iq": {T.IQ4_NL, T.IQ4_XS},
    "golden_iq3": {T.IQ3_XXS, T.IQ3_S},
    "golden_iq2": {T.IQ2_XXS, T.IQ2_XS, T.IQ2_S},
    "golden_iq1": {T.IQ1_S, T.IQ1_M},
}
_LOADED: dict[str, dict[str, np.ndarray]] = {}


def load(name: str) -> dict[str, np.ndarray]:
    if name not in _LOADED:
        with np.load(DATA / f"{name}.npz") as z:
            _LOADED[name] = {k: z[k] for k in z.files}
    return _LOADED[name]


def golden_keys():
    return [(name, k) for name in FILES for k in sorted(load(name)) if "-" in k]


@pytest.mark.parametrize("name", list(FILES))
def test_golden_file_is_complete(name):
    golden = load(name)
    meta = json.loads(str(golden["meta"]))
    assert meta["llama_cpp_python"] == "0.3.36"
    types = {k.split("-")[0] for k in golden if "-" in k}
    assert types == {t.name for t in FILES[name]}
    cases = set(golden["case"])
    assert {"gauss", "outliers", "zero_const", "non_finite", "smollm2_ffn_down"} <= cases


def test_golden_files_share_their_inputs():
    first, *others = FILES
    for name in others:
        for k in ("x", "case", "imatrix_random", "imatrix_with_zeros"):
            assert load(name)[k].tobytes() == load(first)[k].tobytes(), (name, k)


@pytest.mark.parametrize("name,key", golden_keys(), ids=lambda v: v)
def test_quantize_matches_golden(name, key):
    golden = load(name)
    qtype, mode = key.split("-")
    imatrix = golden.get(f"imatrix_{mode}")
    x, want = golden["x"], golden[key]
    # the rows ggml aborted on (IQ3 / IQ2, IQ1_M without an imatrix: inf / NaN values): kquant
    # refuses each of them
    aborted = json.loads(str(golden["meta"])).get("aborted_rows", {}).get(key, [])
    for r in aborted:
        with np.errstate(all="ignore"), pytest.raises(ValueError, match="cannot be quantized"):
            kquant.quantize(x[r:r + 1], qtype, imatrix)
    rows = np.setdiff1d(np.arange(x.shape[0]), aborted)
    with np.errstate(all="ignore"):
        got = kquant.quantize(x[rows], qtype, imatrix)
    bad = rows[np.nonzero((got != want[rows]).any(axis=-1))[0]]
    assert bad.size == 0, f"{key}: rows {bad.tolist()} ({set(golden['case'][bad])}) differ"


def decoded_keys():
    """Each type's set whose decoding meta digests: `-none`, or `-random` where there is no
    `-none` (IQ2_XXS, IQ2_XS, IQ1_S: ggml requires an imatrix)."""
    keys = golden_keys()
    return [(n, k) for n, k in keys if k.endswith("-none") or (
        k.endswith("-random") and (n, k.replace("-random", "-none")) not in keys)]


@pytest.mark.parametrize("name,key", decoded_keys(), ids=lambda v: v)
def test_dequantize_matches_golden(name, key):
    """ggml's decoding of the reference bytes, float bit for float bit (as a digest)."""
    golden = load(name)
    qtype = key.split("-")[0]
    y = kquant.dequantize(golden[key], qtype)
    assert y.shape == golden["x"].shape and y.dtype == np.float32
    want = json.loads(str(golden["meta"]))["dequantize_sha256"][qtype]
    assert hashlib.sha256(y.view(np.uint32).tobytes()).hexdigest() == want
