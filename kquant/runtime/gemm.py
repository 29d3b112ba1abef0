"""Float32 matrix products whose float order the thread count does not change.

OpenBLAS splits a product between its threads in ways that depend on the thread count and the
shape, and the split can change the order of a value's additions: a (384, 510) x (510, 64)
product (attention's probabilities times values, one KV head) differs in 63% of its values
between 1 and 2 threads, which moved kquant-perplexity's SmolLM2 figures by 0.8% with -t.

Here BLAS always runs on one thread, over tiles of the output's columns (weight rows), and the
runtime's own pool of threads runs the tiles side by side. The tiles depend on the product's
shape and the machine's CPU count only, never on the thread count: OpenBLAS's single-threaded sgemm gives a value other
bits when the columns around it are cut elsewhere on some kernels (its Haswell kernel, which
AMD's Zen cores take: cutting a (510, 576) x (576, 1536) product at row 768 moved 3% of the
values; its SkylakeX kernel kept them), so each thread count must make the same calls. A big
product is cut into one tile per CPU of the machine (`MAX_TILES`; fewer where a tile would fall
below `SPLIT_MIN_MACS` multiply-adds, OpenBLAS's small-matrix path) on `SPLIT_ROWS` boundaries,
as even as they allow; a small one into fixed `TILE_N`-column tiles.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np

#: output columns (weight rows) per single-threaded BLAS call; fixed, never derived from the
#: thread count, or the float order would depend on it again
TILE_N = 128

#: a big product is cut only at multiples of this many weight rows (OpenBLAS's sgemm kernels
#: take 16 at a time)
SPLIT_ROWS = 16
#: ... into tiles of at least this many multiply-adds, far above the small-matrix path
SPLIT_MIN_MACS = 1 << 23
#: ... into at most this many tiles: the machine's CPU count, not the thread count (-t), so that
#: every -t makes the same calls; one tile per core is the fastest cut (12 tiles instead of 2
#: made an F16 SmolLM2 perplexity run 35% slower on 2 cores)
MAX_TILES = os.cpu_count() or 1
#: a product of fewer multiply-adds in all runs its tiles (or heads) on the calling thread: a
#: decode step's attention (a query's heads against one KV head's keys) or a token's float
#: matrix product is a few microseconds of BLAS a tile, less than handing it to the pool's
#: threads costs (the same calls either way, so the same values)
INLINE_MACS = 1 << 22

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
    """The (r0, r1) weight-row ranges matmul_nt runs as separate BLAS calls for an (M, K) x
    (N, K).T product, from the shape alone (see the module docstring)."""
    groups = -(-N // SPLIT_ROWS)
    for n in range(min(MAX_TILES, groups), 1, -1):
        if M * K * SPLIT_ROWS * (groups // n) >= SPLIT_MIN_MACS:
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

    tiles = column_tiles(M, x.shape[1], N)
    if M * x.shape[1] * N < INLINE_MACS:  # a token's product: the same tiles, on this thread
        for r in tiles:
            tile(r)
    else:
        run_all(tile, tiles)
    return out


def batched_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (H, M, K) @ b (H, K, N) -> (H, M, N) float32, one single-threaded product per h (on
    the pool's threads unless the whole is under INLINE_MACS)."""
    H, M, K, N = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    out = np.empty((H, M, N), np.float32)
    if H * M * K * N < INLINE_MACS:
        for h in range(H):
            np.matmul(a[h], b[h], out=out[h])
        return out

    def one(h: int) -> None:
        np.matmul(a[h], b[h], out=out[h])

    run_all(one, range(H))
    return out
