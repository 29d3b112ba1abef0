"""Float32 matrix products whose float order the thread count does not change.

OpenBLAS splits a product between its threads in ways that depend on the thread count and the
shape, and the split can change the order of a value's additions: a (384, 510) x (510, 64)
product (attention's probabilities times values, one KV head) differs in 63% of its values
between 1 and 2 threads, which moved kquant-perplexity's SmolLM2 figures by 0.8% with -t.

Here BLAS always runs on one thread, over tiles of the output's columns (weight rows), and the
runtime's own pool of threads runs the tiles side by side. A value's float order in OpenBLAS's
single-threaded sgemm depends only on K's blocking, not on where the columns are cut, as long
as (measured: tests/test_exact.py) the cuts fall on multiples of `SPLIT_ROWS` and every
call is big enough to take the regular kernel (below about 10^6 multiply-adds OpenBLAS has a
small-matrix path, and narrow or odd column counts take edge kernels, which add in other
orders). So a big product is cut into one slice per thread on `SPLIT_ROWS` boundaries, each
slice at least `SPLIT_MIN_MACS` multiply-adds (the fastest split: each thread one long BLAS
call, the slices as even as the boundaries allow), and a small one into fixed `TILE_N`-column
tiles, the same for any thread count.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np

#: output columns (weight rows) per single-threaded BLAS call; fixed, never derived from the
#: thread count, or the float order would depend on it again
TILE_N = 128

#: a product is cut per thread only at multiples of this many weight rows (OpenBLAS's sgemm
#: kernels take 16 at a time; cuts at 8 kept the bits too, at 4 not always)
SPLIT_ROWS = 16
#: ... into slices of at least this many multiply-adds, far above the small-matrix path
SPLIT_MIN_MACS = 1 << 23

_pool: ThreadPoolExecutor | None = None
_pool_threads = 1


def set_pool_threads(n: int) -> None:
    """Run tiles on n threads (kquant.runtime.device.set_threads calls this)."""
    global _pool, _pool_threads
    if n != _pool_threads or (n > 1 and _pool is None):
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kquant-gemm") if n > 1 else None
        _pool_threads = n


def pool_threads() -> int:
    return _pool_threads


def run_all(fn: Callable[[Any], None], items: Iterable[Any]) -> None:
    """fn(item) for every item, on the pool's threads (numpy's BLAS releases the GIL); the
    items are independent, so which thread runs which does not change any value."""
    items = list(items)
    if _pool is None or len(items) < 2:
        for item in items:
            fn(item)
        return
    for f in [_pool.submit(fn, item) for item in items]:
        f.result()


def column_tiles(M: int, K: int, N: int) -> list[tuple[int, int]]:
    """The (r0, r1) weight-row ranges matmul_nt gives its threads for an (M, K) x (N, K).T
    product: one slice per thread on SPLIT_ROWS boundaries, each a regular-kernel BLAS call of
    SPLIT_MIN_MACS or more (fewer slices than threads where N is too short for that), else
    fixed TILE_N tiles (see the module docstring)."""
    groups = -(-N // SPLIT_ROWS)
    min_groups = -(-SPLIT_MIN_MACS // (M * K * SPLIT_ROWS)) if M * K else groups + 1
    if min_groups <= groups and M * K * SPLIT_ROWS * 4 >= SPLIT_MIN_MACS:
        # at most groups // min_groups slices, so that each has min_groups groups or more
        n = max(1, min(_pool_threads, groups // min_groups))
        bounds = [min(N, (groups * i // n) * SPLIT_ROWS) for i in range(n + 1)]
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    return [(r0, min(N, r0 + TILE_N)) for r0 in range(0, N, TILE_N)]


def matmul_nt(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x (M, K) @ w (N, K).T -> (M, N) float32, over column_tiles' ranges of w's rows."""
    M, N = x.shape[0], w.shape[0]
    if out is None:
        out = np.empty((M, N), np.float32)

    def tile(r: tuple[int, int]) -> None:
        np.matmul(x, w[r[0]:r[1]].T, out=out[:, r[0]:r[1]])

    run_all(tile, column_tiles(M, x.shape[1], N))
    return out


def batched_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (H, M, K) @ b (H, K, N) -> (H, M, N) float32, one single-threaded product per h."""
    out = np.empty((a.shape[0], a.shape[1], b.shape[2]), np.float32)

    def one(h: int) -> None:
        np.matmul(a[h], b[h], out=out[h])

    run_all(one, range(a.shape[0]))
    return out
