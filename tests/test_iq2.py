"""The IQ2 codecs: their tables (checksums of the grids as data, of iq2xs_init_impl's kmap and
neighbour lists as built here, some lists against a literal reading of the C), block layouts,
the imatrix IQ2_XXS / IQ2_XS need, and the rows where ggml aborts, checked against ggml in a
subprocess; the edge rows ggml quantizes are compared byte for byte (the synthetic cases and
real weights are in test_parity.py, golden vectors in test_golden.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.codecs import iq2, iq2_grids
from cases import make_case, make_imatrix
from test_iq3 import _ggml_aborts, _stress_rows, sha

IQ2 = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S]
KIND = {T.IQ2_XXS: "xxs", T.IQ2_XS: "xs", T.IQ2_S: "s"}
COMMON_H = Path("/work/cache/sd/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-common.h")


def test_grids_are_ggmls():
    assert sha(np.array(iq2_grids.KGRID_256, "<u2")) == "915952ebc4af8ddb"
    assert sha(np.array(iq2_grids.KGRID_512, "<u2")) == "f66435966ca8d64e"
    assert sha(np.array(iq2_grids.KGRID_1024, "<u2")) == "e6e75e121b65e8af"


@pytest.mark.parametrize("kind, name, digest", [
    ("xxs", "iq2xxs_grid", "05826b5d3e472a3a"), ("xs", "iq2xs_grid", "06e47aaca60b4dc1"),
    ("s", "iq2s_grid", "e1aa1473412b0552")])
def test_dequantization_grids_are_ggmls(kind, name, digest):
    """The grids derived from the quantizer's levels (magnitudes 8, 25, 43) are ggml-common.h's
    iq2*_grid bytes (checksums of the header's uint64 tables; compared to the header itself
    when the vendored source is at hand)."""
    got = iq2.DGRIDS[kind].astype(np.uint8)
    assert sha(got.reshape(-1)) == digest
    if COMMON_H.exists():
        import re
        m = re.search(rf"GGML_TABLE_BEGIN\(uint64_t, {name}, \d+\)(.*?)GGML_TABLE_END",
                      COMMON_H.read_text(), re.S)
        want = np.array([int(t, 16) for t in re.findall(r"0x[0-9a-f]+", m.group(1))], "<u8")
        assert np.array_equal(want.view(np.uint8).reshape(-1, 8), got)


def _c_neighbours(u, gpos, nwant):
    """iq2xs_init_impl's list for code u, read literally: qsort by (d2, index), then keep
    entries until the (nwant+1)-th distinct distance."""
    pos = 2 * ((u >> 2 * np.arange(8)) & 3) + 1
    dist2 = sorted((int(((g - pos) ** 2).sum()), j) for j, g in enumerate(gpos.astype(int)))
    out, d2, nhave = [], dist2[0][0], 1
    for d, j in dist2:
        if d > d2:
            if nhave == nwant:
                break
            d2 = d
            nhave += 1
        out.append(j)
    return out


@pytest.mark.parametrize("kind, nwant, digest, n_nb", [
    ("xxs", 2, "247e30da383dc36a", 417400), ("xs", 2, "4b9200750451be88", 551722),
    ("s", 1, "dd86d0ef8fce59cb", 209100)])
def test_kmap_and_neighbours(kind, nwant, digest, n_nb):
    """Every grid point maps to itself; every other code lists its nearest grid points."""
    levels, gpos, kmap, nb = iq2.tables(kind)
    assert sha(kmap.astype("<i4"), nb.astype("<u2")) == digest and nb.size == n_nb
    codes = (levels * (4 ** np.arange(8))).sum(1)
    assert np.array_equal(kmap[codes], np.arange(levels.shape[0]))
    rng = np.random.default_rng(0)
    for u in rng.choice(np.nonzero(kmap < 0)[0], 24, replace=False):
        start = -kmap[u] - 1
        assert nb[start + 1:start + 1 + nb[start]].tolist() == _c_neighbours(u, gpos, nwant)


def test_tables_are_built_on_first_use():
    code = "import kquant, sys; sys.exit(int('kquant.codecs.iq2' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name, size, err", [("IQ2_XXS", 66, 0.45), ("IQ2_XS", 74, 0.4),
                                             ("IQ2_S", 82, 0.35)])
def test_layout_and_round_trip(name, size, err):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    w = np.ones(512, np.float32)
    q = kquant.quantize(x, name, w)
    assert q.shape == (5, 2 * size) and q.dtype == np.uint8
    y = kquant.dequantize(q, name)
    assert np.mean((y - x) ** 2) / np.mean(x ** 2) < err
    assert not kquant.quantize(np.zeros((2, 256), np.float32), name, w[:256]).any()


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS"])
def test_imatrix_required(name):
    with pytest.raises(ValueError, match=f"{name} needs an importance matrix"):
        kquant.quantize(np.ones((1, 256), np.float32), name)


def _flagged(x, qtype, w):
    """kquant's bytes and the rows on which ggml would abort."""
    size = kquant.get_codec(qtype).type_size
    out = np.zeros((x.shape[0], x.shape[1] // 256 * size), np.uint8)
    failed = np.zeros(x.shape[0], np.int64)
    qw = np.zeros(0, np.float32) if w is None else w
    t = iq2.tables(KIND[qtype])
    if qtype == T.IQ2_XXS:
        iq2.quantize_xxs_rows(x, qw, out, failed, *t)
    else:
        iq2.quantize_x16_rows(x, qw, w is not None, qtype == T.IQ2_S, out, failed, *t)
    return out, failed.astype(bool)


def _modes(qtype):
    return ("none", "random") if qtype == T.IQ2_S else ("random", "with_zeros")


@pytest.mark.parametrize("qtype", [T.IQ2_XS, T.IQ2_S], ids=lambda t: t.name)
def test_rows_ggml_aborts_on_raise(ggml, qtype):
    """inf / NaN values and overflowing x^2: where kquant flags a row, ggml aborts on it
    (GGML_ASSERT, in a subprocess); the other rows give ggml's bytes; the codec raises.
    (ggml quantizes these rows as IQ2_XXS, its search reaching no assert: test_parity.py
    compares them.)"""
    x = make_case("non_finite", 24, 512, seed=5)
    for mode in _modes(qtype):
        w = make_imatrix(mode, 512, seed=3)
        with np.errstate(all="ignore"):
            got, failed = _flagged(x, qtype, w)
            assert failed.any() and not failed.all()
            ok = np.nonzero(~failed)[0]
            assert np.array_equal(got[ok], ggml.quantize(x[ok], qtype, w))
            with pytest.raises(ValueError, match=f"{qtype.name}: row {np.argmax(failed)} cannot"):
                kquant.quantize(x, qtype, w)
        for r in np.nonzero(failed)[0][:2]:
            assert _ggml_aborts(x[r], qtype, w), f"row {r} {mode}"


def test_ggml_aborts_without_imatrix():
    """ggml's own refusal, which the codec's ValueError stands for (in a subprocess)."""
    assert _ggml_aborts(np.ones(256, np.float32), T.IQ2_XXS, None)


@pytest.mark.parametrize("qtype", IQ2, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["grid_points", "near_eps", "zero_sub_blocks", "row_scales",
                                  "sparse"])
def test_iq2_edges(ggml, qtype, kind):
    """The IQ3 edge rows (ties, sub-blocks near the eps, zero sub-blocks, row scales, sparse
    rows) under plain, huge and tiny weights."""
    rng = np.random.default_rng(len(kind))
    x = _stress_rows(rng, kind, 768)
    base = (rng.random(768) * rng.exponential(1.0, 768)).astype(np.float32)
    ws = (base, base * np.float32(1e20), base * np.float32(1e-30))
    for w in ((None,) + ws if qtype == T.IQ2_S else ws):
        with np.errstate(all="ignore"):
            got, failed = _flagged(x, qtype, w)
            ok = np.nonzero(~failed)[0]
            assert ok.size >= 8
            assert np.array_equal(got[ok], ggml.quantize(x[ok], qtype, w)), kind


@pytest.mark.parametrize("qtype", IQ2, ids=lambda t: t.name)
def test_iq2_dequantize_any_bytes(ggml, qtype):
    """Random bytes (NaN and inf scales, every grid index and sign) decode to the same bits."""
    size = kquant.get_codec(qtype).type_size
    q = np.random.default_rng(5).integers(0, 256, (64, 8 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        got, want = kquant.dequantize(q, qtype), ggml.dequantize(q, qtype)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
