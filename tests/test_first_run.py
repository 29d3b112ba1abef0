"""A user's first run: the codecs' row threads (kquant.codecs.threads) and the up-front,
side-by-side compilation with its one line (kquant.codecs.warm).

The cold runs use an empty NUMBA_CACHE_DIR of their own in a child process, so they compile
as a fresh install would (Q8_0 and F16's kernels: a few seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kquant
from kquant.codecs import CODECS
from kquant.codecs.threads import for_row_slices
from kquant.codecs.warm import Unit, _shares, is_cached

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "tiny-llama"


@pytest.mark.parametrize("n_rows,threads", [(0, 2), (1, 4), (5, 2), (7, 3), (64, 2), (3, 1)])
def test_row_slices_cover_every_row_once(n_rows, threads):
    seen = np.zeros(n_rows, np.int64)
    slices = []

    def work(a, b):
        slices.append((a, b))
        seen[a:b] += 1

    for_row_slices(n_rows, work, threads)
    assert (seen == 1).all()
    assert all(a < b for a, b in slices) and len(slices) <= max(1, min(threads, n_rows))


def test_row_slices_raise_the_first_error_after_all_stop():
    done = []

    def work(a, b):
        if a == 0:
            raise ValueError("row 0")
        done.append(a)

    with pytest.raises(ValueError, match="row 0"):
        for_row_slices(8, work, 4)
    assert sorted(done) == [2, 4, 6]  # the other slices ran to the end


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q4_0", "IQ4_XS", "F16"])
def test_bytes_do_not_depend_on_threads(name):
    x = np.random.default_rng(3).standard_normal((37, 512)).astype(np.float32)
    w = np.random.default_rng(4).random(512).astype(np.float32) + 0.1
    ref = kquant.quantize(x, name, imatrix=w, n_threads=1)
    for n in (2, 3):
        assert np.array_equal(kquant.quantize(x, name, imatrix=w, n_threads=n), ref)
    assert np.array_equal(kquant.dequantize(ref, name, n_threads=2), kquant.dequantize(ref, name, n_threads=1))


def test_a_failing_row_is_named_across_slices():
    x = np.random.default_rng(5).standard_normal((9, 256)).astype(np.float32)
    x[7, 3] = np.nan
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="IQ3_XXS: row 7 cannot be quantized"):
        kquant.quantize(x, "IQ3_XXS", n_threads=2)


def test_shares_balance_the_dearest_first():
    units = [Unit("F16", dequantize=True), Unit("Q6_K", imatrix=True), Unit("Q4_K", imatrix=True)]
    mine, child = _shares(units, 2)
    assert mine == [Unit("Q4_K", imatrix=True)]
    assert child == [Unit("Q6_K", imatrix=True), Unit("F16", dequantize=True)]
    assert _shares(units, 1) == [[units[2], units[1], units[0]]]
    assert Unit.parse(Unit("Q6_K", imatrix=True).arg()) == Unit("Q6_K", imatrix=True)
    assert Unit.parse(Unit("BF16", dequantize=True).arg()) == Unit("BF16", dequantize=True)


def test_every_codec_names_its_kernels():
    for codec in CODECS.values():
        if codec.name == "F32":
            continue
        for dequantize in (False, True):
            kernels = codec.kernels(dequantize)
            assert kernels and all(hasattr(k, "_cache") for k in kernels), codec.name
    assert is_cached(object())  # cannot tell: nothing to announce


def _cold_env(tmp_path: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_first_run_says_once_that_it_compiles(tmp_path):
    """A fresh cache: kquant-quantize says which kernels it compiles, once, and the bytes are
    the same as a run with nothing to compile, which says nothing."""
    env = _cold_env(tmp_path)
    argv = [sys.executable, "-m", "kquant.cli.quantize", str(MODEL), str(tmp_path / "a.gguf"), "Q8_0"]
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    said = [line for line in first.stderr.splitlines() if line.startswith("compiling kernels")]
    assert said == ["compiling kernels for Q8_0, F16, once (Numba keeps them for later runs)..."], first.stderr
    argv[-2] = str(tmp_path / "b.gguf")
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "compiling" not in second.stderr, second.stderr
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    caches = list((tmp_path / "numba-cache").rglob("*.nbi"))
    assert any("legacy.quantize_q8_0_rows" in p.name for p in caches)
    assert any("floats.dequantize_rows" in p.name for p in caches)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K"])
def test_every_row_kernel_writes_the_generic_kernels_bytes(name):
    """The reference-only kernels (what a job without an imatrix compiles) and the quick ones
    (no literal fallback: rows it would need go again through the full kernel) against
    quantize_rows, on Gaussian rows, rows of zeros, constants, huge and tiny values, inf and NaN,
    with and without an imatrix, through the codec (which picks and redoes) and directly."""
    codec = kquant.codecs.get_codec(name)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((12, 512)).astype(np.float32)
    x[1] = 0.0
    x[2] = 3.0
    x[3] *= np.float32(1e30)
    x[4] *= np.float32(1e-30)
    x[5, 7] = np.inf
    x[6, 9] = np.nan
    x[7, :256] = -np.inf
    x[8, 100] = np.float32(3e38)
    x[9, 200] = np.float32(-3e38)
    w = rng.random(512).astype(np.float32) * np.float32(1e3)
    m = codec.module
    for qw, use_qw in ((np.zeros(0, np.float32), False), (w, True)):
        want = np.empty((len(x), codec.row_bytes(512)), np.uint8)
        with np.errstate(all="ignore"):
            m.quantize_rows(x, qw, use_qw, want)
            assert np.array_equal(codec.quantize_rows(x, w if use_qw else None), want)
            got = np.empty_like(want)
            if not use_qw:
                m.quantize_rows_ref(x, got)
                assert np.array_equal(got, want)
            if hasattr(m, "quantize_rows_quick"):
                fell_back = np.zeros(1, np.int64)
                finite = x[:3]  # rows the quick kernels take from start to end
                m.quantize_rows_quick(finite, qw, use_qw, got[:3], fell_back)
                assert not fell_back[0] and np.array_equal(got[:3], want[:3])
                m.quantize_rows_quick(x, qw, use_qw, got, fell_back)
                assert fell_back[0]  # the inf / NaN rows: handed back
                if not use_qw:
                    fell_back[0] = 0
                    m.quantize_rows_ref_quick(finite, got[:3], fell_back)
                    assert not fell_back[0] and np.array_equal(got[:3], want[:3])
