"""Float32 matrix products whose float order the thread count does not change.

OpenBLAS splits a product between its threads in ways that depend on the thread count and the
shape, and the split can change the order of a value's additions: a (384, 510) x (510, 64)
product (attention's probabilities times values, one KV head) differs in 63% of its values
between 1 and 2 threads, which moved kquant-perplexity's SmolLM2 figures by 0.8% with -t.

Here BLAS always runs on one thread, over fixed tiles of the output (the same tiles for any
thread count), and the runtime's own pool of threads runs the tiles side by side: every value
is computed by the same single-threaded call on the same shapes whatever -t is. The tiles are
wide enough (`TILE_N` columns, a whole (tokens, k) input) that BLAS runs each at full speed.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np

#: output columns (weight rows) per single-threaded BLAS call; fixed, never derived from the
#: thread count, or the float order would depend on it again
TILE_N = 128

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


def matmul_nt(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x (M, K) @ w (N, K).T -> (M, N) float32, tile by tile of TILE_N rows of w."""
    M, N = x.shape[0], w.shape[0]
    if out is None:
        out = np.empty((M, N), np.float32)

    def tile(r0: int) -> None:
        r1 = min(N, r0 + TILE_N)
        np.matmul(x, w[r0:r1].T, out=out[:, r0:r1])

    run_all(tile, range(0, N, TILE_N))
    return out


def batched_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (H, M, K) @ b (H, K, N) -> (H, M, N) float32, one single-threaded product per h."""
    out = np.empty((a.shape[0], a.shape[1], b.shape[2]), np.float32)

    def one(h: int) -> None:
        np.matmul(a[h], b[h], out=out[h])

    run_all(one, range(a.shape[0]))
    return out
