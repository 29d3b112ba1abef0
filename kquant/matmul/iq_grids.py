"""The lattice grids of ggml's IQ2 and IQ1 types (ggml-common.h's iq2xxs_grid, iq2xs_grid,
iq2s_grid, iq1s_grid), as the vec_dot kernels of kquant.matmul.iq2 / iq1 read them: one
uint64 an entry, whose 8 little-endian bytes are the 8 values of a group (ggml's
_mm256_set_epi64x(grid[i3], grid[i2], grid[i1], grid[i0]) loads them just so).

Every byte of the IQ2 grids is one of 8, 25, 43 (the levels 1, 3, 5 times 8 + 0/1/3: ggml
scales them back with 0.125), every byte of iq1s_grid one of -1, 0, 1; so an entry is stored
as 8 two-bit codes (a uint16, code j in bits 2j..2j+1, the index of the byte's level): the
codes are iq2xs_init_impl's kgrid lists, which the codecs keep (kquant/codecs/iq2_grids.py,
iq1_grids.py), decoded here at import. tests/test_matmul_iq.py checks the decoded tables against
ggml-common.h (and their SHA-256, the uint64 entries little-endian, where the header is
missing).

KSIGNS_Q2XS: ggml's keven_signs_q2xs (quants.c): for a 7-bit sign index s, the 8 bytes
+1 / -1 (byte j = -1 where bit j of s | parity(s) << 7 is set: ksigns_iq2xs[s], the 8th sign
making the count of minus signs even).
"""
from __future__ import annotations

import numpy as np

from ..codecs.iq1_grids import KGRID_2048
from ..codecs.iq2_grids import KGRID_256, KGRID_512, KGRID_1024

#: SHA-256 of each table's uint64 entries (little-endian), as ggml-common.h lists them
SHA256 = {
    "iq2xxs_grid": "05826b5d3e472a3a78f196be62ac78acf81df0f909626e12ab9fa2a5d490dd54",
    "iq2xs_grid": "06e47aaca60b4dc1d9b5a3f34540437058a6b142b4d7a59d5ded769b4d1bf1de",
    "iq2s_grid": "e1aa1473412b0552c2174c30ef22ab4073f6a181b85a17056e8249bd2932fd88",
    "iq1s_grid": "07540ffc1aeaf6ad4d97e96b0fcc765aae39671d4ae4a27bbd0e796fde167c6a",}


def _decode(kgrid: tuple[int, ...], levels: tuple[int, int, int]) -> np.ndarray:
    codes = np.array(kgrid, np.uint16)
    lv = np.array(levels, np.int64).astype(np.uint8)
    b = lv[(codes[:, None] >> (2 * np.arange(8, dtype=np.uint16))) & 3]
    return np.ascontiguousarray(b).view("<u8").reshape(-1).astype(np.uint64)


IQ2XXS_GRID = _decode(KGRID_256, (8, 25, 43))      # 256 entries
IQ2XS_GRID = _decode(KGRID_512, (8, 25, 43))       # 512
IQ2S_GRID = _decode(KGRID_1024, (8, 25, 43))       # 1024
IQ1S_GRID = _decode(KGRID_2048, (-1 & 0xFF, 0, 1))  # 2048 (bytes -1, 0, 1)


def _even_signs() -> np.ndarray:
    s = np.arange(128, dtype=np.int64)
    parity = np.array([bin(v).count("1") & 1 for v in range(128)], np.int64)
    bits = s | (parity << 7)
    b = np.where((bits[:, None] >> np.arange(8)) & 1, -1, 1).astype(np.int8)
    return np.ascontiguousarray(b).view("<u8").reshape(-1).astype(np.uint64)


KSIGNS_Q2XS = _even_signs()                            # 128 entries
