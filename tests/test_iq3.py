"""The IQ3 codecs: their tables (checksums of the grids as data, of iq3xs_init_impl's kmap and
neighbour lists as built here), block layouts, and the rows where ggml aborts, checked against
ggml in a subprocess; the edge rows ggml quantizes are compared byte for byte (the synthetic
cases and real weights are in test_parity.py, golden vectors in test_golden.py)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.codecs import iq3, iq3_grids
from cases import make_case, make_imatrix

QUANTIZE = {T.IQ3_XXS: iq3.quantize_xxs_rows, T.IQ3_S: iq3.quantize_s_rows}


def sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def test_grids_are_ggmls():
    assert sha(np.array(iq3_grids.IQ3XXS_GRID, "<u4")) == "46e35f5a997efdee"
    assert sha(np.array(iq3_grids.IQ3S_GRID, "<u4")) == "bd1af4945a1717c6"
    assert sha(np.array(iq3_grids.KGRID_256, "<u2")) == "c9678803c61b2210"
    assert sha(np.array(iq3_grids.KGRID_512, "<u2")) == "353274c58dd7d8dc"


def test_quantizer_grids_are_the_dequantizers_points():
    """The quantizer's 3-bit levels l (values 2l+1) are the points the dequantization grids
    hold as magnitudes: iq3xxs_grid 4, 12, ..., 62 and iq3s_grid 1, 3, ..., 15."""
    xxs = np.array([4, 12, 20, 28, 36, 44, 52, 62])
    got = np.array(iq3_grids.IQ3XXS_GRID, "<u4").view(np.uint8).reshape(-1, 4)
    assert np.array_equal(got, xxs[iq3.XXS_LEVELS])
    got = np.array(iq3_grids.IQ3S_GRID, "<u4").view(np.uint8).reshape(-1, 4)
    assert np.array_equal(got, 2 * iq3.S_LEVELS + 1)


@pytest.mark.parametrize("name, levels, kmap, nb, digest, n_nb", [
    ("256", "XXS_LEVELS", "XXS_KMAP", "XXS_NEIGHBOURS", "90f83a573a814902", 22825),
    ("512", "S_LEVELS", "S_KMAP", "S_NEIGHBOURS", "5274e281861b4ced", 28317)])
def test_kmap_and_neighbours(name, levels, kmap, nb, digest, n_nb):
    """iq3xs_init_impl's tables: every grid point maps to itself; every other point lists
    the grid points at its nwant (2 for 256 points, 3 for 512) smallest distances, nearest
    first, ties by index."""
    levels, kmap, nb = getattr(iq3, levels), getattr(iq3, kmap), getattr(iq3, nb)
    assert sha(kmap.astype("<i4"), nb.astype("<u2")) == digest and nb.size == n_nb
    codes = (levels * (8 ** np.arange(4))).sum(1)
    assert np.array_equal(kmap[codes], np.arange(levels.shape[0]))
    nwant = 2 if name == "256" else 3
    rng = np.random.default_rng(0)
    for u in rng.choice(np.nonzero(kmap < 0)[0], 64, replace=False):
        start = -kmap[u] - 1
        listed = nb[start + 1:start + 1 + nb[start]]
        pos = 2 * ((u >> 3 * np.arange(4)) & 7) + 1
        d2 = ((2 * levels + 1 - pos) ** 2).sum(1)
        cut = np.unique(d2)[nwant - 1]
        want = sorted(np.nonzero(d2 <= cut)[0], key=lambda j: (d2[j], j))
        assert listed.tolist() == want


def test_ksigns_are_ggmls():
    """ksigns_iq2xs: 7 sign bits, the 8th making the count of set bits even."""
    assert sha(iq3.KSIGNS.astype(np.uint8)) == "a76742a603f8beca"
    assert all(bin(int(v)).count("1") % 2 == 0 for v in iq3.KSIGNS)


@pytest.mark.parametrize("name, size", [("IQ3_XXS", 98), ("IQ3_S", 110)])
def test_layout_and_round_trip(name, size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    q = kquant.quantize(x, name)
    assert q.shape == (5, 2 * size) and q.dtype == np.uint8
    y = kquant.dequantize(q, name)
    # 3 bits a value on a grid: about a tenth of the signal's energy
    assert np.mean((y - x) ** 2) / np.mean(x ** 2) < 0.12
    assert not kquant.quantize(np.zeros((2, 256), np.float32), name).any()


def test_iq3_s_zero_sub_block_shifts_the_next_ones():
    """quantize_row_iq3_s_impl skips an all-zero sub-block without advancing qs / signs: the
    next sub-block's indices and signs land in its place (qh stays by sub-block)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    x[0, 64:96] = 0  # sub-block 2
    q = kquant.quantize(x, "IQ3_S")[0]
    y = x.copy()
    y[0, 64:96] = y[0, 96:128]  # sub-block 2 a copy of sub-block 3
    r = kquant.quantize(y, "IQ3_S")[0]
    qs, qh, signs = slice(2, 66), slice(66, 74), slice(74, 106)
    assert np.array_equal(q[qs][16:24], r[qs][24:32]) and not q[qs][56:].any()
    assert np.array_equal(q[signs][8:12], r[signs][12:16]) and not q[signs][28:].any()
    assert q[qh][2] == 0


