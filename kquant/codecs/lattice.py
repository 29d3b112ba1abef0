"""The lattice tables of the i-quants' grid searches: ggml's iq3xs_init_impl (IQ3, 4 values of
3 bits a point) and iq2xs_init_impl (IQ2 / IQ1, 8 values of 2 bits a point), built from a grid.

A grid point is a code u: `dims` levels of `bits` bits, level l at bits [bits*k, bits*k+bits),
standing for the position 2l+1. For every code u below kmap_size:
  kmap[u] = the grid index of u when u is on the grid, else -(offset + 1) with
  neighbours[offset] = n and neighbours[offset+1 : offset+1+n] the grid indices nearest to u:
  all points within the nwant smallest distinct squared distances (of positions), ordered by
  (distance, index) as ggml's qsort with iq2_compare_func / iq3_compare_func leaves them.
The quantizers round a group to its nearest code, then search only that code's list
(best_neighbour); fold_signs and level_sums are the other steps they share.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import bits_f32, f32_bits

_ZERO = np.float32(0.0)
_TWO = np.float32(2.0)
_QK = np.float32(256.0)

#: ggml's ksigns_iq2xs: 7 sign bits and their parity as the eighth (the IQ3 and IQ2 blocks)
KSIGNS = np.array([i | (bin(i).count("1") % 2) << 7 for i in range(128)], np.int32)


@njit(cache=True, error_model="numpy", inline="always")
def sigma2(x):
    """2 * sum(x^2) / QK_K over a 256-value super-block, in C's order (IQ3, IQ2, IQ1)."""
    s = _ZERO
    for i in range(256):
        s += x[i] * x[i]
    return _TWO * s / _QK


@njit(cache=True, error_model="numpy", inline="always")
def signed(a, sg, j):
    """a, negated when sign bit j of sg is set: C's a * (bit ? -1.f : 1.f) as GCC compiles
    it, a flip of the sign bit (NaN included)."""
    return bits_f32(f32_bits(a) ^ (np.uint32(((np.int64(sg) >> j) & 1) << 31)))

_FLT_MAX = np.float32(np.finfo(np.float32).max)


@njit(cache=True, error_model="numpy", inline="always")
def best_neighbour(nb, start, gpos, levels, xval, waux, o, scale, L, failed, dims):
    """iq3_find_best_neighbour / iq2_find_best_neighbour: of the grid points listed at
    nb[start] (a count, then indices), the one nearest (weighted by waux) to
    xval[o:o+dims] at this scale; its levels into L[o:o+dims]. Where C's
    GGML_ASSERT(grid_index >= 0) would abort (every distance NaN or inf), failed[0] = 1.
    `dims` is a literal at each call, so the loops compile as the C's fixed ones."""
    n = nb[start]
    best_d2 = _FLT_MAX
    gi = -1
    for j in range(start + 1, start + 1 + n):
        g = nb[j]
        d2 = _ZERO
        for i in range(dims):
            diff = scale * gpos[g, i] - xval[o + i]
            d2 += waux[o + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            gi = g
    if gi < 0:
        gi = nb[start + 1]
        failed[0] = 1
    for i in range(dims):
        L[o + i] = levels[gi, i]
    return gi


@njit(cache=True, error_model="numpy", inline="always")
def fold_signs(xb, weight, xval, signs, ngroups, parity):
    """The sign step of quantize_row_iq3_* / iq2_*: xval = |xb| and each group of 8's sign
    bits; with `parity` (the types storing 7 signs, ksigns_iq2xs) an odd count of negatives
    is made even by flipping the value of least weight*x^2, and 7 bits are kept. Returns the
    largest xval (C's MAX from xval[0])."""
    for k in range(ngroups):
        nflip = 0
        sg = 0
        for i in range(8):
            v = xb[8 * k + i]
            if v >= _ZERO:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                nflip += 1
                sg |= 1 << i
        if parity and nflip % 2:
            imin = 0
            mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if ax < mn:
                    mn = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            sg ^= 1 << imin
        signs[k] = sg & 127 if parity else sg
    mx = xval[0]
    for i in range(1, 8 * ngroups):
        mx = mx if mx > xval[i] else xval[i]
    return mx


@njit(cache=True, error_model="numpy", inline="always")
def level_sums(n, weight, xval, L):
    """The fit of levels L (positions 2l+1) to xval: sum w*x*q and sum w*q^2, in C's order
    (`n` a literal at each call)."""
    sumqx = _ZERO
    sumq2 = _ZERO
    for i in range(n):
        w = weight[i]
        q = np.float32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True, inline="always")
