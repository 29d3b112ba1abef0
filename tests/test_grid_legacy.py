"""Level grids of the legacy types (kquant.codecs.legacy.grid_rows / set_levels_rows), which
GPTQ uses to re-round a block onto its fixed scales: grid values are ggml's decoded values,
writing levels touches nothing else, and a block's own levels write back its own bytes."""
from __future__ import annotations

import numpy as np
import pytest

import kquant
from kquant.codecs import legacy

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
HEADER = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 2, "Q5_1": 4, "Q8_0": 2}  # d (and m) bytes
ROWS, BLOCKS, IB = 64, 3, 1  # rows of 3 blocks; the middle block column is worked on


def quantized(qtype, seed, use_imatrix):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, (ROWS, BLOCKS * 32)) * 0.02).astype(np.float32)
    imatrix = np.exp(rng.standard_normal(BLOCKS * 32)).astype(np.float32) if use_imatrix else None
    return rng, kquant.quantize(x, qtype, imatrix)


def column(q, kind):
    bs = legacy.BLOCK_BYTES[kind]
    return q[:, IB * bs:(IB + 1) * bs]  # a strided view, written in place


def grid(q, kind):
    scale = np.empty((ROWS, 32), np.float32)
    offset = np.empty((ROWS, 32), np.float32)
    legacy.grid_rows(kind, column(q, kind), scale, offset)
    return scale, offset


def block_values(q, qtype):
    return kquant.dequantize(q, qtype)[:, IB * 32:(IB + 1) * 32]


def test_n_levels():
    assert [legacy.n_levels(getattr(legacy, t)) for t in TYPES] == [16, 16, 32, 32, 256]


@pytest.mark.parametrize("use_imatrix", [False, True])
@pytest.mark.parametrize("qtype", TYPES)
def test_set_levels_decodes_to_the_grid(qtype, use_imatrix):
    kind = getattr(legacy, qtype)
    rng, q = quantized(qtype, 10 + kind, use_imatrix)
    levels = rng.integers(0, legacy.n_levels(kind), (ROWS, 32))
    q2 = q.copy()
    legacy.set_levels_rows(kind, column(q2, kind), levels)
    scale, offset = grid(q2, kind)
    assert np.array_equal(scale, grid(q, kind)[0]) and np.array_equal(offset, grid(q, kind)[1])
    want = scale * levels.astype(np.float32) + offset  # float32 multiply, then add
    got = block_values(q2, qtype)
    # Exact: equal as floats for every type; bit for bit for Q4_1/Q5_1. Q4_0/Q5_0/Q8_0 decode
    # (L - 8)*d etc., which is -0.0 where d < 0 (or q < 0, d = 0) and the grid's L*d - 8d is +0.0.
    assert np.array_equal(got, want)
    differ = got.view(np.uint32) != want.view(np.uint32)
    if qtype in ("Q4_1", "Q5_1"):
        assert not differ.any()
    else:
        assert (got[differ] == 0).all()
    # Only the level fields of the block column changed; d, m and the other blocks did not.
    bs = legacy.BLOCK_BYTES[kind]
    changed = np.zeros(q.shape[1], bool)
    changed[IB * bs + HEADER[qtype]:(IB + 1) * bs] = True
    assert np.array_equal(q2[:, ~changed], q[:, ~changed])
    assert not np.array_equal(q2, q)


@pytest.mark.parametrize("use_imatrix", [False, True])
@pytest.mark.parametrize("qtype", TYPES)
def test_own_levels_write_back_the_same_bytes(qtype, use_imatrix):
    kind = getattr(legacy, qtype)
    _, q = quantized(qtype, 20 + kind, use_imatrix)
    scale, offset = grid(q, kind)
    all_levels = np.arange(legacy.n_levels(kind), dtype=np.float32)
    values = scale[:, :, None] * all_levels + offset[:, :, None]  # (rows, 32, n_levels)
    hits = values == block_values(q, qtype)[:, :, None]
    assert (hits.sum(axis=2) == 1).all()  # every value on the grid, at one level
    q2 = q.copy()
    column(q2, kind)[:, HEADER[qtype]:] = 0x5A  # scribble over the old levels first
    legacy.set_levels_rows(kind, column(q2, kind), hits.argmax(axis=2))
    assert np.array_equal(q2, q)
