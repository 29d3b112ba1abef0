"""The IQ1 codecs: their grid (checksums of the grid as data and of ggml-common.h's iq1s_grid),
iq2xs_init_impl's kmap and neighbour lists (built on first use, checked against a literal
reading of the C), block layouts, the imatrix IQ1_S needs, ties in the sort by value, and the
rows where ggml aborts, checked against ggml in a subprocess; edge rows are compared byte for
byte (the synthetic cases and real weights are in test_parity.py, golden vectors in
test_golden.py)."""
from __future__ import annotations

import faulthandler
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.codecs import iq1, iq1_grids
from cases import make_case, make_imatrix

_NONE = np.zeros(0, np.float32)


def sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def test_grid_is_ggmls():
    """kgrid_1bit_2048 as copied, and the decoded grid derived from it: ggml-common.h's
    iq1s_grid (int8 values l - 1, checksum of the header's uint64 table)."""
    assert sha(np.array(iq1_grids.KGRID_2048, "<u2")) == "e9ffebfc997ad602"
    assert sha(iq1.grid_values()) == "07540ffc1aeaf6ad"
    assert iq1.grid_values().shape == (2048, 8)


def test_tables_are_built_on_first_use():
    code = ("import kquant, kquant.codecs.iq1 as m; "
            "assert m.tables.cache_info().currsize == 0; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "ok", r.stderr


def _c_neighbours(u, pos_grid, nwant=3):
    """iq2xs_init_impl for one off-grid code, read literally: (d2, j) pairs sorted by
    iq2_compare_func, then counted until the (nwant+1)-th distinct distance."""
    pos = 2 * ((u >> 2 * np.arange(8)) & 3) + 1
    dist = sorted((int(((g - pos) ** 2).sum()), j) for j, g in enumerate(pos_grid))
    n, d2, nhave = 0, dist[0][0], 1
    for d, _ in dist:
        if d > d2:
            if nhave == nwant:
                break
            d2 = d
            nhave += 1
        n += 1
    return [j for _, j in dist[:n]]


def test_kmap_and_neighbours():
    levels, kmap, nb = iq1.tables()
    assert sha(kmap.astype("<i4"), nb.astype("<u2")) == "70ef46623f22ca8e" and nb.size == 1375339
    codes = (levels * (4 ** np.arange(8))).sum(1)
    assert np.array_equal(kmap[codes], np.arange(2048))
    pos_grid = 2 * levels.astype(np.int64) + 1
    rng = np.random.default_rng(0)
    for u in rng.choice(np.nonzero(kmap < 0)[0], 24, replace=False):
        start = -kmap[u] - 1
        assert nb[start + 1:start + 1 + nb[start]].tolist() == _c_neighbours(int(u), pos_grid)


@pytest.mark.parametrize("name, size", [("IQ1_S", 50), ("IQ1_M", 56)])
def test_layout_and_round_trip(name, size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    w = make_imatrix("random", 512)
    q = kquant.quantize(x, name, w)
    assert q.shape == (5, 2 * size) and q.dtype == np.uint8
    y = kquant.dequantize(q, name)
    # three values a weight: most of the signal, not much more
    assert np.mean((y - x) ** 2) / np.mean(x ** 2) < 0.6
    assert not kquant.quantize(np.zeros((2, 256), np.float32), name, w[:256]).any()


def test_iq1_s_needs_an_imatrix():
    """ggml asserts quant_weights for IQ1_S (ggml_quantize_requires_imatrix); IQ1_M takes
    rows without one (the weights are then x^2), as ggml_quantize_chunk does."""
    x = make_case("gauss", 2, 256)
    with pytest.raises(ValueError, match="IQ1_S needs an importance matrix"):
        kquant.quantize(x, "IQ1_S")
    assert kquant.quantize(x, "IQ1_M").shape == (2, 56)


def _flagged(x, qtype, w):
    """kquant's bytes and the rows on which ggml would abort."""
    size = kquant.get_codec(qtype).type_size
    out = np.zeros((x.shape[0], x.shape[1] // 256 * size), np.uint8)
    failed = np.zeros(x.shape[0], np.int64)
    if qtype == T.IQ1_S:
        iq1.quantize_s_rows(x, w, out, failed, *iq1.tables())
    else:
        iq1.quantize_m_rows(x, _NONE if w is None else w, w is not None, out, failed,
                            *iq1.tables())
    return out, failed.astype(bool)


def _ggml_aborts(ggml, x: np.ndarray, qtype: T, w) -> bool:
    """Whether ggml_quantize_chunk dies on GGML_ASSERT for the row x, in a forked child: it
    inherits ggml's tables, built in this process (a fresh process spends seconds on
    iq2xs_init_impl), and its abort skips the gdb backtrace (GGML_NO_BACKTRACE)."""
    ggml.quantize(np.ones((1, 256), np.float32), qtype, np.ones(256, np.float32))
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: stderr into the pipe, quantize, leave without cleanup
        try:
            os.environ["GGML_NO_BACKTRACE"] = "1"
            faulthandler.disable()  # pytest's would report the abort on the terminal
            os.dup2(wr, 2)
            with np.errstate(all="ignore"):
                ggml.quantize(x.reshape(1, -1), qtype, w)
        finally:
            os._exit(0)
    os.close(wr)
    with os.fdopen(rd, "rb") as f:
        err = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) != 0 and "GGML_ASSERT" in err


def _aborting_rows(n):
    """The non-finite case's rows, and rows whose values are all positive with one +inf
    (every weight inf: the first split's scale is inf/inf, a NaN ggml asserts on)."""
    x = make_case("non_finite", 12, n, seed=5)
    x[6:] = np.abs(x[6:]) + np.float32(0.01)
    x[6:9, 17] = np.inf
    return x


@pytest.mark.parametrize("qtype", [T.IQ1_S, T.IQ1_M], ids=lambda t: t.name)
@pytest.mark.parametrize("mode", ["none", "random"])
def test_rows_ggml_aborts_on_raise(ggml, qtype, mode):
    """Where kquant flags a row, ggml aborts on it (GGML_ASSERT, in a subprocess); the other
    rows give ggml's bytes; the codec raises."""
    if qtype == T.IQ1_S and mode == "none":
        pytest.skip("IQ1_S needs an imatrix")
    x = _aborting_rows(512)
    w = make_imatrix(mode, 512, seed=3)
    with np.errstate(all="ignore"):
        got, failed = _flagged(x, qtype, w)
        assert failed.any() and not failed.all()
        ok = np.nonzero(~failed)[0]
        assert np.array_equal(got[ok], ggml.quantize(x[ok], qtype, w))
        with pytest.raises(ValueError, match=f"{qtype.name}: row {np.argmax(failed)} cannot"):
            kquant.quantize(x, qtype, w)
    for r in np.nonzero(failed)[0][:2]:
        assert _ggml_aborts(ggml, x[r], qtype, w), f"row {r} {mode}"
    assert not _ggml_aborts(ggml, x[ok[0]], qtype, w)


IQ1_STRESS = ["ternary", "few_values", "near_eps", "zero_sub_blocks", "row_scales", "sparse",
              "overflow", "scattered_non_finite"]


def _stress_rows(rng, kind, n):
    """Rows at quantize_row_iq1_*_impl's edges: ternary rows and rows of a few values (ties in
    the sort by value, -0 against 0), sub-blocks around GROUP_MAX_EPS_IQ1_S / _M (1e-12, 1e-7),
    all-zero sub-blocks, wildly different row scales, mostly-zero rows, overflowing x^2, and
    scattered inf / NaN."""
    x = rng.standard_normal((16, n)).astype(np.float32)
    if kind == "ternary":
        x = rng.integers(-1, 2, (16, n)).astype(np.float32) * rng.choice([1, 0.5, 3], (16, 1)).astype(np.float32)
    elif kind == "few_values":
        x = rng.choice(np.array([-1.5, -0.25, 0.0, -0.0, 0.25, 1.0, 2.0], np.float32), (16, n))
    elif kind == "near_eps":
        x *= np.float32(10.0) ** rng.uniform(-14, -5, (16, n // 16)).repeat(16, axis=1).astype(np.float32)
    elif kind == "zero_sub_blocks":
        x *= (rng.random((16, n // 16)) < 0.6).repeat(16, axis=1)
    elif kind == "row_scales":
        x *= np.exp(rng.uniform(-30, 30, (16, 1))).astype(np.float32)
    elif kind == "sparse":
        x *= rng.random((16, n)) < 0.05
    elif kind == "overflow":
        x *= np.float32(10.0) ** rng.uniform(15, 38, (16, 1)).astype(np.float32)
    elif kind == "scattered_non_finite":
        m = rng.random((16, n)) < 0.01
        x[m] = rng.choice(np.array([np.inf, -np.inf, np.nan], np.float32), m.sum())
    return x


@pytest.mark.parametrize("qtype", [T.IQ1_S, T.IQ1_M], ids=lambda t: t.name)
@pytest.mark.parametrize("kind", IQ1_STRESS)
def test_iq1_edges(ggml, qtype, kind):
    rng = np.random.default_rng(IQ1_STRESS.index(kind))
    x = _stress_rows(rng, kind, 768)
    base = (rng.random(768) * rng.exponential(1.0, 768)).astype(np.float32)
    weights = [base, base * np.float32(1e30), base * np.float32(1e-30)]
    for w in weights + ([None] if qtype == T.IQ1_M else []):
        with np.errstate(all="ignore"):
            got, failed = _flagged(x, qtype, w)
            ok = np.nonzero(~failed)[0]
            assert ok.size >= 8 or (kind == "scattered_non_finite" and w is None)
            assert np.array_equal(got[ok], ggml.quantize(x[ok], qtype, w)), kind


@pytest.mark.parametrize("qtype", [T.IQ1_S, T.IQ1_M], ids=lambda t: t.name)
def test_sort_ties_keep_the_values_order(ggml, qtype):
    """Sub-blocks of equal values with different weights: the prefix sums depend on the
    order of the ties, which glibc's merge sort keeps (iq1_sort_helper compares values only)."""
    rng = np.random.default_rng(9)
    x = np.repeat(rng.choice(np.array([-1, -0.0, 0.0, 0.5, 1], np.float32), (24, 64)), 4, axis=1)
    w = (rng.random(256) * 10).astype(np.float32)
    got, failed = _flagged(x, qtype, w)
    assert not failed.any() and np.array_equal(got, ggml.quantize(x, qtype, w))


@pytest.mark.parametrize("qtype", [T.IQ1_S, T.IQ1_M], ids=lambda t: t.name)
def test_iq1_dequantize_any_bytes(ggml, qtype):
    """Random bytes (NaN and inf scales, every grid index and shift) decode to the same bits."""
    size = kquant.get_codec(qtype).type_size
    q = np.random.default_rng(5).integers(0, 256, (64, 8 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        got, want = kquant.dequantize(q, qtype), ggml.dequantize(q, qtype)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