def _positions(code, dims, bits, pos):
    mask = (1 << bits) - 1
    for k in range(dims):
        pos[k] = 2 * ((code >> (bits * k)) & mask) + 1


@njit(cache=True, inline="always")
def _distances(code, gpos, dims, bits, pos, d2):
    _positions(code, dims, bits, pos)
    for j in range(gpos.shape[0]):
        s = 0
        for k in range(dims):
            t = gpos[j, k] - pos[k]
            s += t * t
        d2[j] = s


@njit(cache=True, inline="always")
def _cutoff(d2, nwant, present):
    """The largest distance kept: the nwant-th smallest distinct one (or the largest there is)."""
    present[:] = 0
    for j in range(d2.size):
        present[d2[j]] = 1
    have = 0
    cut = 0
    for v in range(present.size):
        if present[v]:
            cut = v
            have += 1
            if have == nwant:
                break
    return cut


@njit(cache=True)
def _near(code, gpos, dims, bits, nwant, maxd):
    """The code's distances to every grid point, which distances occur, and the cutoff."""
    pos = np.empty(dims, np.int32)
    d2 = np.empty(gpos.shape[0], np.int32)
    present = np.empty(maxd + 1, np.int8)
    _distances(code, gpos, dims, bits, pos, d2)
    return d2, present, _cutoff(d2, nwant, present)


@njit(cache=True, nogil=True)
def _neighbour_lists(gpos, kmap, dims, bits, nwant):
    maxd = dims * (2 * ((1 << bits) - 1)) ** 2
    size = kmap.size
    count = np.zeros(size, np.int64)
    for i in range(size):  # pass 1: how many neighbours each off-grid code keeps
        if kmap[i] >= 0:
            continue
        d2, present, cut = _near(i, gpos, dims, bits, nwant, maxd)
        n = 0
        for j in range(d2.size):
            n += d2[j] <= cut
        count[i] = n + 1
    offsets = np.cumsum(count) - count
    neighbours = np.empty(count.sum(), np.int32)
    for i in range(size):  # pass 2: the lists, by (distance, index)
        if kmap[i] >= 0:
            continue
        d2, present, cut = _near(i, gpos, dims, bits, nwant, maxd)
        o = offsets[i]
        neighbours[o] = count[i] - 1
        o += 1
        for v in range(cut + 1):
            if present[v]:
                for j in range(d2.size):
                    if d2[j] == v:
                        neighbours[o] = j
                        o += 1
    for i in range(size):
        if kmap[i] < 0:
            kmap[i] = -(offsets[i] + 1)
    return neighbours


def build_tables(kgrid, nwant: int, dims: int, bits: int, kmap_size: int):
    """(levels (G, dims) int32, positions 2l+1 as float32, kmap (kmap_size,) int32, neighbours int32)."""
    kgrid = np.asarray(kgrid, np.int32)
    shifts = bits * np.arange(dims, dtype=np.int32)
    levels = (kgrid[:, None] >> shifts) & ((1 << bits) - 1)
    gpos = (2 * levels + 1).astype(np.int32)
    kmap = np.full(kmap_size, -1, np.int32)
    kmap[kgrid] = np.arange(kgrid.size, dtype=np.int32)
    neighbours = _neighbour_lists(gpos, kmap, dims, bits, nwant)
    return levels, gpos.astype(np.float32), kmap, neighbours
