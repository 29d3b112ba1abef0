"""kquant's public codec API: `quantize` and `dequantize`, byte-identical to ggml."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numba
import numpy as np

from ..types import QType
from . import Codec, get_codec


@contextlib.contextmanager
def numba_threads(n_threads: int | None) -> Iterator[int]:
    """Run the enclosed codec kernels (on kquant.codecs.threads' slices) and Numba parallel
    kernels on n_threads (default: all cores)."""
    limit = numba.config.NUMBA_NUM_THREADS
    if n_threads is None:
        n = limit
    elif isinstance(n_threads, (int, np.integer)) and n_threads >= 1:
        n = min(int(n_threads), limit)  # Numba's pool cannot grow past its start size
    else:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(before)


def quantize(x: np.ndarray, qtype: QType, imatrix: np.ndarray | None = None,
             n_threads: int | None = None) -> np.ndarray:
    """Quantize float32 rows `x` (..., n_per_row) to ggml blocks: uint8 (..., row_bytes).

    Identical to `ggml_quantize_chunk(qtype, x, dst, 0, nrows, n_per_row, imatrix)` (for Q8_K,
    to `quantize_row_q8_K_ref`). `imatrix` holds one importance weight per column.
    """
    codec = get_codec(qtype)
    x = _check_rows(x, codec)
    n_per_row = x.shape[-1]
    weights = _check_imatrix(imatrix, n_per_row)
    rows = x.reshape(-1, n_per_row)
    with numba_threads(n_threads):
        out = codec.quantize_rows(rows, weights)
    return out.reshape(x.shape[:-1] + (out.shape[-1],))


def dequantize(data: np.ndarray, qtype: QType, n_threads: int | None = None) -> np.ndarray:
    """Decode ggml blocks (..., row_bytes) to float32 (..., n_per_row), as ggml's dequantize_row_*.

    `data` is normally uint8; other dtypes are read as their bytes (a float16 array for F16).
    """
    codec = get_codec(qtype)
    if not isinstance(data, np.ndarray) or data.ndim < 1:
        raise ValueError("data must be a numpy array with at least one dimension")
    data = np.ascontiguousarray(data).view(np.uint8)
    row_bytes = data.shape[-1]
    if row_bytes % codec.type_size:
        raise ValueError(f"{codec.name}: a row of {row_bytes} bytes is not a whole number of "
                         f"{codec.type_size}-byte blocks")
    n_per_row = row_bytes // codec.type_size * codec.block_size
    with numba_threads(n_threads):
        out = codec.dequantize_rows(data.reshape(-1, row_bytes), n_per_row)
    return out.reshape(data.shape[:-1] + (n_per_row,))


def _check_rows(x: np.ndarray, codec: Codec) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy float32 array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (the row)")
    n_per_row = x.shape[-1]
    if n_per_row == 0 or n_per_row % codec.block_size:
        raise ValueError(f"{codec.name} needs rows that are a multiple of {codec.block_size} "
                         f"values; got rows of {n_per_row}")
    return np.ascontiguousarray(x)


def _check_imatrix(imatrix: np.ndarray | None, n_per_row: int) -> np.ndarray | None:
    if imatrix is None:
        return None
    w = np.asarray(imatrix)
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"imatrix must be float32, got {w.dtype}")
    if w.shape != (n_per_row,):
        raise ValueError(f"imatrix must have one weight per column: shape ({n_per_row},), "
                         f"got {w.shape}")
    return np.ascontiguousarray(w, dtype=np.float32)
