"""The thread count changes no result: kquant-perplexity's chunks and kquant-imatrix's file are
the same for -t 1, 2 and 3 (kquant.runtime.gemm fixes the float order of the products).

Before, OpenBLAS's own threading split some products by thread count: SmolLM2 Q4_K_M over 3
chunks of wiki.test.raw printed [1]13.1531,[2]22.4292,[3]23.3315 with -t 1 and
[1]13.1321,[2]22.4836,[3]23.3878 with -t 2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kquant.runtime import gemm
from kquant.runtime.device import set_threads

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "data" / "calibration.txt"
TINY_HF = ROOT / "data" / "tiny-llama"


def test_products_do_not_depend_on_the_thread_count():
    """The shapes OpenBLAS split differently on 1 and 2 threads (attention's probabilities
    times values at 510 keys: 63% of the values moved), and a linear layer's."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal((3, 384, 510)).astype(np.float32)
    v = rng.standard_normal((3, 510, 64)).astype(np.float32)
    x = rng.standard_normal((510, 576)).astype(np.float32)
    w = rng.standard_normal((1536, 576)).astype(np.float32)
    results = []
    try:
        for t in (1, 2, 3):
            set_threads(t)
            results.append((gemm.batched_matmul(s, v), gemm.matmul_nt(x, w)))
    finally:
        set_threads(None)
    for a, b in results[1:]:
        assert np.array_equal(a, results[0][0]) and np.array_equal(b, results[0][1])
    np.testing.assert_allclose(results[0][1], x @ w.T, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_q4_k_m(tmp_path_factory, tiny_llama_f32):
    from kquant import QuantizeOptions, quantize_model

    path = tmp_path_factory.mktemp("threads") / "tiny-Q4_K_M.gguf"
    quantize_model(tiny_llama_f32, path, "Q4_K_M", QuantizeOptions(), progress=False)
    return path


def test_perplexity_is_the_same_for_any_thread_count(capsys, tiny_q4_k_m):
    """3 chunks of 512 in one batch: physical batches of 170 tokens per sequence, attention
    over 170, 340 and 510 keys (the old threaded BLAS printed [1]160.4754 with -t 1 and
    [1]160.4629 with -t 2 here)."""
    from kquant.cli.perplexity import main

    outs = []
    for t in ("1", "2", "3"):
        assert main(["-m", str(tiny_q4_k_m), "-f", str(CALIB), "--chunks", "3",
                     "-t", t, "--no-progress"]) == 0
        outs.append(capsys.readouterr().out.splitlines()[:2])  # chunks and final estimate
    assert outs[0] == outs[1] == outs[2]


def test_imatrix_is_the_same_for_any_thread_count(tmp_path, capsys):
    from kquant.cli.imatrix import main

    files = []
    for t in ("1", "2"):
        out = tmp_path / f"t{t}.gguf"
        assert main(["-m", str(TINY_HF), "-f", str(CALIB), "-o", str(out), "-c", "256",
                     "--chunks", "6", "-t", t, "--device", "cpu"]) == 0
        files.append(out.read_bytes())
    capsys.readouterr()
    assert files[0] == files[1]