def _flagged(x, qtype, w):
    """kquant's bytes and the rows on which ggml would abort."""
    size = kquant.get_codec(qtype).type_size
    out = np.zeros((x.shape[0], x.shape[1] // 256 * size), np.uint8)
    failed = np.zeros(x.shape[0], np.int64)
    QUANTIZE[qtype](x, np.zeros(0, np.float32) if w is None else w, w is not None, out, failed)
    return out, failed.astype(bool)


def _ggml_aborts(x: np.ndarray, qtype: T, w) -> bool:
    code = textwrap.dedent(f"""
        import numpy as np, sys
        from gguf import GGMLQuantizationType as T
        from kquant.reference.libggml import GGML
        x = np.frombuffer(bytes.fromhex("{x.tobytes().hex()}"), np.float32).reshape(1, -1)
        w = {None if w is None else f'np.frombuffer(bytes.fromhex("{w.tobytes().hex()}"), np.float32)'}
        GGML().quantize(x, T.{qtype.name}, w)
        print("done")
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return r.returncode != 0 and "done" not in r.stdout and "GGML_ASSERT" in r.stderr


@pytest.mark.parametrize("qtype", [T.IQ3_XXS, T.IQ3_S], ids=lambda t: t.name)
def test_rows_ggml_aborts_on_raise(ggml, qtype):
    """inf / NaN values and overflowing x^2: where kquant flags a row, ggml aborts on it
    (GGML_ASSERT, in a subprocess); the other rows give ggml's bytes; the codec raises."""
    x = make_case("non_finite", 24, 512, seed=5)
    for mode in ("none", "random"):
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


IQ3_STRESS = ["grid_points", "near_eps", "zero_sub_blocks", "row_scales", "sparse"]


def _stress_rows(rng, kind, n):
    """Rows at quantize_row_iq3_*_impl's edges: values on the grid's odd multiples (ties in
    nearest_int), sub-blocks around GROUP_MAX_EPS_IQ3_XXS (1e-8), all-zero sub-blocks, wildly
    different row scales, mostly-zero rows (groups with one value)."""
    x = rng.standard_normal((16, n)).astype(np.float32)
    if kind == "grid_points":
        x = (rng.integers(-8, 8, (16, n)) * 2 + 1).astype(np.float32) * np.float32(0.25)
    elif kind == "near_eps":
        x *= np.float32(10.0) ** rng.uniform(-10, -6, (16, n // 32)).repeat(32, axis=1).astype(np.float32)
    elif kind == "zero_sub_blocks":
        x *= (rng.random((16, n // 32)) < 0.6).repeat(32, axis=1)
    elif kind == "row_scales":
        x *= np.exp(rng.uniform(-30, 30, (16, 1))).astype(np.float32)
    elif kind == "sparse":
        x *= rng.random((16, n)) < 0.05
    return x


@pytest.mark.parametrize("qtype", [T.IQ3_XXS, T.IQ3_S], ids=lambda t: t.name)
@pytest.mark.parametrize("kind", IQ3_STRESS)
def test_iq3_edges(ggml, qtype, kind):
    rng = np.random.default_rng(IQ3_STRESS.index(kind))
    x = _stress_rows(rng, kind, 768)
    base = (rng.random(768) * rng.exponential(1.0, 768)).astype(np.float32)
    for w in (None, base, base * np.float32(1e20), base * np.float32(1e-30)):
        with np.errstate(all="ignore"):
            got, failed = _flagged(x, qtype, w)
            ok = np.nonzero(~failed)[0]
            assert ok.size >= 8
            assert np.array_equal(got[ok], ggml.quantize(x[ok], qtype, w)), kind


@pytest.mark.parametrize("qtype", [T.IQ3_XXS, T.IQ3_S], ids=lambda t: t.name)
def test_iq3_dequantize_any_bytes(ggml, qtype):
    """Random bytes (NaN and inf scales, every grid index and sign) decode to the same bits."""
    size = kquant.get_codec(qtype).type_size
    q = np.random.default_rng(5).integers(0, 256, (64, 8 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        got, want = kquant.dequantize(q, qtype), ggml.dequantize(q, qtype)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
